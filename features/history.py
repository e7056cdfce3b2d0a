"""A user's engagement history: the last items they engaged with, as of a time.

One definition for every path that needs it:

- what counts as engagement (`engagement_mask`): a play or a like on the video platform, a
  rating >= 4 on MovieLens;
- the record (`last_distinct`): the last `cap` DISTINCT item ids, most recent last; an item
  engaged with again moves to the end; events are taken in (ts, event_id) order;
- as of t (`history_at`): only events with ts < t, strictly before, like every feature.

The server's seen-items record (server.seen) is `last_distinct` over the log plus live events;
training rows and the offline evaluation get their histories from `history_at`, so the user
tower sees the same item list in training, in `parity eval` and on the server
(tests/features/test_history.py checks the two agree). Pure numpy.
"""
from __future__ import annotations

from itertools import islice

import numpy as np

from features.events import EventBatch, EventType

__all__ = ["HISTORY_LEN", "PAD", "ENGAGEMENT", "engagement_mask", "last_distinct", "history_row", "history_at"]

HISTORY_LEN = 50  # items per user the user tower reads (the server's seen record keeps more)
PAD = -1  # item id of an empty history slot


# kind -> (event types that engage, the least value that counts, None = any): the one rule, also
# shipped to devices (export/device) so a phone builds the same history from what it records
ENGAGEMENT: dict[str, tuple[tuple[int, ...], float | None]] = {
    "simulated": ((int(EventType.PLAY), int(EventType.LIKE)), None),
    "movielens": ((int(EventType.RATING),), 4.0),
}


def engagement_mask(events: EventBatch, kind: str) -> np.ndarray:
    """What counts as engagement (and as seen): plays and likes; ratings >= 4 on MovieLens."""
    types, min_value = ENGAGEMENT["movielens" if kind == "movielens" else "simulated"]
    m = np.isin(events.type, types)
    return m & (events.value >= min_value) if min_value is not None else m


def last_distinct(items: np.ndarray, cap: int) -> np.ndarray:
    """The last `cap` distinct ids of a time-ordered id sequence, most recent last."""
    items = np.asarray(items, dtype=np.int64)
    _, last = np.unique(items[::-1], return_index=True)  # first occurrence from the end = most recent
    keep = np.sort(len(items) - 1 - last)
    return items[keep][-cap:] if cap > 0 else items[:0]


def history_row(items: np.ndarray, n: int) -> np.ndarray:
    """(n,) int64: the last n of a distinct, time-ordered id list, right-aligned, PAD in front."""
    items = np.asarray(items, dtype=np.int64).reshape(-1)[-n:] if n > 0 else np.empty(0, np.int64)
    out = np.full(n, PAD, dtype=np.int64)
    if len(items):
        out[n - len(items):] = items
    return out


def history_at(events: EventBatch, kind: str, user_ids: np.ndarray, ts: np.ndarray | int, n: int = HISTORY_LEN) -> np.ndarray:
    """(rows, n) int64 item ids: each (user, t)'s last n distinct engaged items with ts < t,
    most recent last, right-aligned, PAD in front (exactly `history_row(last_distinct(...))`)."""
    user_ids = np.asarray(user_ids, dtype=np.int64).reshape(-1)
    t = np.broadcast_to(np.asarray(ts, dtype=np.int64), user_ids.shape)
    out = np.full((len(user_ids), n), PAD, dtype=np.int64)
    if len(user_ids) == 0 or n == 0:
        return out
    ev = events.take(np.flatnonzero(engagement_mask(events, kind))).sorted()
    order = np.argsort(ev.user_id, kind="stable")  # per user, in (ts, event_id) order
    eu, et, ei = ev.user_id[order], ev.ts[order], ev.item_id[order]
    users, starts = np.unique(eu, return_index=True)
    ends = np.r_[starts[1:], len(eu)].astype(np.int64)
    q = np.lexsort((t, user_ids))
    qu = user_ids[q]
    q_users, q_starts = np.unique(qu, return_index=True)
    q_ends = np.r_[q_starts[1:], len(q)]
    pos_of = np.searchsorted(users, q_users)
    for uu, qa, qb, p in zip(q_users.tolist(), q_starts.tolist(), q_ends.tolist(), pos_of.tolist()):
        if p >= len(users) or users[p] != uu:
            continue  # no engagement at all: every row stays empty
        a, b = int(starts[p]), int(ends[p])
        rows = q[qa:qb]  # this user's queries in time order
        upto = np.searchsorted(et[a:b], t[rows], side="left")  # events strictly before each t
        items = ei[a:b].tolist()
        seen: dict[int, None] = {}
        j, last_k, snap = 0, -1, None
        for r, k in zip(rows.tolist(), upto.tolist()):
            if k != last_k:
                while j < k:
                    it = items[j]
                    seen.pop(it, None)
                    seen[it] = None
                    j += 1
                snap = list(islice(reversed(seen), n))[::-1]
                last_k = k
            if snap:
                out[r, n - len(snap):] = snap
    return out
