"""The popularity baseline and cold-start list: engagement counts, optionally decayed.

Pure numpy. Engagement: plays and likes (video) or ratings >= 4 (MovieLens), before `until`.
"""
from __future__ import annotations

import numpy as np

from features.events import EventBatch
from features.history import engagement_mask

__all__ = ["popularity", "popularity_at", "engagement_mask"]


def popularity(events: EventBatch, kind: str, until_ts: int, *, half_life_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(item ids most popular first, scores). Ties break by item id for determinism."""
    m = engagement_mask(events, kind) & (events.ts < until_ts)
    items, ts = events.item_id[m], events.ts[m]
    w = np.ones(len(items)) if half_life_ms is None else np.exp2(-(until_ts - ts) / half_life_ms)
    uniq, inv = np.unique(items, return_inverse=True)
    score = np.bincount(inv, weights=w, minlength=len(uniq))
    order = np.lexsort((uniq, -score))
    return uniq[order], score[order]


def popularity_at(events: EventBatch, kind: str, times: np.ndarray, *, half_life_ms: int | None = None, n: int | None = None) -> dict[int, np.ndarray]:
    """{t: item ids most popular as of t (first `n`)} for many times at once: the same order as
    `popularity(events, kind, t)` (exact counts; with a half-life the decayed sums, carried from
    one time to the next), in one pass over the engagements instead of one per time. The
    candidate lists of per-user cuts (models.candidates) ask for hundreds of times."""
    m = engagement_mask(events, kind)
    order = np.argsort(events.ts[m], kind="stable")
    items, ts = events.item_id[m][order], events.ts[m][order]
    uniq, inv = np.unique(items, return_inverse=True)
    score = np.zeros(len(uniq))
    out: dict[int, np.ndarray] = {}
    pos, prev = 0, None
    for t in np.unique(np.asarray(times, dtype=np.int64)).tolist():
        end = int(np.searchsorted(ts, t, side="left"))  # events with ts < t
        if half_life_ms is None:
            np.add.at(score, inv[pos:end], 1.0)
        else:
            if prev is not None:
                score *= np.exp2(-(t - prev) / half_life_ms)
            np.add.at(score, inv[pos:end], np.exp2(-(t - ts[pos:end]) / half_life_ms))
        pos, prev = end, t
        seen = score > 0
        ids, sc = uniq[seen], score[seen]
        out[t] = ids[np.lexsort((ids, -sc))][:n]
    return out
