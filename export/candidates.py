"""Candidate generation, one function for the server and the offline evaluation.

Both used to carry their own copy and the copies had drifted apart (eval took popular items
as of its cut from the event log and left out new items; the server took the release's
popularity list and added new items by their content embedding). Now `candidate_union` is the
rule and `CandidatePolicy` its numbers, torch-free and below both: the server's config builds
its policy from these defaults and `parity eval` reads the same defaults.

Sources, in priority order (the first to name an item keeps it): the two-tower's ANN
neighbours, new items (in the catalogue, never seen by the release) by their content
embedding, items published within `fresh_window_ms`, the release's popular items. Every
source keeps only eligible items (in the catalogue, published before the request, not seen or
excluded) up to its quota.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Callable, ContextManager

import numpy as np

from export.runtime import ReleaseRuntime
from features.catalog import ItemCatalog

__all__ = ["SOURCES", "CandidatePolicy", "NewItems", "Candidates", "candidate_union", "ann_want", "candidate_scores", "fresh_ids"]

SOURCES = ("ann", "content", "fresh", "popular", "request")  # index = Candidates.source code
_DAY_MS = 86_400_000


@dataclass(frozen=True)
class CandidatePolicy:
    """How many candidates each source contributes (the server's defaults; eval uses them too)."""

    retrieve_k: int = 200  # ANN candidates kept after filtering
    n_content: int = 20  # new items (not in the release) by their content embedding
    n_fresh: int = 20  # most recently published items
    fresh_window_ms: int = 2 * _DAY_MS
    n_popular: int = 50  # the release's popular items (cold start)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{f.name} must be a non-negative integer, got {v!r}")
        if self.retrieve_k < 1:
            raise ValueError(f"retrieve_k must be at least 1, got {self.retrieve_k}")


@dataclass(frozen=True)
class NewItems:
    """Catalogue items the release has never seen, with their content-path embeddings."""

    ids: np.ndarray  # int64, sorted
    emb: np.ndarray  # (m, d) float32

    @classmethod
    def of(cls, rt: ReleaseRuntime, catalog: ItemCatalog) -> "NewItems":
        ids = np.setdiff1d(catalog.item_id, rt.vocab) if len(catalog) else np.empty(0, dtype=np.int64)
        if len(ids):
            emb = np.ascontiguousarray(rt.content_embeddings(catalog, ids), dtype=np.float32)
        else:
            emb = np.empty((0, rt.item_embeddings.shape[1]), dtype=np.float32)
        return cls(ids.astype(np.int64), emb)


@dataclass(frozen=True)
class Candidates:
    ids: np.ndarray  # int64
    source: np.ndarray  # int8 index into SOURCES


def ann_want(rt: ReleaseRuntime, policy: CandidatePolicy, n_blocked: int) -> int:
    """How many ANN neighbours to fetch so `retrieve_k` survive the filter."""
    return min(len(rt.vocab), policy.retrieve_k + n_blocked + 50)


def fresh_ids(catalog: ItemCatalog, now_ms: int, window_ms: int) -> np.ndarray:
    """Items published in [now - window, now), newest first (ties by id)."""
    if not len(catalog) or window_ms <= 0:
        return np.empty(0, dtype=np.int64)
    rows = np.flatnonzero((catalog.publish_ts < now_ms) & (catalog.publish_ts >= now_ms - window_ms))
    rows = rows[np.lexsort((catalog.item_id[rows], -catalog.publish_ts[rows]))]
    return catalog.item_id[rows]


def _member(ids: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """np.isin(ids, sorted_unique) for a sorted array of distinct ids (one binary search each)."""
    if not len(sorted_unique):
        return np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_unique, ids), len(sorted_unique) - 1)
    return sorted_unique[pos] == ids


def _eligible(catalog: ItemCatalog, ids: np.ndarray, blocked: np.ndarray, now_ms: int) -> np.ndarray:
    """`blocked` sorted and distinct (candidate_union makes it so)."""
    rows = catalog.index(ids) if len(catalog) else np.full(len(ids), -1, dtype=np.int64)
    known = rows >= 0
    ok = known & (np.where(known, catalog.publish_ts[np.maximum(rows, 0)], now_ms) < now_ms) if len(catalog) else known
    if len(blocked):
        ok &= ~_member(ids, blocked)
    return ok


def _take(catalog: ItemCatalog, ids: np.ndarray, blocked: np.ndarray, now_ms: int, quota: int) -> np.ndarray:
    if quota <= 0 or not len(ids):
        return np.empty(0, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    return ids[_eligible(catalog, ids, blocked, now_ms)][:quota]


def candidate_union(rt: ReleaseRuntime, user_emb: np.ndarray, catalog: ItemCatalog, new: NewItems, blocked: np.ndarray, now_ms: int,
                    policy: CandidatePolicy, *, ann_ids: np.ndarray | None = None, exact: bool = False,
                    stage: Callable[[str], ContextManager] | None = None) -> Candidates:
    """The request's candidates. `user_emb` (d,) or (1, d); `blocked` the seen and excluded items;
    `ann_ids`: this user's ANN neighbours when the caller retrieved a batch at once (eval)."""
    stage = stage or (lambda _name: nullcontext())
    emb = np.asarray(user_emb, dtype=np.float32).reshape(1, -1)
    blocked = np.asarray(blocked, dtype=np.int64)
    lookup = np.unique(blocked)  # sorted and distinct: _eligible's lookups are binary searches
    parts: list[tuple[np.ndarray, int]] = []
    with stage("ann"):
        if ann_ids is None:
            want = ann_want(rt, policy, len(blocked))
            ann_ids = (rt.retrieve_exact(emb, want) if exact else rt.retrieve(emb, want))[0][0]
        parts.append((_take(catalog, ann_ids, lookup, now_ms, policy.retrieve_k), 0))
    with stage("cold_start"):
        if policy.n_content and len(new.ids):
            order = np.argsort(-(new.emb @ emb[0]), kind="stable")
            parts.append((_take(catalog, new.ids[order], lookup, now_ms, policy.n_content), 1))
        if policy.n_fresh:
            parts.append((_take(catalog, fresh_ids(catalog, now_ms, policy.fresh_window_ms), lookup, now_ms, policy.n_fresh), 2))
        if policy.n_popular:
            pop = rt.popular[: policy.n_popular + len(blocked) + 50]
            parts.append((_take(catalog, pop, lookup, now_ms, policy.n_popular), 3))
    ids = np.concatenate([p for p, _ in parts]).astype(np.int64)
    src = np.concatenate([np.full(len(p), s, dtype=np.int8) for p, s in parts])
    _, first = np.unique(ids, return_index=True)  # the first source listed wins
    keep = np.sort(first)
    return Candidates(ids[keep], src[keep])


def candidate_scores(rt: ReleaseRuntime, new: NewItems, user_emb: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Two-tower scores of candidates: release items by their item embedding, new items by their
    content embedding, NaN for items with neither."""
    s = rt.item_scores(user_emb, ids)
    miss = np.isnan(s)
    if miss.any() and len(new.ids):
        pos = np.clip(np.searchsorted(new.ids, ids), 0, len(new.ids) - 1)
        hit = miss & (new.ids[pos] == ids)
        if hit.any():
            s[hit] = new.emb[pos[hit]].astype(np.float32) @ np.asarray(user_emb, dtype=np.float32).reshape(-1)
    return s
