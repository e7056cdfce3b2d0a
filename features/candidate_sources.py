"""The candidate rule's core: ranked source lists in, one deduplicated candidate list out.

Torch-free and below every user of it, so the server and `parity eval` (through
`export.candidates.candidate_union`, which builds the sources from a release) and the rankers'
training lists (`models.candidates`, which builds them from a torch tower) merge their sources
with the same code: a ranker then learns to order what retrieval actually hands it.

Each source is a ranked list of item ids (best first) and a quota. A source keeps its first
`quota` eligible items (in the catalogue, published before the request, not blocked); the
union lists the sources in priority order and the first source to name an item keeps it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Mapping, Sequence

import numpy as np

from features.catalog import ItemCatalog
from features.item_item import ItemItem

__all__ = ["SOURCES", "CandidatePolicy", "SourceList", "union_sources", "fresh_ids", "member", "item_item_top"]

SOURCES = ("ann", "content", "fresh", "popular", "request", "item_item")  # index = source code (append only: served logs keep codes)

_DAY_MS = 86_400_000


@dataclass(frozen=True)
class CandidatePolicy:
    """How many candidates each source contributes (the server's defaults; eval uses them too)."""

    retrieve_k: int = 200  # ANN candidates kept after filtering
    n_content: int = 20  # new items (not in the release) by their content embedding
    n_fresh: int = 20  # most recently published items
    fresh_window_ms: int = 2 * _DAY_MS
    n_popular: int = 50  # the release's popular items (cold start)
    n_item_item: int = 0  # the item-item model's best items for the user's history (a release sets its own: manifest "candidates")

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{f.name} must be a non-negative integer, got {v!r}")
        if self.retrieve_k < 1:
            raise ValueError(f"retrieve_k must be at least 1, got {self.retrieve_k}")

    def for_release(self, quotas: Mapping[str, int]) -> "CandidatePolicy":
        """This policy with the quotas a release chose on its validation split (manifest
        retrieval.candidates; `ReleaseManifest.candidates`). A release without them keeps these."""
        return dataclasses.replace(self, **quotas) if quotas else self


@dataclass(frozen=True)
class SourceList:
    ids: np.ndarray  # int64 item ids, best first
    source: int  # index into SOURCES
    quota: int  # how many eligible items it may contribute


def member(ids: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """np.isin(ids, sorted_unique) for a sorted array of distinct ids (one binary search each)."""
    if not len(sorted_unique):
        return np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_unique, ids), len(sorted_unique) - 1)
    return sorted_unique[pos] == ids


def _eligible(catalog: ItemCatalog, ids: np.ndarray, blocked: np.ndarray, now_ms: int) -> np.ndarray:
    """`blocked` sorted and distinct (union_sources makes it so)."""
    rows = catalog.index(ids) if len(catalog) else np.full(len(ids), -1, dtype=np.int64)
    known = rows >= 0
    ok = known & (np.where(known, catalog.publish_ts[np.maximum(rows, 0)], now_ms) < now_ms) if len(catalog) else known
    if len(blocked):
        ok &= ~member(ids, blocked)
    return ok


def _take(catalog: ItemCatalog, ids: np.ndarray, blocked: np.ndarray, now_ms: int, quota: int) -> np.ndarray:
    if quota <= 0 or not len(ids):
        return np.empty(0, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    return ids[_eligible(catalog, ids, blocked, now_ms)][:quota]


def union_sources(sources: Sequence[SourceList], catalog: ItemCatalog, blocked: np.ndarray, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, source codes int8): each source's first `quota` eligible items, sources in the
    order given, an item kept where it is first named. `blocked`: seen and excluded ids, in any
    order, with repeats."""
    lookup = np.unique(np.asarray(blocked, dtype=np.int64))  # sorted and distinct: lookups are binary searches
    parts = [(_take(catalog, s.ids, lookup, now_ms, s.quota), s.source) for s in sources]
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int8)
    ids = np.concatenate([p for p, _ in parts]).astype(np.int64)
    src = np.concatenate([np.full(len(p), s, dtype=np.int8) for p, s in parts])
    _, first = np.unique(ids, return_index=True)  # the first source listed wins
    keep = np.sort(first)
    return ids[keep], src[keep]


def fresh_ids(catalog: ItemCatalog, now_ms: int, window_ms: int) -> np.ndarray:
    """Items published in [now - window, now), newest first (ties by id)."""
    if not len(catalog) or window_ms <= 0:
        return np.empty(0, dtype=np.int64)
    rows = np.flatnonzero((catalog.publish_ts < now_ms) & (catalog.publish_ts >= now_ms - window_ms))
    rows = rows[np.lexsort((catalog.item_id[rows], -catalog.publish_ts[rows]))]
    return catalog.item_id[rows]


def item_item_top(model: ItemItem | None, history: np.ndarray, n: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """The item-item source: the model's n best items for a history (`ItemItem.top`: nonzero
    scores, the history's own items and `exclude` left out, best first, ties by id)."""
    if model is None or n <= 0:
        return np.empty(0, dtype=np.int64)
    return np.asarray(model.top(np.asarray(history, dtype=np.int64).reshape(-1), n, exclude=exclude)[0], dtype=np.int64)
