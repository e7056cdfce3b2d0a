"""Ranking and classification metrics, pure numpy (no torch): the server, the release checks and
the device tests can import this module without the training extra.

Conventions
- Scores are "higher is better"; labels/relevances are non-negative numbers (0/1 here).
- Ties in scores are handled explicitly rather than by array order, because an int8 model
  produces many exact ties: `auc` gives a tied (positive, negative) pair half a point, and
  `ndcg_at_k` / `recall_at_k` use the expected value over all orderings of tied scores
  (McSherry & Najork, ECIR 2008), so a metric never depends on how candidates happen to be
  ordered in the input.
- A per-list metric that is undefined for a list (no positive for NDCG/recall, fewer than two
  distinct values for Kendall's tau) is NaN; `grouped_mean` skips NaN lists and says how many
  it used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "auc",
    "logloss",
    "ndcg_at_k",
    "recall_at_k",
    "kendall_tau",
    "candidate_lists",
    "grouped_mean",
    "GroupedMean",
    "list_index",
    "within_list_auc",
    "within_list_ndcg",
]


def _as_1d(a, name: str, dtype=np.float64) -> np.ndarray:
    a = np.asarray(a, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _same_length(*arrays: np.ndarray) -> None:
    n = {len(a) for a in arrays}
    if len(n) != 1:
        raise ValueError(f"arrays must have the same length, got {[len(a) for a in arrays]}")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties get the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction). NaN if one class only."""
    y = _as_1d(labels, "labels")
    s = _as_1d(scores, "scores")
    _same_length(y, s)
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels, probs, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities, clipped to [eps, 1 - eps]."""
    y = _as_1d(labels, "labels")
    p = np.clip(_as_1d(probs, "probs"), eps, 1.0 - eps)
    _same_length(y, p)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _tie_groups(scores: np.ndarray):
    """Order by score descending; return (order, group start, group end) of tied runs."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    b = np.flatnonzero(np.diff(s) != 0) + 1
    starts = np.concatenate([[0], b])
    ends = np.concatenate([b, [len(s)]])
    return order, starts, ends


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def ndcg_at_k(relevance, scores, k: int = 10) -> float:
    """NDCG@k of one list, linear gain (rel), discount 1/log2(rank + 1), tie-aware.

    Items with equal scores share the mean gain of their group over the positions the group
    occupies (the expected DCG over random tie-breaking). NaN when the list has no relevant item.
    """
    k = _check_k(k)
    rel = _as_1d(relevance, "relevance")
    s = _as_1d(scores, "scores")
    _same_length(rel, s)
    if len(rel) == 0:
        return float("nan")
    disc = 1.0 / np.log2(np.arange(2, len(rel) + 2))
    disc[k:] = 0.0
    ideal = float(np.sum(np.sort(rel)[::-1] * disc))
    if ideal <= 0.0:
        return float("nan")
    order, starts, ends = _tie_groups(s)
    r = rel[order]
    csum_r = np.concatenate([[0.0], np.cumsum(r)])
    csum_d = np.concatenate([[0.0], np.cumsum(disc)])
    mean_gain = (csum_r[ends] - csum_r[starts]) / (ends - starts)
    dcg = float(np.sum(mean_gain * (csum_d[ends] - csum_d[starts])))
    return dcg / ideal


def recall_at_k(relevance, scores, k: int = 10) -> float:
    """Share of the relevant items (rel > 0) ranked in the top k, tie-aware. NaN if none is relevant."""
    k = _check_k(k)
    rel = _as_1d(relevance, "relevance") > 0
    s = _as_1d(scores, "scores")
    _same_length(rel, s)
    n_rel = int(rel.sum())
    if n_rel == 0:
        return float("nan")
    order, starts, ends = _tie_groups(s)
    r = rel[order].astype(np.float64)
    csum_r = np.concatenate([[0.0], np.cumsum(r)])
    in_top = np.clip(np.minimum(ends, k) - starts, 0, None)  # positions of each group inside top k
    hits = (csum_r[ends] - csum_r[starts]) * in_top / (ends - starts)
    return float(hits.sum() / n_rel)


def kendall_tau(a, b) -> float:
    """Kendall's tau-b between two score vectors of one list (ties in either are corrected).

    tau_b = (C - D) / sqrt((P - T_a) * (P - T_b)), with P all pairs, T_a / T_b the pairs tied
    in a / in b. NaN when either vector is constant. O(n^2) in row blocks: lists are candidate
    lists (tens to a few thousand items).
    """
    x = _as_1d(a, "a")
    y = _as_1d(b, "b")
    _same_length(x, y)
    n = len(x)
    if n < 2:
        return float("nan")
    s = 0.0  # sum over i<j of sign(dx)*sign(dy)
    tx = ty = 0  # pairs tied in x, in y
    block = max(1, 2_000_000 // n)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        dx = np.sign(x[i0:i1, None] - x[None, :])
        dy = np.sign(y[i0:i1, None] - y[None, :])
        upper = np.arange(i0, i1)[:, None] < np.arange(n)[None, :]  # only pairs i < j
        s += float(np.sum((dx * dy)[upper]))
        tx += int(np.sum((dx == 0) & upper))
        ty += int(np.sum((dy == 0) & upper))
    pairs = n * (n - 1) // 2
    denom = np.sqrt(float(pairs - tx) * float(pairs - ty))
    if denom == 0.0:
        return float("nan")
    return float(s / denom)


def candidate_lists(user_id, ts=None, *, bucket_ms: int | None = None, min_size: int = 5) -> list[np.ndarray]:
    """Row indices grouped into candidate lists: by user, or by (user, ts // bucket_ms).

    Lists shorter than ``min_size`` are dropped. Order is deterministic (by key, then row).
    """
    u = _as_1d(user_id, "user_id", np.int64)
    if bucket_ms is not None:
        if ts is None:
            raise ValueError("bucket_ms needs ts")
        if bucket_ms <= 0:
            raise ValueError(f"bucket_ms must be > 0, got {bucket_ms}")
        t = _as_1d(ts, "ts", np.int64)
        _same_length(u, t)
        keys = np.stack([u, t // int(bucket_ms)], axis=1)
    else:
        keys = u[:, None]
    if len(u) == 0:
        return []
    order = np.lexsort(keys.T[::-1])
    ks = keys[order]
    b = np.flatnonzero(np.any(np.diff(ks, axis=0) != 0, axis=1)) + 1
    return [g for g in np.split(order, b) if len(g) >= min_size]


@dataclass(frozen=True)
class GroupedMean:
    value: float  # mean over lists where the metric is defined
    n_lists: int  # lists used
    n_skipped: int  # lists where the metric was undefined (NaN)


def grouped_mean(metric: Callable[..., float], lists: Sequence[np.ndarray], *arrays) -> GroupedMean:
    """Mean of ``metric(*(a[idx] for a in arrays))`` over the lists, skipping NaN results."""
    arrays = [np.asarray(a) for a in arrays]
    if arrays:
        _same_length(*arrays)
    vals = np.array([metric(*(a[idx] for a in arrays)) for idx in lists], dtype=np.float64)
    ok = ~np.isnan(vals)
    value = float(vals[ok].mean()) if ok.any() else float("nan")
    return GroupedMean(value, int(ok.sum()), int((~ok).sum()))


def list_index(groups: np.ndarray) -> np.ndarray:
    """(n_lists, max_len) row indices of each list (the rows of a list are contiguous), -1 padded."""
    g = np.asarray(groups)
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1] if len(g) else np.zeros(0, np.int64)
    lens = np.diff(np.r_[starts, len(g)])
    idx = np.full((len(starts), int(lens.max()) if len(lens) else 0), -1, dtype=np.int64)
    for r, (a, n) in enumerate(zip(starts.tolist(), lens.tolist())):
        idx[r, :n] = np.arange(a, a + n)
    return idx


def within_list_auc(scores: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Mean over lists with a positive and a negative of the AUC inside the list: how well a
    ranker orders each user's candidates (what NDCG rewards), blind to differences between users."""
    out = []
    for row in list_index(groups):
        r = row[row >= 0]
        yy, ss = y[r], scores[r]
        if yy.min() == yy.max():
            continue
        pos, neg = ss[yy > 0], ss[yy <= 0]
        out.append(float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))
    return float(np.mean(out)) if out else 0.5


def within_list_ndcg(scores: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k over lists with a positive: the held-out figure the device path is judged
    by (`ndcg_at_k` per list, tie-aware), for choosing and stopping on validation lists."""
    out = []
    for row in list_index(groups):
        r = row[row >= 0]
        if (y[r] > 0).any():
            out.append(ndcg_at_k(y[r], scores[r], k))
    return float(np.mean(out)) if out else 0.0
