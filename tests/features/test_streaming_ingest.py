"""Streaming ingest against both online backends: exactly-once effect, lateness, TTL."""
from __future__ import annotations

import numpy as np
import pytest

from features.definitions import Agg, Entity, Feature, FeatureSet, Source, Window
from features.events import MS_PER_HOUR, EventBatch, EventType
from features.lookup import FeatureLookup, record_keys
from features.streaming import MemoryDeadLetters, StreamingIngestor

T0 = 1_760_000_000_000 - (1_760_000_000_000 % MS_PER_HOUR)
PLAYS = Source("plays", (EventType.PLAY,), "value")
SET = FeatureSet(
    "u",
    Entity("user", ("user_id",)),
    (PLAYS,),
    (
        Feature("plays_2h", Agg.COUNT, "plays", window=Window(2 * MS_PER_HOUR, MS_PER_HOUR)),
        Feature("watch_2h", Agg.SUM, "plays", window=Window(2 * MS_PER_HOUR, MS_PER_HOUR)),
    ),
    ttl_ms=3 * MS_PER_HOUR,
)


def _ev(eid: int, ts: int, user: int = 1, value: float = 10.0) -> dict:
    return {"event_id": eid, "ts": ts, "user_id": user, "item_id": 7, "type": EventType.PLAY, "value": value}


def _read(store, t, users=(1,)):
    return FeatureLookup(store, [SET]).read("u", list(users), t)


def test_duplicates_within_and_across_batches_are_applied_once(online_store):
    ing = StreamingIngestor(online_store, [SET])
    r1 = ing.ingest(EventBatch.from_rows([_ev(1, T0), _ev(1, T0), _ev(2, T0 + 1)]))
    r2 = ing.ingest(EventBatch.from_rows([_ev(2, T0 + 1), _ev(3, T0 + 2)]))
    assert (r1.accepted, r1.duplicates, r2.accepted, r2.duplicates) == (2, 1, 1, 1)
    res = _read(online_store, T0 + 10)
    assert res.frame.column("plays_2h").tolist() == [3.0]
    assert res.frame.column("watch_2h").tolist() == [30.0]


def test_events_later_than_the_allowed_lateness_go_to_dead_letters_and_are_counted(online_store):
    dl = MemoryDeadLetters()
    ing = StreamingIngestor(online_store, [SET], allowed_lateness_ms=MS_PER_HOUR, dead_letters=dl)
    ing.ingest(EventBatch.from_rows([_ev(1, T0 + 2 * MS_PER_HOUR)]))
    r = ing.ingest(EventBatch.from_rows([_ev(2, T0 + MS_PER_HOUR), _ev(3, T0 + MS_PER_HOUR - 1)]))
    assert (r.accepted, r.late) == (1, 1)
    assert dl.count == 1 and dl.batches[0][0].event_id.tolist() == [3]
    assert ing.stats().late == 1
    again = ing.ingest(EventBatch.from_rows([_ev(3, T0 + MS_PER_HOUR - 1)]))  # redelivered dead letter
    assert again.duplicates == 1 and dl.count == 1
    assert _read(online_store, T0 + 2 * MS_PER_HOUR + 1).frame.column("plays_2h").tolist() == [2.0]


def test_a_restarted_ingestor_resumes_from_the_stored_watermark_and_dedupe(online_store):
    StreamingIngestor(online_store, [SET]).ingest(EventBatch.from_rows([_ev(1, T0 + 5 * MS_PER_HOUR)]))
    fresh = StreamingIngestor(online_store, [SET], allowed_lateness_ms=MS_PER_HOUR)
    assert fresh.stats().watermark == T0 + 5 * MS_PER_HOUR
    r = fresh.ingest(EventBatch.from_rows([_ev(1, T0 + 5 * MS_PER_HOUR), _ev(2, T0)]))
    assert (r.accepted, r.duplicates, r.late) == (0, 1, 1)


def test_reads_carry_feature_timestamp_and_staleness(online_store):
    StreamingIngestor(online_store, [SET]).ingest(EventBatch.from_rows([_ev(1, T0), _ev(2, T0 + 500)]))
    res = _read(online_store, T0 + 1500, users=(1, 2))
    assert res.frame.feature_ts.tolist() == [T0 + 500, -1]
    assert res.staleness_ms.tolist() == [1000, -1]
    assert res.found.tolist() == [True, False]


def test_a_value_older_than_the_ttl_reads_missing_before_the_store_evicts_it(online_store):
    StreamingIngestor(online_store, [SET]).ingest(EventBatch.from_rows([_ev(1, T0)]))
    at_ttl = _read(online_store, T0 + 3 * MS_PER_HOUR)
    past = _read(online_store, T0 + 3 * MS_PER_HOUR + 1)
    assert past.found.tolist() == [True]  # the record is still there...
    assert not at_ttl.frame.missing.any()
    assert past.frame.missing.all() and past.frame.values.tolist() == [[0.0, 0.0]]  # ...but reads as missing


def test_records_are_written_with_the_feature_set_ttl(online_store):
    StreamingIngestor(online_store, [SET]).ingest(EventBatch.from_rows([_ev(1, T0)]))
    key = record_keys(SET, [1])[0]
    if hasattr(online_store, "clock"):
        online_store.clock.advance(3 * 3600 + 1)
        assert online_store.get_many([key]) == [None]
    else:
        from redis_server import raw_client

        raw = raw_client(online_store.url).pttl(online_store.key_name(key))
        assert 3 * MS_PER_HOUR - 60_000 < raw <= 3 * MS_PER_HOUR


def test_window_values_roll_off_as_time_passes_without_new_events(online_store):
    StreamingIngestor(online_store, [SET]).ingest(EventBatch.from_rows([_ev(1, T0 + 10)]))
    counts = [_read(online_store, T0 + h * MS_PER_HOUR + 20).frame.column("plays_2h")[0] for h in (0, 1, 2)]
    assert counts == [1.0, 1.0, 0.0]


def test_ingest_rejects_configuration_that_would_break_exactly_once(online_store):
    with pytest.raises(ValueError, match="dedupe_ttl_ms"):
        StreamingIngestor(online_store, [SET], allowed_lateness_ms=MS_PER_HOUR, dedupe_ttl_ms=MS_PER_HOUR)
    with pytest.raises(ValueError, match="allowed_lateness_ms"):
        StreamingIngestor(online_store, [SET], allowed_lateness_ms=-1)


def test_events_with_bad_values_are_refused_before_anything_is_written():
    with pytest.raises(ValueError, match="finite"):
        EventBatch.from_rows([_ev(1, T0, value=float("nan"))])
    with pytest.raises(ValueError, match="lacks field"):
        EventBatch.from_rows([{"event_id": 1}])


def test_several_writers_on_one_store_lose_no_update_and_count_nothing_twice(online_store):
    """Replicas ingesting overlapping, redelivered batches at once: the result equals one
    writer ingesting every event once (optimistic transactions retry on conflict)."""
    import threading

    from features.online.memory import MemoryStore
    from features.online.redis_store import RedisStore

    rows = [_ev(i + 1, T0 + 1000 * i, user=i % 3, value=float(i % 7)) for i in range(240)]
    chunks = [EventBatch.from_rows(rows[a : a + 20]) for a in range(0, 240, 20)]

    def replica(r: int) -> None:
        store = online_store if isinstance(online_store, MemoryStore) else RedisStore(online_store.url, namespace=online_store.namespace)
        ing = StreamingIngestor(store, [SET], allowed_lateness_ms=MS_PER_HOUR)
        for j, c in enumerate(chunks):
            if (j + r) % 2 == 0 or r == 0:  # replica 0 sees everything: every event arrives 2-4 times
                ing.ingest(c)

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    stats = StreamingIngestor(online_store, [SET]).stats()
    assert stats.accepted == 240 and stats.late == 0
    deliveries = 240 + sum(20 for j in range(12) for r in (1, 2, 3) if (j + r) % 2 == 0)
    assert stats.duplicates == deliveries - 240
    t = T0 + 240_000
    from features.batch import BatchEngine
    from features.state import StateLayout

    ev = EventBatch.from_rows(rows)
    batch = BatchEngine(StateLayout(SET), ev).features_asof(np.array([0, 1, 2]), np.full(3, t))
    online = _read(online_store, t, users=(0, 1, 2)).frame
    np.testing.assert_allclose(online.values, batch.values, rtol=1e-9)
