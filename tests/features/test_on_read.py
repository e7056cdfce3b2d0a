"""The on_read record: raw events plus a base state, and values that equal the streaming and
batch paths' for the same events, whatever the cap, the arrival order and the read time."""
from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_parity_properties import T0, logs
from test_parity_properties import feature_sets as random_feature_sets

from features.batch import BatchEngine
from features.definitions import FeatureSet
from features.events import MS_PER_DAY, MS_PER_HOUR, EventBatch, EventType
from features.lookup import FeatureLookup
from features.modes import MAX_CAP, SetMode
from features.on_read import HEADER_SIZE, OnReadLayout, is_on_read_record
from features.online.memory import MemoryStore
from features.repo import feature_sets
from features.state import FeatureFrame, StateLayout, apply_events, read_features
from features.streaming import StreamingIngestor
from features.verify import values_match

SETS = feature_sets("simulated", 20)
USER_ACTIVITY, ITEM_POPULARITY, USER_TOPIC, USER_CREATOR = SETS


def _same(a: FeatureFrame, b: FeatureFrame, what: str) -> None:
    ok = values_match(a.values, b.values) & (a.missing == b.missing)
    assert ok.all(), f"{what}: differ at {np.argwhere(~ok)[:3].tolist()} cols={a.columns}"
    assert (a.feature_ts == b.feature_ts).all(), what


def _in_set(fs: FeatureSet, ev: EventBatch) -> EventBatch:
    """What the ingestor hands on: deduplicated, filtered by the set's event_mask."""
    ev = ev.deduplicated()
    return ev.take(np.flatnonzero(fs.event_mask(ev)))


def _one_go_states(fs: FeatureSet, ev: EventBatch, ents: np.ndarray) -> np.ndarray:
    """Every event through apply_events at once into empty states."""
    lay = StateLayout(fs)
    states = lay.empty(len(ents))
    apply_events(lay, states, np.searchsorted(ents, fs.entity.codes(ev)[0]), ev)
    return states


def _one_go(fs: FeatureSet, ev: EventBatch, ents: np.ndarray, t: int) -> FeatureFrame:
    return read_features(StateLayout(fs), _one_go_states(fs, ev, ents), t)


def _append_in_batches(lay: OnReadLayout, ev: EventBatch, ents: np.ndarray, order: np.ndarray, cuts: list[int]) -> list:
    records: list = [None] * len(ents)
    for a, b in pairwise(cuts):
        part = ev.take(order[a:b])
        records = lay.append_many(records, np.searchsorted(ents, lay.feature_set.entity.codes(part)[0]), part)
    return records


def _random_events(n: int, seed: int, days: int = 3) -> EventBatch:
    rng = np.random.default_rng(seed)
    return EventBatch(
        event_id=np.arange(1, n + 1), ts=T0 + rng.integers(0, days * MS_PER_DAY, n), user_id=rng.integers(0, 6, n),
        item_id=rng.integers(0, 30, n), creator_id=rng.integers(0, 5, n), topic=rng.integers(-1, 20, n).astype(np.int32),
        session_id=np.full(n, -1), type=rng.choice([0, 1, 2, 3], n).astype(np.int8), value=np.round(rng.random(n) * 300, 3),
    )


# -- parity ----------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=random_feature_sets(), ev=logs(), data=st.data())
def test_values_equal_one_go_apply_and_the_batch_path_for_any_cap_arrival_and_read_time(fs, ev, data):
    ev = _in_set(fs, ev)
    cap = data.draw(st.integers(1, 6), label="cap")
    lay = OnReadLayout(fs, cap)
    ents = np.unique(fs.entity.codes(ev)[0])
    order = np.asarray(data.draw(st.permutations(range(len(ev))), label="arrival"), dtype=np.int64)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(ev)), max_size=4), label="cuts")) | {0, len(ev)})
    records = _append_in_batches(lay, ev, ents, order, cuts)
    assert all(len(r) <= lay.max_record_size for r in records)
    if len(ents) == 0:
        return
    t_end = int(ev.ts.max()) + 1
    assert (lay.feature_ts(records) == _one_go_states(fs, ev, ents)["feature_ts"]).all()  # the newest event, TTL or not
    after = [t_end, t_end + fs.ttl_ms + 1] + data.draw(st.lists(st.integers(t_end, t_end + 150 * MS_PER_HOUR), max_size=3))
    engine = BatchEngine(lay.state, ev)
    for t in after:
        frame, found = lay.read(records, t)
        assert found.all()
        _same(frame, _one_go(fs, ev, ents, t), f"one go, t={t}")
        _same(frame, read_features(lay.state, engine.states_asof(ents, np.full(len(ents), t)), t), f"batch, t={t}")
    # Before the newest event too: the same state as streaming, read at t.
    for t in data.draw(st.lists(st.integers(T0 - MS_PER_HOUR, t_end), max_size=3)):
        _same(lay.read(records, t)[0], _one_go(fs, ev, ents, t), f"one go, early t={t}")


@pytest.mark.parametrize("cap", [1, 8, 64])
def test_the_repo_sets_read_what_the_streaming_path_serves(cap):
    """Out-of-order arrival within the lateness, many overflows, every aggregation kind the
    repo uses; compared with a real StreamingIngestor and FeatureLookup on one store."""
    ev = _random_events(1500, seed=cap)
    rng = np.random.default_rng(cap)
    arrival = np.argsort(ev.ts + rng.integers(0, MS_PER_HOUR, len(ev)), kind="stable")
    cuts = [0, 100, 101, 700, 1200, len(ev)]
    store = MemoryStore("stream")
    ingestor = StreamingIngestor(store, SETS, allowed_lateness_ms=MS_PER_HOUR, dedupe_ttl_ms=MS_PER_DAY)
    for a, b in pairwise(cuts):
        assert ingestor.ingest(ev.take(arrival[a:b])).late == 0
    lookup = FeatureLookup(store, SETS)
    t_end = int(ev.ts.max()) + 1
    for fs in SETS:
        lay = OnReadLayout(fs, cap)
        mine = _in_set(fs, ev.take(arrival))
        ents = np.unique(fs.entity.codes(mine)[0])
        records = _append_in_batches(lay, mine, ents, np.arange(len(mine)), [0, 50, 51, 600, len(mine)])
        assert sum(len(lay.held_events(r)) for r in records) < len(mine) or cap == 64
        for t in (t_end, t_end + 5 * MS_PER_HOUR, t_end + fs.ttl_ms + 1):
            frame, found = lay.read(records, t)
            served = lookup.read(fs.name, ents, t).frame
            _same(frame, served, f"{fs.name} cap={cap} t={t}")
            assert found.all()
        assert lay.read(records, t_end + fs.ttl_ms + 1)[0].missing.all()  # after the TTL: missing


def test_a_read_at_many_times_at_once_equals_reads_one_by_one():
    ev = _in_set(USER_ACTIVITY, _random_events(400, seed=5))
    lay = OnReadLayout(USER_ACTIVITY, 16)
    ents = np.unique(USER_ACTIVITY.entity.codes(ev)[0])
    records = _append_in_batches(lay, ev, ents, np.arange(len(ev)), [0, len(ev)])
    t = int(ev.ts.max()) + 1 + np.arange(len(ents)) * MS_PER_HOUR
    together = lay.read(records, t)[0]
    for i in range(len(ents)):
        alone = lay.read([records[i]], int(t[i]))[0]
        assert values_match(together.values[i], alone.values[0]).all()


# -- the record ------------------------------------------------------------------------------
def test_a_record_keeps_only_the_event_columns_its_features_read():
    assert OnReadLayout(USER_ACTIVITY).event_dtype.names == ("ts", "event_id", "type", "value", "topic")
    assert OnReadLayout(ITEM_POPULARITY).event_dtype.names == ("ts", "event_id", "type", "value")
    # user_creator only counts plays: their seconds are never read, so not kept
    assert OnReadLayout(USER_CREATOR).event_dtype.names == ("ts", "event_id", "type")
    assert OnReadLayout(USER_ACTIVITY).event_dtype.itemsize == 29 and OnReadLayout(USER_CREATOR).event_dtype.itemsize == 17


def test_overflow_folds_the_oldest_events_into_the_base_down_to_half_the_cap():
    fs = USER_ACTIVITY
    lay = OnReadLayout(fs, cap=3)
    rows = [{"event_id": 10 + i, "ts": T0 + ts, "user_id": 7, "item_id": 1, "topic": 2, "type": EventType.PLAY, "value": 1.0}
            for i, ts in enumerate([50, 10, 40, 40, 30])]
    rec = lay.append(None, EventBatch.from_rows(rows[:3]))
    assert len(rec) == lay.record_size(3, with_base=False) == HEADER_SIZE + 3 * 29  # no base until the first overflow
    rec = lay.append(rec, EventBatch.from_rows(rows[3:]))  # 5 > cap 3: fold down to keep = 2
    assert lay.keep == 2 and len(rec) == lay.record_size(2, with_base=True)
    held = lay.held_events(rec)
    assert held.ts.tolist() == [T0 + 40, T0 + 50]
    assert held.event_id.tolist() == [13, 10]  # the tie at ts 40 is broken by event_id: 12 was folded
    rec = lay.append(rec, EventBatch.from_rows([{**rows[0], "event_id": 20, "ts": T0 + 45}]))  # 3: within the cap
    assert lay.held_events(rec).event_id.tolist() == [13, 10, 20]  # appended as bytes, not re-sorted
    assert lay.feature_ts([rec]).tolist() == [T0 + 50]
    assert lay.read([rec], T0 + 51)[0].column("plays_1d").tolist() == [6.0]  # folded, not lost


def test_a_state_record_is_read_as_a_base_so_switching_to_on_read_needs_no_rewrite():
    fs = USER_ACTIVITY
    ev = _in_set(fs, _random_events(600, seed=9))
    ents = np.unique(fs.entity.codes(ev)[0])
    half = len(ev) // 2
    state_lay = StateLayout(fs)
    states = state_lay.empty(len(ents))
    first = ev.take(np.arange(half))
    apply_events(state_lay, states, np.searchsorted(ents, fs.entity.codes(first)[0]), first)
    streamed = state_lay.encode(states)  # what streaming (or materialize) left in the store
    lay = OnReadLayout(fs, cap=8)
    rest = ev.take(np.arange(half, len(ev)))
    records = lay.append_many(streamed, np.searchsorted(ents, fs.entity.codes(rest)[0]), rest)
    assert all(is_on_read_record(r) for r in records) and not any(is_on_read_record(r) for r in streamed)
    t = int(ev.ts.max()) + 1
    _same(lay.read(records, t)[0], _one_go(fs, ev, ents, t), "switched to on_read")
    assert (lay.feature_ts(records) == _one_go_states(fs, ev, ents)["feature_ts"]).all()
    assert (lay.feature_ts(streamed) == states["feature_ts"]).all()
    _same(lay.read(streamed, t)[0], read_features(state_lay, states, t), "state records read as they are")
    back, _ = lay.states(records)  # and back to streaming: the folded state, encoded as today
    _same(read_features(state_lay, state_lay.decode(state_lay.encode(back))[0], t), _one_go(fs, ev, ents, t), "switched back")


def test_absent_records_read_as_missing_and_not_found():
    lay = OnReadLayout(USER_CREATOR)
    rec = lay.append(None, EventBatch.from_rows([{"event_id": 1, "ts": T0, "user_id": 1, "item_id": 2, "creator_id": 3,
                                                  "type": EventType.LIKE, "value": 1.0}]))
    frame, found = lay.read([None, rec, None], T0 + 1)
    assert found.tolist() == [False, True, False]
    assert frame.missing[[0, 2]].all() and not frame.missing[1].any()
    assert frame.feature_ts.tolist() == [-1, T0, -1]
    empty, found = lay.read([], T0)
    assert empty.values.shape == (0, len(USER_CREATOR.columns)) and len(found) == 0


def test_append_refuses_events_the_set_would_not_consume():
    lay = OnReadLayout(USER_CREATOR)
    skip = EventBatch.from_rows([{"event_id": 1, "ts": T0, "user_id": 1, "item_id": 2, "creator_id": 3, "type": EventType.SKIP, "value": 1.0}])
    with pytest.raises(ValueError, match="1 events are not user_creator's.*filter with FeatureSet.event_mask"):
        lay.append(None, skip)
    two = EventBatch.from_rows([{"event_id": i, "ts": T0, "user_id": 1, "item_id": 2, "creator_id": i, "type": EventType.LIKE, "value": 1.0}
                                for i in (1, 2)])
    with pytest.raises(ValueError, match="events of one user_creator; use append_many"):
        lay.append(None, two)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 1\)"):
        lay.append_many([None], np.array([0, 1]), two)


def test_a_cap_is_bounded_and_comes_from_the_mode():
    assert OnReadLayout.for_mode(USER_ACTIVITY, SetMode("on_read", cap=12)).cap == 12
    with pytest.raises(ValueError, match="served streaming, not on_read"):
        OnReadLayout.for_mode(USER_ACTIVITY, SetMode("streaming"))
    with pytest.raises(ValueError, match=f"cap must be in \\[1, {MAX_CAP}\\]"):
        OnReadLayout(USER_ACTIVITY, 0)


def test_a_smaller_cap_folds_down_at_the_next_append():
    ev = _in_set(USER_CREATOR, _random_events(300, seed=2))
    code = int(USER_CREATOR.entity.codes(ev)[0][0])
    mine = ev.take(np.flatnonzero(USER_CREATOR.entity.codes(ev)[0] == code))
    big, small = OnReadLayout(USER_CREATOR, 64), OnReadLayout(USER_CREATOR, 2)
    rec = small.append(big.append(None, mine.take(np.arange(len(mine) - 1))), mine.take([len(mine) - 1]))
    assert len(small.held_events(rec)) == 1  # over its cap of 2: folded down to keep = 1
    t = int(mine.ts.max()) + 1
    _same(small.read([rec], t)[0], _one_go(USER_CREATOR, mine, np.array([code]), t), "refolded")


# -- foreign and corrupt records -------------------------------------------------------------
@pytest.fixture
def good() -> tuple[OnReadLayout, bytes]:
    lay = OnReadLayout(USER_TOPIC, cap=2)
    ev = EventBatch.from_rows([{"event_id": i, "ts": T0 + i, "user_id": 4, "item_id": 1, "topic": 3, "type": EventType.PLAY, "value": 2.0}
                               for i in range(5)])
    return lay, lay.append(None, ev)


def _flip(rec: bytes, at: int, value: bytes) -> bytes:
    return rec[:at] + value + rec[at + len(value) :]


@pytest.mark.parametrize(
    "corrupt, says",
    [
        (lambda r: b"\x00" * len(r), "neither on_read .* nor this set's state record"),
        (lambda r: b"junk", "neither on_read .* nor this set's state record"),
        (lambda r: r[:20], "truncated: 20 bytes, shorter than its 32-byte header"),
        (lambda r: r[:-1], "is 264 bytes but its header describes 265 .*truncated or corrupt"),
        (lambda r: r + b"\x00", "is 266 bytes but its header describes 265"),
        (lambda r: _flip(r, 4, (2).to_bytes(2, "little")), "has format 2; this reader knows format 1"),
        (lambda r: _flip(r, 6, (4).to_bytes(2, "little")), "unknown flags 0x4"),
        (lambda r: _flip(r, 8, b"\x01" * 8), "written for another version of the set"),
        (lambda r: _flip(r, HEADER_SIZE, b"XXXX"), "corrupt base state: record for user_topic has a bad magic number"),
    ],
)
def test_a_foreign_or_corrupt_record_fails_loudly(good, corrupt, says):
    lay, rec = good
    assert len(rec) == lay.record_size(1, with_base=True) == 265
    with pytest.raises(ValueError, match=says):
        lay.read([None, corrupt(rec)], T0)


def test_a_record_of_another_set_version_is_refused():
    other = feature_sets("simulated", 5)[0]  # user_activity with 5 topics: another version
    rec = OnReadLayout(other).append(None, EventBatch.from_rows(
        [{"event_id": 1, "ts": T0, "user_id": 1, "item_id": 1, "topic": 1, "type": EventType.PLAY, "value": 3.0}]))
    with pytest.raises(ValueError, match="user_activity .* written for another version of the set"):
        OnReadLayout(USER_ACTIVITY).read([rec], T0 + 1)
    with pytest.raises(ValueError, match="neither on_read .*does not match feature set user_activity"):
        OnReadLayout(USER_ACTIVITY).read([StateLayout(other).encode(StateLayout(other).empty(1))[0]], T0 + 1)


def test_records_are_bytes():
    with pytest.raises(TypeError, match="records are bytes or None, got str"):
        OnReadLayout(USER_TOPIC).read(["PRAW"], T0)


def test_records_round_trip_through_either_store_and_read_the_same(online_store):
    from features.lookup import record_keys
    from features.online.base import Write

    fs = USER_CREATOR
    ev = _in_set(fs, _random_events(500, seed=4))
    ents = np.unique(fs.entity.codes(ev)[0])
    lay = OnReadLayout(fs, cap=4)
    records = _append_in_batches(lay, ev, ents, np.arange(len(ev)), [0, 200, len(ev)])
    keys = record_keys(fs, ents)
    online_store.commit([Write(k, r, fs.ttl_ms) for k, r in zip(keys, records)])
    back = online_store.get_many(keys + record_keys(fs, [ents.max() + 1]))
    assert back[:-1] == records and back[-1] is None
    t = int(ev.ts.max()) + 1
    frame, found = lay.read(back, t)
    assert found.tolist() == [True] * len(ents) + [False]
    _same(FeatureFrame(frame.columns, frame.values[:-1], frame.missing[:-1], frame.feature_ts[:-1]), _one_go(fs, ev, ents, t), "via the store")
