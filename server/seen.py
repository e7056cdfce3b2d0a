"""Items a user has engaged with, kept in the online store so every replica filters them.

The offline evaluation removes a user's seen items (plays and likes; ratings >= 4 for
MovieLens) from the candidates; serving must do the same. The feature sets hold aggregates,
not item lists, so the server keeps one small record per user beside them:
`{ns}:user_seen:v1:user:{user_id}` holding the most recent `cap` item ids as little-endian
int64. It is filled from the event log at start-up (`bootstrap_seen`, once per log end) and
appended to by live events (`append_seen`). Adding an id twice is harmless, so both are
idempotent and safe under at-least-once delivery. What counts as seen and how the record is
kept are `features.history`'s, so the record's last items are the user tower's history input,
the same list training built for the user as of the same time.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Mapping, Sequence

import numpy as np

from features.events import EventBatch
from features.history import engagement_mask, last_distinct
from features.online.base import OnlineStore, RecordKey, Write

__all__ = ["SEEN_SET", "SEEN_VERSION", "seen_key", "decode_seen", "encode_seen", "engagement_mask", "append_seen", "bootstrap_seen"]

log = logging.getLogger(__name__)

SEEN_SET = "user_seen"
SEEN_VERSION = "v1"
SEEN_TTL_MS = 90 * 86_400_000
_META = f"seen:{SEEN_VERSION}:until"


def seen_key(user_id: int) -> RecordKey:
    return RecordKey(SEEN_SET, SEEN_VERSION, "user", str(int(user_id)))


def decode_seen(raw: bytes | None) -> np.ndarray:
    if not raw or len(raw) % 8:
        return np.empty(0, dtype=np.int64)
    return np.frombuffer(raw, dtype="<i8").astype(np.int64)


def encode_seen(items: np.ndarray, cap: int) -> bytes:
    """The last `cap` distinct ids, most recent last (a re-seen item moves to the end):
    `features.history.last_distinct`, the rule training histories follow too."""
    return np.ascontiguousarray(last_distinct(items, cap), dtype="<i8").tobytes()


def _grouped(events: EventBatch, kind: str) -> Mapping[int, np.ndarray]:
    m = engagement_mask(events, kind)
    ev = events.take(np.flatnonzero(m)).sorted()
    out: dict[int, np.ndarray] = {}
    if len(ev) == 0:
        return out
    order = np.argsort(ev.user_id, kind="stable")
    users, starts = np.unique(ev.user_id[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    for u, a, b in zip(users.tolist(), starts.tolist(), bounds):
        out[u] = ev.item_id[order[a:b]]
    return out


def append_seen(store: OnlineStore, events: EventBatch, kind: str, cap: int) -> int:
    """Add the engagement events' items to their users' records (one read, one commit)."""
    per_user = _grouped(events, kind)
    if not per_user:
        return 0
    users = sorted(per_user)
    keys = [seen_key(u) for u in users]
    raw = store.get_many(keys)
    writes = [Write(k, encode_seen(np.concatenate([decode_seen(r), per_user[u]]), cap), SEEN_TTL_MS) for k, u, r in zip(keys, users, raw)]
    store.commit(writes)
    return len(writes)


def bootstrap_seen(store: OnlineStore, read_events: Callable[[], EventBatch], kind: str, until_ts: int, cap: int, *, chunk: int = 2000) -> int:
    """Write every user's seen record from the log (events with ts < until_ts), once per log end.
    `read_events` is called only when the store has not been filled up to until_ts yet."""
    done = store.get_meta(_META)
    if done is not None and int(json.loads(done)["until_ts"]) >= until_ts:
        return 0
    events = read_events()
    ev = events.take(np.flatnonzero(events.ts < until_ts))
    per_user = _grouped(ev, kind)
    users = sorted(per_user)
    written = 0
    for a in range(0, len(users), chunk):
        part = users[a : a + chunk]
        keys = [seen_key(u) for u in part]
        raw = store.get_many(keys)  # keep what live events added since
        writes: Sequence[Write] = [Write(k, encode_seen(np.concatenate([per_user[u], decode_seen(r)]), cap), SEEN_TTL_MS)
                                   for k, u, r in zip(keys, part, raw)]
        store.commit(writes)
        written += len(writes)
    store.set_meta(_META, json.dumps({"until_ts": int(until_ts)}))
    log.info("seen items: %d users written from the log (ts < %d)", written, until_ts)
    return written
