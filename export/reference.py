"""Reference distributions recorded at training time, for drift detection when serving.

Per input column: quantile bin edges from training rows, the share of rows per bin and the
missing rate; for predictions: the same over the validation scores. The population
stability index (PSI) compares a serving sample with them. Pure numpy (the server uses it).

Also, since drift tests need them (monitor/drift.py): `n`, the rows the shares came from (the
shares are an estimate, and a chi-square test that took them as exact would alarm too often),
`discrete` (every value an integer: counts, where KS is wrong because of ties), and with
`sample=k` a deterministic sample of k raw values for a two-sample KS test (continuous columns
only: a 1000-value sample of every column would make a manifest ~1 MB instead of ~50 KB). Releases written
before these keys existed still work: drift falls back to a goodness-of-fit chi-square.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["histogram_reference", "column_references", "psi"]


def histogram_reference(values: np.ndarray, bins: int = 10, *, sample: int = 0, seed: int = 0) -> dict:
    """Quantile bins of the finite values; with sample > 0, up to `sample` of them drawn
    without replacement by a fixed seed (the same training rows give the same manifest)."""
    v = np.asarray(values, dtype=np.float64)
    missing = ~np.isfinite(v)
    x = v[~missing]
    if len(x) == 0:
        return {"edges": [], "shares": [], "missing_rate": 1.0, "n": 0}
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
    out = {"edges": edges.tolist(), "shares": (counts / len(x)).tolist(), "missing_rate": float(missing.mean()),
           "n": len(x), "discrete": bool(np.all(x == np.round(x)))}
    if sample > 0 and not out["discrete"]:  # counts are tested with chi-square (KS assumes no ties): no sample needed
        pick = np.random.default_rng(seed).choice(len(x), size=min(sample, len(x)), replace=False)
        # float32 shortest repr: the served log holds float32, and these parse back to the same float32 values
        out["sample"] = [float(str(np.float32(a))) for a in np.sort(x[pick])]
    return out


def column_references(X: np.ndarray, columns: Sequence[str], bins: int = 10, *, sample: int = 0) -> dict[str, dict]:
    return {c: histogram_reference(X[:, j], bins, sample=sample, seed=j) for j, c in enumerate(columns)}


def psi(reference: Mapping, values: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of `values` against a reference histogram (> 0.2: drift)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    edges = np.asarray(reference["edges"], dtype=np.float64)
    ref = np.asarray(reference["shares"], dtype=np.float64)
    if len(v) == 0 or len(ref) == 0:
        return 0.0
    obs = np.bincount(np.searchsorted(edges, v, side="right"), minlength=len(ref)) / len(v)
    ref, obs = np.maximum(ref, eps), np.maximum(obs, eps)
    return float(np.sum((obs - ref) * np.log(obs / ref)))
