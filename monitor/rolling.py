"""A rolling drift reference: the served rows of the previous `reference_ms` (48 h as
calibrated, bench/drift_calibrate.py) instead of the release's training-time reference.

Why: the catalogue ages and item popularity moves every day, so against a fixed reference
about a quarter of column-windows alarm on simulated traffic with no shift at all (24.9 % on
held-out seeds); against the served rows of the two days before, 3.7 %. A new release has no
history yet: until `min_reference_rows` rows are old enough, callers fall back to the release's
reference.

Memory stays bounded: rows are kept as one uniform reservoir per time bucket (1 h) with the
number of rows the bucket saw, and pooled in proportion to those counts, so a busy hour
weighs what it served, not what its reservoir holds.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from export.reference import column_references, histogram_reference
from monitor.drift import DriftReport, DriftThresholds, drift_report

__all__ = ["RollingRows", "rolling_report"]


class _Res:
    __slots__ = ("X", "p", "seen")

    def __init__(self, size: int, n_cols: int) -> None:
        self.X = np.full((size, n_cols), np.nan, dtype=np.float32)
        self.p = np.full(size, np.nan, dtype=np.float32)
        self.seen = 0


class RollingRows:
    """Uniform reservoirs of (ranker inputs, prediction) per time bucket over `keep_ms`."""

    def __init__(self, columns: Sequence[str], *, bucket_ms: int = 3_600_000, keep_ms: int = 54 * 3_600_000, per_bucket: int = 2000,
                 seed: int = 0) -> None:
        self.columns = tuple(columns)
        self.bucket_ms, self.keep_ms, self.per_bucket = int(bucket_ms), int(keep_ms), int(per_bucket)
        self._rng = np.random.default_rng(seed)
        self._b: dict[int, _Res] = {}

    def add(self, X: np.ndarray, p: np.ndarray, ts_ms: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float32)
        p = np.asarray(p, dtype=np.float32).reshape(-1)
        b_of = np.asarray(ts_ms, dtype=np.int64) // self.bucket_ms
        for b in np.unique(b_of).tolist():
            sel = np.flatnonzero(b_of == b)
            r = self._b.get(b)
            if r is None:
                r = self._b[b] = _Res(self.per_bucket, len(self.columns))
            k = r.seen + np.arange(len(sel))
            slot = np.where(k < self.per_bucket, k, self._rng.integers(0, k + 1))
            keep = slot < self.per_bucket
            r.X[slot[keep]] = X[sel[keep]]
            r.p[slot[keep]] = p[sel[keep]]
            r.seen += len(sel)
        newest = int(b_of.max()) if len(b_of) else None
        if newest is not None:
            for b in [b for b in self._b if (newest - b) * self.bucket_ms >= self.keep_ms]:
                del self._b[b]

    def rows(self, since_ms: int, until_ms: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(X, p, rows seen) of buckets inside [since, until), pooled in proportion to what each saw."""
        live = [r for b, r in sorted(self._b.items()) if since_ms <= b * self.bucket_ms and (b + 1) * self.bucket_ms <= until_ms and r.seen]
        if not live:
            return np.empty((0, len(self.columns)), np.float32), np.empty(0, np.float32), 0
        frac = min(min(r.seen, self.per_bucket) / r.seen for r in live)
        xs, ps = [], []
        for r in live:
            have = min(r.seen, self.per_bucket)
            take = max(1, min(have, round(frac * r.seen)))
            pick = np.sort(self._rng.choice(have, size=take, replace=False)) if take < have else np.arange(have)
            xs.append(r.X[pick])
            ps.append(r.p[pick])
        return np.concatenate(xs), np.concatenate(ps), sum(r.seen for r in live)


def rolling_report(rows: RollingRows, now_ms: int, *, window_ms: int, reference_ms: int, thresholds: DriftThresholds,
                   min_reference_rows: int = 2000, reference_sample: int = 1000,
                   cache: dict | None = None) -> tuple[DriftReport, Mapping] | None:
    """The last `window_ms` against the `reference_ms` before it, or None while the reference
    holds fewer than `min_reference_rows` served rows. Buckets are whole: the window is the
    buckets ending at the one holding now. `cache`: the reference is rebuilt only when the
    window moves to the next bucket (hourly), not on every call."""
    end = (now_ms // rows.bucket_ms + 1) * rows.bucket_ms
    start = end - window_ms
    ref = cache.get(start) if cache is not None else None
    if ref is None:
        Xr, pr, seen_ref = rows.rows(start - reference_ms, start)
        if seen_ref < min_reference_rows or len(Xr) < 2:
            return None
        ref = {"features": column_references(Xr, rows.columns, sample=reference_sample),
               "prediction": histogram_reference(pr, bins=20, sample=reference_sample)}
        if cache is not None:
            cache.clear()
            cache[start] = ref
    X, p, _ = rows.rows(start, end)
    if not len(X):
        return None
    return drift_report(ref, list(rows.columns), X, p, thresholds), ref
