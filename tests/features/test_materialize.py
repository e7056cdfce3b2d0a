"""Materialisation offline → online: full, incremental, idempotent, consistent with streaming."""
from __future__ import annotations

import numpy as np

from features.eventlog import EventLog
from features.lookup import FeatureLookup
from features.materialize import materialize, stored_watermark
from features.repo import feature_sets
from features.streaming import StreamingIngestor
from features.verify import values_match

SETS = feature_sets("simulated", 20)


def _snapshot(store) -> dict:
    keys = sorted(store.iter_keys(), key=lambda k: (k.feature_set, k.entity_id))
    return dict(zip(keys, store.get_many(keys)))


def _cut(log: EventLog) -> int:
    ev = log.read()
    return int(np.quantile(ev.ts, 0.6))


def test_full_materialisation_is_idempotent(small_sim, online_store):
    log = EventLog(small_sim / "events")
    until = _cut(log)
    first = materialize(log, online_store, SETS, until_ts=until)
    snap = _snapshot(online_store)
    assert sum(r.entities_written for r in first) == len(snap) > 0
    again = materialize(log, online_store, SETS, until_ts=until)  # incremental: nothing new
    assert [r.entities_written for r in again] == [0] * len(SETS)
    materialize(log, online_store, SETS, until_ts=until, full=True)
    assert _snapshot(online_store) == snap
    assert all(stored_watermark(online_store, fs) == until for fs in SETS)


def test_incremental_from_the_watermark_equals_a_full_run(small_sim, online_store):
    from features.online.memory import MemoryStore

    log = EventLog(small_sim / "events")
    until = _cut(log)
    end = log.max_ts() + 1
    materialize(log, online_store, SETS, until_ts=until)
    inc = materialize(log, online_store, SETS, until_ts=end)
    assert {r.mode for r in inc} == {"incremental"}
    full_store = MemoryStore("full")
    full = materialize(log, full_store, SETS, until_ts=end)
    assert sum(r.entities_written for r in inc) < sum(r.entities_written for r in full)
    assert _snapshot(online_store) == _snapshot(full_store)


def test_streaming_on_top_of_a_materialisation_matches_batch(small_sim, online_store):
    """The lambda hand-off: batch up to the watermark, stream after it, same numbers."""
    log = EventLog(small_sim / "events")
    ev = log.read()
    until = _cut(log)
    materialize(log, online_store, SETS, until_ts=until)
    ing = StreamingIngestor(online_store, SETS)
    r = ing.ingest(ev)  # the whole log redelivered: what the materialisation holds is never applied twice
    in_window = int(((ev.ts >= until - 3_600_000) & (ev.ts < until)).sum())
    assert r.accepted == int((ev.ts >= until).sum())  # applied: only what came after the watermark
    assert r.duplicates == in_window  # marked by the materialisation
    assert r.late == len(ev) - r.accepted - in_window  # older than its horizon: refused and reported, never silently skipped
    assert ing.dead_letters.count == r.late
    t = int(ev.ts.max()) + 1
    lookup = FeatureLookup(online_store, SETS)
    from features.batch import BatchEngine
    from features.state import StateLayout

    for fs in SETS:
        eng = BatchEngine(StateLayout(fs), ev)
        online = lookup.read(fs.name, eng.entities, t).frame
        batch = eng.features_asof(eng.entities, np.full(len(eng.entities), t))
        assert values_match(online.values, batch.values).all(), fs.name
        assert (online.missing == batch.missing).all()
