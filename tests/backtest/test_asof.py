"""The as-of store holds, byte for byte, what the server's store holds after a materialisation
and a seen-record bootstrap at the same time."""
from __future__ import annotations

import numpy as np

from backtest.asof import SEEN_SET, AsOfStore
from features.datasets import load_info
from features.eventlog import EventLog
from features.lookup import record_keys
from features.materialize import materialize
from features.online.memory import MemoryStore
from features.repo import feature_sets
from server.seen import bootstrap_seen, seen_key


def test_records_as_of_t_are_the_bytes_materialize_and_bootstrap_seen_write_at_t(small_sim):
    info = load_info(small_sim)
    sets = feature_sets(info.kind, info.n_topics)
    log = EventLog(small_sim / "events")
    events = log.read().deduplicated()
    T = int(np.quantile(events.ts, 0.6))  # mid-log: some entities have no record yet
    store = MemoryStore("asof")
    materialize(log, store, sets, until_ts=T)
    bootstrap_seen(store, lambda: log.read(end_ts=T), info.kind, T, 1000)
    asof = AsOfStore(sets, events, info.kind, seen_cap=1000)
    for fs in sets:
        codes = np.unique(fs.entity.codes(events)[0])
        codes = codes[codes >= 0]
        keys = record_keys(fs, codes)
        got = asof.get_many(keys, {fs.name: T})
        assert got == store.get_many(keys), fs.name
        assert any(r is None for r in got) and any(r is not None for r in got)
    users = np.unique(events.user_id).tolist()
    keys = [seen_key(u) for u in users]
    assert asof.get_many(keys, {SEEN_SET: T}) == store.get_many(keys)
