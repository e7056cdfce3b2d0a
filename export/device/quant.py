"""Symmetric per-row int8 quantisation of embeddings, exactly as BUNDLE_FORMAT.md defines it.

scale = max|e| / 127 per row (1 for an all-zero row), q = round(e / scale) clipped to
[-127, 127], dequantised e' = q * scale in float32. Rounding is numpy's (half to even);
|e' - e| <= scale / 2 per entry (up to float32 rounding). The device ranker trains on the
dequantised embeddings, so it sees the same numbers a phone does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["QuantizedRows", "quantize_rows", "dequantize_rows", "int8_round_trip"]

TINY = np.float32(1e-30)  # rows below this magnitude quantise as zero rows


@dataclass(frozen=True)
class QuantizedRows:
    q: np.ndarray  # (n, d) int8
    scale: np.ndarray  # (n,) float32


def quantize_rows(e: np.ndarray) -> QuantizedRows:
    """Per-row symmetric int8 of a finite (n, d) matrix."""
    e = np.asarray(e, dtype=np.float32)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (rows, dim), got shape {e.shape}")
    if not np.all(np.isfinite(e)):
        raise ValueError("embeddings must be finite to quantise (a missing embedding is no row, not a NaN row)")
    m = np.abs(e).max(axis=1) if e.shape[1] else np.zeros(len(e), np.float32)
    # a row whose largest |value| is below TINY counts as all-zero: its scale would be subnormal,
    # where float32 loses the precision the round trip promises (hypothesis found 1.2e-42)
    scale = np.where(m > TINY, m / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.round(e / scale[:, None]), -127, 127).astype(np.int8)
    return QuantizedRows(q, scale)


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`embedding.astype(float32) * scale[:, None]` (float32)."""
    return (np.asarray(q).astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]).astype(np.float32)


def int8_round_trip(e: np.ndarray) -> np.ndarray:
    """What a device reads back for embeddings e: rows with a NaN stay all-NaN (no embedding)."""
    e = np.asarray(e, dtype=np.float32)
    bad = ~np.all(np.isfinite(e), axis=1)
    r = quantize_rows(np.where(bad[:, None], 0.0, e))
    out = dequantize_rows(r.q, r.scale)
    out[bad] = np.nan
    return out
