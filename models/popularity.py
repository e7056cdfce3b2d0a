"""The popularity baseline and cold-start list: engagement counts, optionally decayed.

Pure numpy. Engagement: plays and likes (video) or ratings >= 4 (MovieLens), before `until`.
"""
from __future__ import annotations

import numpy as np

from features.events import EventBatch
from features.history import engagement_mask

__all__ = ["popularity", "engagement_mask"]


def popularity(events: EventBatch, kind: str, until_ts: int, *, half_life_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(item ids most popular first, scores). Ties break by item id for determinism."""
    m = engagement_mask(events, kind) & (events.ts < until_ts)
    items, ts = events.item_id[m], events.ts[m]
    w = np.ones(len(items)) if half_life_ms is None else np.exp2(-(until_ts - ts) / half_life_ms)
    uniq, inv = np.unique(items, return_inverse=True)
    score = np.bincount(inv, weights=w, minlength=len(uniq))
    order = np.lexsort((uniq, -score))
    return uniq[order], score[order]
