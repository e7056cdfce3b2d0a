"""Segmented scans in numpy: prefix sums, maxima and linear recurrences that restart at
each segment (entity) boundary, computed in O(n log L) vectorised steps (L: the longest
segment) instead of a Python loop per event.

The linear recurrence y_k = a_k * y_{k-1} + b_k is what a decayed sum is between events
(a_k = 2^(-(t_k - t_{k-1}) / h)); it composes associatively, so a doubling scan computes
it without the overflow of rebasing weights to a common time.
"""
from __future__ import annotations

import numpy as np

__all__ = ["segment_starts", "segmented_cumsum", "segmented_cummax", "segmented_linear_scan"]


def segment_starts(seg: np.ndarray) -> np.ndarray:
    """Boolean mask: True where a new segment begins (seg must be grouped)."""
    starts = np.ones(len(seg), dtype=bool)
    if len(seg) > 1:
        starts[1:] = seg[1:] != seg[:-1]
    return starts


def _position_in_segment(seg: np.ndarray) -> np.ndarray:
    idx = np.arange(len(seg))
    start_idx = np.maximum.accumulate(np.where(segment_starts(seg), idx, 0))
    return idx - start_idx


def segmented_linear_scan(a: np.ndarray, b: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """y_k = a_k * y_{k-1} + b_k within each segment; y at a segment's first row is b."""
    n = len(b)
    A = np.asarray(a, dtype=np.float64).copy()
    B = np.asarray(b, dtype=np.float64).copy()
    if n == 0:
        return B
    pos = _position_in_segment(seg)
    longest = int(pos.max()) + 1
    d = 1
    while d < longest:
        m = pos[d:] >= d  # element i-d lies in the same segment
        idx = np.flatnonzero(m) + d
        prevA, prevB = A[idx - d], B[idx - d]
        B[idx] = A[idx] * prevB + B[idx]
        A[idx] = A[idx] * prevA
        d *= 2
    return B


def segmented_cumsum(v: np.ndarray, seg: np.ndarray) -> np.ndarray:
    return segmented_linear_scan(np.ones(len(v)), v, seg)


def segmented_cummax(v: np.ndarray, seg: np.ndarray) -> np.ndarray:
    out = np.asarray(v, dtype=np.float64).copy()
    if len(out) == 0:
        return out
    pos = _position_in_segment(seg)
    longest = int(pos.max()) + 1
    d = 1
    while d < longest:
        idx = np.flatnonzero(pos[d:] >= d) + d
        out[idx] = np.maximum(out[idx], out[idx - d])
        d *= 2
    return out
