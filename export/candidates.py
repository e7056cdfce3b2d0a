"""Candidate generation, one function for the server and the offline evaluation.

Both used to carry their own copy and the copies had drifted apart (eval took popular items
as of its cut from the event log and left out new items; the server took the release's
popularity list and added new items by their content embedding). Now `candidate_union` is the
rule and `CandidatePolicy` its numbers, torch-free and below both: the server's config builds
its policy from these defaults and `parity eval` reads the same defaults.

Sources, in priority order (the first to name an item keeps it): the two-tower's ANN
neighbours, the item-item model's best items for the user's history (`features.item_item`;
a release chooses its quota on validation and writes it in its manifest, see
`models.candidates.choose_quotas`), new items (in the catalogue, never seen by the release)
by their content embedding, items published within `fresh_window_ms`, popular items. Every
source keeps only eligible items (in the catalogue, published before the request, not seen or
excluded) up to its quota; the merge is `features.candidate_sources.union_sources`, which the
rankers' training lists (models.candidates) call too.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np

from export.runtime import ReleaseRuntime
from features.candidate_sources import SOURCES, CandidatePolicy, SourceList, fresh_ids, item_item_top, union_sources
from features.catalog import ItemCatalog
from features.sorted_lookup import sorted_positions

__all__ = ["SOURCES", "CandidatePolicy", "NewItems", "Candidates", "candidate_union", "ann_want", "candidate_scores", "fresh_ids"]

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


def candidate_union(rt: ReleaseRuntime, user_emb: np.ndarray, catalog: ItemCatalog, new: NewItems, blocked: np.ndarray, now_ms: int,
                    policy: CandidatePolicy, *, ann_ids: np.ndarray | None = None, exact: bool = False,
                    history: np.ndarray | None = None, popular: np.ndarray | None = None,
                    stage: Callable[[str], ContextManager] | None = None) -> Candidates:
    """The request's candidates. `user_emb` (d,) or (1, d); `blocked` the seen and excluded items;
    `ann_ids`: this user's ANN neighbours when the caller retrieved a batch at once (eval);
    `history`: the user's last engaged items (PAD = -1), read by the item-item source;
    `popular`: the popular list to use instead of the release's (eval: as of the user's cut)."""
    stage = stage or (lambda _name: nullcontext())
    emb = np.asarray(user_emb, dtype=np.float32).reshape(1, -1)
    blocked = np.asarray(blocked, dtype=np.int64)
    sources: list[SourceList] = []
    with stage("ann"):
        if ann_ids is None:
            want = ann_want(rt, policy, len(blocked))
            ann_ids = (rt.retrieve_exact(emb, want) if exact else rt.retrieve(emb, want))[0][0]
        sources.append(SourceList(ann_ids, 0, policy.retrieve_k))
        if policy.n_item_item and rt.item_item is not None and history is not None:
            sources.append(SourceList(item_item_top(rt.item_item, history, policy.n_item_item, blocked), SOURCES.index("item_item"),
                                      policy.n_item_item))
    with stage("cold_start"):
        if policy.n_content and len(new.ids):
            order = np.argsort(-(new.emb @ emb[0]), kind="stable")
            sources.append(SourceList(new.ids[order], 1, policy.n_content))
        if policy.n_fresh:
            sources.append(SourceList(fresh_ids(catalog, now_ms, policy.fresh_window_ms), 2, policy.n_fresh))
        if policy.n_popular:
            pop = rt.popular if popular is None else popular
            sources.append(SourceList(pop[: policy.n_popular + len(blocked) + 50], 3, policy.n_popular))
        ids, src = union_sources(sources, catalog, blocked, now_ms)
    return Candidates(ids, src)


def candidate_scores(rt: ReleaseRuntime, new: NewItems, user_emb: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Two-tower scores of candidates: release items by their item embedding, new items by their
    content embedding, NaN for items with neither."""
    s = rt.item_scores(user_emb, ids)
    miss = np.isnan(s)
    if miss.any() and len(new.ids):
        pos = sorted_positions(new.ids, ids)
        hit = miss & (new.ids[pos] == ids)
        if hit.any():
            s[hit] = new.emb[pos[hit]].astype(np.float32) @ np.asarray(user_emb, dtype=np.float32).reshape(-1)
    return s
