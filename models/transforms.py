"""The ranker's input transform, fitted on training rows and exported inside the ONNX graph.

Per raw column j (raw = the float32 matrix `features.assemble.assemble` builds, NaN = missing):

1. missing flag   m = isnan(x)
2. fill           x = m ? median_j : x           (median of the observed training values, 0 if none)
3. signed log1p   x = sign(x) * log1p(|x|)       only for columns chosen at fit time: observed
                                                 training values all >= 0 and heavy-tailed
                                                 (max > 100 or skewness > 2)
4. clip           x = min(max(x, lo_j), hi_j)    training p0.1 / p99.9 of the (logged) values
5. normalise      x = (x - mean_j) / std_j       training mean / std of the filled, clipped column
6. bound          x = min(max(x, -z_max), z_max) z_max = 8 by default: a rare-event column (e.g. a
                                                 0/1 feature that is 1 in 0.1 % of rows) would
                                                 otherwise reach 30σ, and one such column sets the
                                                 int8 activation scale of the whole input tensor

Output: concat(normalised values (F), missing flags of the columns that were ever missing in
training (as 0/1 floats)). Every step is a tensor op over buffers (IsNaN, Where, Sign, Abs, Log,
Max, Min, Sub, Mul, Gather, Concat in ONNX); nothing branches on data in Python, so the export is
the same maths on the server and on a device. Infinite inputs are not "missing": they clip to
lo_j / hi_j like any out-of-range value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["TransformStats", "FeatureTransform", "fit_transform_stats", "TransformStatsError"]

LOG_MAX_THRESHOLD = 100.0
LOG_SKEW_THRESHOLD = 2.0
CLIP_QUANTILES = (0.001, 0.999)
MIN_STD = 1e-6
Z_MAX = 8.0


class TransformStatsError(ValueError):
    """The statistics do not describe a valid transform (shapes, names, non-finite values)."""


@dataclass(frozen=True)
class TransformStats:
    """Training statistics of every raw column, in column order (float64 / bool arrays)."""

    columns: tuple[str, ...]
    median: np.ndarray  # fill value for missing, raw scale
    log1p: np.ndarray  # bool: apply signed log1p
    clip_lo: np.ndarray  # after log
    clip_hi: np.ndarray
    mean: np.ndarray  # of the filled, logged, clipped column
    std: np.ndarray
    missing_rate: np.ndarray  # share of training rows missing
    n_rows: int
    z_max: float = Z_MAX  # bound of the normalised values

    def __post_init__(self) -> None:
        f = len(self.columns)
        for name in ("median", "log1p", "clip_lo", "clip_hi", "mean", "std", "missing_rate"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.shape != (f,):
                raise TransformStatsError(f"{name} must be an array of shape ({f},), got {getattr(a, 'shape', type(a))}")
        for name in ("median", "clip_lo", "clip_hi", "mean", "std"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise TransformStatsError(f"{name} has non-finite values")
        if np.any(self.std <= 0):
            raise TransformStatsError("std must be > 0")
        if np.any(self.clip_lo > self.clip_hi):
            raise TransformStatsError("clip_lo must be <= clip_hi")
        if not (np.isfinite(self.z_max) and self.z_max > 0):
            raise TransformStatsError(f"z_max must be a finite number > 0, got {self.z_max}")

    @property
    def flag_columns(self) -> tuple[int, ...]:
        """Indices of the columns that get a missing flag (missing at least once in training)."""
        return tuple(int(j) for j in np.flatnonzero(self.missing_rate > 0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists of Python floats / bools / str) for the release manifest."""
        return {
            "columns": list(self.columns),
            "median": self.median.tolist(),
            "log1p": [bool(b) for b in self.log1p],
            "clip_lo": self.clip_lo.tolist(),
            "clip_hi": self.clip_hi.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "missing_rate": self.missing_rate.tolist(),
            "missing_flag_columns": [self.columns[j] for j in self.flag_columns],
            "n_rows": int(self.n_rows),
            "z_max": float(self.z_max),
            "thresholds": {"log_max": LOG_MAX_THRESHOLD, "log_skew": LOG_SKEW_THRESHOLD, "clip_quantiles": list(CLIP_QUANTILES)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TransformStats":
        f64 = lambda k: np.asarray(d[k], dtype=np.float64)  # noqa: E731
        return cls(
            tuple(d["columns"]), f64("median"), np.asarray(d["log1p"], dtype=bool), f64("clip_lo"), f64("clip_hi"),
            f64("mean"), f64("std"), f64("missing_rate"), int(d["n_rows"]), float(d.get("z_max", Z_MAX)),
        )


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def fit_transform_stats(X: np.ndarray, columns: Sequence[str] | None = None, *, z_max: float = Z_MAX) -> TransformStats:
    """Statistics of the raw training matrix X (n, F), NaN = missing."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows, columns), got shape {X.shape}")
    n, f = X.shape
    if n == 0:
        raise ValueError("cannot fit a transform on zero rows")
    columns = tuple(columns) if columns is not None else tuple(f"x{j}" for j in range(f))
    if len(columns) != f:
        raise ValueError(f"{len(columns)} column names for {f} columns")
    med, logc, lo, hi, mu, sd, miss = (np.zeros(f) for _ in range(7))
    logc = logc.astype(bool)
    sd[:] = 1.0
    for j in range(f):
        x = X[:, j].astype(np.float64)
        obs = np.isfinite(x)  # no NaN/inf expected besides NaN = missing; an inf would not be a statistic
        miss[j] = 1.0 - obs.mean()
        if not obs.any():
            continue  # all missing: fill 0, no log, clip [0, 0], mean 0, std 1 -> constant 0
        v = x[obs]
        med[j] = np.median(v)
        if v.min() >= 0:
            s = v.std()
            skew = float(np.mean((v - v.mean()) ** 3) / s**3) if s > 0 else 0.0
            logc[j] = bool(v.max() > LOG_MAX_THRESHOLD or skew > LOG_SKEW_THRESHOLD)
        t = _signed_log1p(v) if logc[j] else v
        lo[j], hi[j] = np.quantile(t, CLIP_QUANTILES)
        fill = _signed_log1p(med[j]) if logc[j] else med[j]
        z = np.clip(np.where(obs, np.nan_to_num(_signed_log1p(x) if logc[j] else x), fill), lo[j], hi[j])
        mu[j] = z.mean()
        zs = float(z.std())
        sd[j] = zs if zs > MIN_STD else 1.0  # a constant column maps to 0, not to inf
    return TransformStats(columns, med, logc, lo, hi, mu, sd, miss, int(n), float(z_max))


class FeatureTransform(nn.Module):
    """Raw ranker inputs (N, F) float32 with NaN → model inputs (N, F + n_flags) float32."""

    def __init__(self, stats: TransformStats) -> None:
        super().__init__()
        self.stats = stats
        f32 = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.register_buffer("median", f32(stats.median))
        self.register_buffer("use_log", torch.tensor(np.asarray(stats.log1p, dtype=bool)))
        self.register_buffer("clip_lo", f32(stats.clip_lo))
        self.register_buffer("clip_hi", f32(stats.clip_hi))
        self.register_buffer("mean", f32(stats.mean))
        self.register_buffer("inv_std", f32(1.0 / stats.std))
        self.register_buffer("z_lo", f32([-stats.z_max]))
        self.register_buffer("z_hi", f32([stats.z_max]))
        self.register_buffer("flag_index", torch.tensor(stats.flag_columns, dtype=torch.int64))
        self._n_flags = len(stats.flag_columns)

    @classmethod
    def fit(cls, X: np.ndarray, columns: Sequence[str] | None = None, *, z_max: float = Z_MAX) -> "FeatureTransform":
        return cls(fit_transform_stats(X, columns, z_max=z_max))

    @classmethod
    def from_stats_dict(cls, d: Mapping[str, Any]) -> "FeatureTransform":
        return cls(TransformStats.from_dict(d))

    @property
    def in_features(self) -> int:
        return len(self.stats.columns)

    @property
    def out_features(self) -> int:
        return self.in_features + self._n_flags

    @property
    def columns(self) -> tuple[str, ...]:
        return self.stats.columns

    def stats_dict(self) -> dict[str, Any]:
        return self.stats.to_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(x)
        x = torch.where(missing, self.median, x)
        x = torch.where(self.use_log, torch.sign(x) * torch.log1p(torch.abs(x)), x)
        x = torch.minimum(torch.maximum(x, self.clip_lo), self.clip_hi)
        x = torch.minimum(torch.maximum((x - self.mean) * self.inv_std, self.z_lo), self.z_hi)
        if self._n_flags == 0:  # structural (fixed at fit time), not a branch on data
            return x
        flags = torch.index_select(missing, 1, self.flag_index).to(x.dtype)
        return torch.cat([x, flags], dim=1)
