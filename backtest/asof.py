"""The online store as of a past time: the record bytes a server would have read, had the store
last been written at T.

A backtest must hand the server's read path the bytes it would really have read, not feature
values computed some other way. For a feature set, the bytes of an entity's record as of T are
what `features.materialize` writes at T: the batch engine's state as of T (events with ts < T,
`BatchEngine.states_asof`) packed by the set's `StateLayout.encode`, and no record at all for an
entity with no event before T or whose state is older than the set's TTL. The seen record
(server/seen.py) as of T is `encode_seen` of the user's engaged items before T, absent for a
user who engaged with nothing yet, as `bootstrap_seen` leaves it.

The server reads these records at its own request time t >= T (`UserFeaturePlan.decode`,
`ItemTable.features`), so over the gap t - T windows roll and decayed sums decay exactly as they
do for a record that has not been refreshed since T: that gap is the staleness being priced.

Pure numpy over an in-memory event log; no store, no network.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from features.batch import BatchEngine
from features.definitions import FeatureSet
from features.events import EventBatch
from features.history import engagement_mask
from features.online.base import RecordKey
from features.state import StateLayout
from server.seen import SEEN_SET, encode_seen

__all__ = ["SEEN_SET", "AsOfStore"]


class AsOfStore:
    """Records of the given feature sets and of the seen record, as of any time T.

    `events` should be the deduplicated log (the batch engine deduplicates too). One batch
    engine per set is built once; each query is a handful of binary searches per entity."""

    def __init__(self, sets: Sequence[FeatureSet], events: EventBatch, kind: str, seen_cap: int) -> None:
        self.sets = {fs.name: fs for fs in sets}
        self.layouts = {fs.name: StateLayout(fs) for fs in sets}
        self.engines = {fs.name: BatchEngine(self.layouts[fs.name], events) for fs in sets}
        self.seen_cap = seen_cap
        ev = events.take(np.flatnonzero(engagement_mask(events, kind))).sorted()  # (ts, event_id) order
        order = np.argsort(ev.user_id, kind="stable")
        u, self._seen_ts, self._seen_items = ev.user_id[order], ev.ts[order], ev.item_id[order]
        self._seen_users, starts = np.unique(u, return_index=True)
        self._seen_bounds = np.r_[starts, len(u)].astype(np.int64)

    def set_records(self, name: str, codes: np.ndarray, as_of: int) -> list[bytes | None]:
        """The records of feature set `name` for entity codes, as materialised at `as_of`."""
        fs, lay = self.sets[name], self.layouts[name]
        codes = np.asarray(codes, dtype=np.int64)
        if not len(codes):
            return []
        states = self.engines[name].states_asof(codes, np.full(len(codes), int(as_of), dtype=np.int64))
        alive = states["feature_ts"] >= int(as_of) - fs.ttl_ms  # materialize writes nothing for an expired or empty state
        raw = lay.encode(states)
        return [r if a else None for r, a in zip(raw, alive.tolist())]

    def seen_record(self, user_id: int, as_of: int) -> bytes | None:
        """The user's seen record as `bootstrap_seen` would have written it at `as_of`."""
        p = int(np.searchsorted(self._seen_users, user_id))
        if p >= len(self._seen_users) or self._seen_users[p] != user_id:
            return None
        a, b = int(self._seen_bounds[p]), int(self._seen_bounds[p + 1])
        k = int(np.searchsorted(self._seen_ts[a:b], int(as_of), side="left"))  # engaged strictly before as_of
        return encode_seen(self._seen_items[a : a + k], self.seen_cap) if k else None

    def get_many(self, keys: Sequence[RecordKey], as_of: Mapping[str, int]) -> list[bytes | None]:
        """Values in key order, each set's as of its own time `as_of[set]` (keys of the seen
        record under SEEN_SET): what `OnlineStore.get_many` would have answered."""
        out: list[bytes | None] = [None] * len(keys)
        by_set: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            by_set.setdefault(k.feature_set, []).append(i)
        for name, idx in by_set.items():
            if name == SEEN_SET:
                for i in idx:
                    out[i] = self.seen_record(int(keys[i].entity_id), as_of[name])
                continue
            if name not in self.sets:
                raise KeyError(f"no feature set {name!r} in the backtest's store (it has {', '.join(sorted(self.sets))})")
            ent = self.sets[name].entity
            codes = np.fromiter((ent.parse_key_id(keys[i].entity_id) for i in idx), dtype=np.int64, count=len(idx))
            for i, r in zip(idx, self.set_records(name, codes, as_of[name])):
                out[i] = r
        return out
