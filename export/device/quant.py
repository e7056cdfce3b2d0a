"""Symmetric per-row int8 quantisation of embeddings (mobile_sdk/BUNDLE_FORMAT.md).

scale = max|e| / 127 per row (1 for an all-zero row), q = round(e / scale) in [-127, 127]:
a dequantised value is within scale / 2 of the original, and a dot product of two rows keeps
its order far better than one shared scale would on rows of different norms."""
from __future__ import annotations

import numpy as np

__all__ = ["quantize_rows", "dequantize_rows"]


def quantize_rows(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 (n, d), scale float32 (n,)) of float rows (n, d)."""
    e = np.asarray(e, dtype=np.float32)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (rows, dim), got shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError("embeddings must be finite")
    m = np.abs(e).max(axis=1) if e.shape[1] else np.zeros(len(e), np.float32)
    scale = np.where(m > 0, m / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(e / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.asarray(q, dtype=np.float32) * np.asarray(scale, dtype=np.float32).reshape(-1, 1)
