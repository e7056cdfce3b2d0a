"""The served-values fast path equals `read_features` of the state, bit for bit, wherever it
answers, and it declines (expired) exactly where it could not."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_parity_properties import T0, feature_sets, logs

from features.batch import BatchEngine
from features.definitions import Agg, Entity, Feature, FeatureSet, Source, Window
from features.events import MS_PER_HOUR, MS_PER_MINUTE, EventBatch, EventType
from features.served_values import ServedValues, merge_states
from features.state import StateLayout, read_features


def _states(fs: FeatureSet, ev: EventBatch, asof: int):
    lay = StateLayout(fs)
    eng = BatchEngine(lay, ev)
    codes = eng.entities
    return lay, codes, eng.states_asof(codes, np.full(len(codes), asof, dtype=np.int64))


def _exact(a, b):
    assert np.array_equal(a.values, b.values), np.argwhere(a.values != b.values)[:3]
    assert np.array_equal(a.missing, b.missing)
    assert np.array_equal(a.feature_ts, b.feature_ts)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=feature_sets(), ev=logs(), cut=st.integers(0, 31 * MS_PER_HOUR), written=st.one_of(st.none(), st.integers(0, 100 * MS_PER_HOUR)),
       later=st.lists(st.integers(-3 * MS_PER_HOUR, 200 * MS_PER_HOUR), min_size=1, max_size=6))
def test_values_read_equals_read_features_wherever_it_answers_and_merging_the_state_covers_the_rest(fs, ev, cut, written, later):
    lay, codes, states = _states(fs, ev, T0 + cut)
    sv = ServedValues(lay)
    recs = sv.encode(states, None if written is None else T0 + cut + written)  # written at the event, or later
    alive = states["feature_ts"] >= 0
    for dt in [0, 1, *later]:
        t = T0 + cut + dt
        want = read_features(lay, states, t)
        got = sv.read([r if a else None for r, a in zip(recs, alive)], t)
        ans = got.found & ~got.expired
        if ans.any():
            sub = lambda f: (f.values[ans], f.missing[ans], f.feature_ts[ans])  # noqa: E731
            for x, y in zip(sub(got.frame), sub(want)):
                assert np.array_equal(x, y)
        st_recs = lay.encode(states[got.expired])
        _exact(merge_states(lay, got, st_recs, t), read_features(lay, np.where(alive, states, lay.empty(len(states))), t))


def _one_set() -> FeatureSet:
    a = Source("a", (EventType.PLAY,), "one")
    return FeatureSet(
        "s", Entity("user", ("user_id",)), (a,),
        (Feature("c1h", Agg.COUNT, "a", window=Window(MS_PER_HOUR, 15 * MS_PER_MINUTE)),
         Feature("d", Agg.DECAYED_SUM, "a", half_life_ms=MS_PER_HOUR)),
        ttl_ms=10 * MS_PER_HOUR,
    )  # fmt: skip


def _ev(ts: list[int]) -> EventBatch:
    return EventBatch.from_rows([{"event_id": i + 1, "ts": t, "user_id": 1, "item_id": 0, "topic": 0, "type": EventType.PLAY, "value": 1.0}
                                 for i, t in enumerate(ts)])


def test_the_interval_ends_when_the_oldest_non_empty_tile_leaves_the_window_or_at_the_ttl():
    q = 15 * MS_PER_MINUTE
    base = (T0 // MS_PER_HOUR) * MS_PER_HOUR
    lay, _, states = _states(_one_set(), _ev([base + 5 * MS_PER_MINUTE, base + 2 * q + 1]), base + 2 * q + 2)
    sv = ServedValues(lay)
    # tile 0 (the first event's) leaves the 4-tile window when the window ends in tile 4
    assert sv.interval(states, states["feature_ts"] + 1)[1][0] == base + 4 * q
    rec = sv.encode(states)
    inside = sv.read(rec, base + 4 * q - 1)
    assert not inside.expired[0] and inside.frame.values[0, 0] == 2.0
    assert sv.read(rec, base + 4 * q).expired[0]  # one count would leave: the state must answer
    # after its last tile left every window, only the TTL ends the interval, and a decayed sum
    # still decays exactly
    lay, _, states = _states(_one_set(), _ev([base]), base + MS_PER_HOUR)
    sv = ServedValues(lay)
    assert sv.interval(states, states["feature_ts"] + 1)[1][0] == base + MS_PER_HOUR  # the state as of the boundary still holds the tile
    lay, _, states = _states(_one_set(), _ev([base]), base + 1)
    states["r0_count"][:] = 0  # a ring whose tiles all left (as after a roll): nothing to leave any more
    assert sv.interval(states, states["feature_ts"] + 1)[1][0] == base + 1 + 10 * MS_PER_HOUR
    t = base + 3 * MS_PER_HOUR
    got = sv.read(sv.encode(states), t)
    assert not got.expired[0]
    _exact(got.frame, read_features(lay, states, t))
    assert got.frame.values[0, 1] == 0.125
    assert sv.read(sv.encode(states), base + 1 + 10 * MS_PER_HOUR).expired[0]  # past the TTL: missing, via the state


def test_records_read_before_their_newest_event_or_of_another_format_are_left_to_the_state():
    lay, _, states = _states(_one_set(), _ev([T0, T0 + 10]), T0 + 11)
    sv = ServedValues(lay)
    rec = sv.encode(states)
    assert sv.read(rec, T0 + 10).expired[0]  # a read "as of" a time the record has events after
    assert not sv.read(rec, T0 + 11).expired[0]
    other = sv.read([lay.encode(states)[0], None], T0 + 11)  # a state record under a values key
    assert other.expired.tolist() == [True, False] and other.found.tolist() == [True, False]
    assert other.frame.missing[1].all() and other.frame.feature_ts[1] == -1


def test_a_record_written_long_after_the_last_event_answers_from_its_writing_time_until_the_next_change():
    day = 24 * MS_PER_HOUR
    base = (T0 // day) * day
    fs = FeatureSet("s", Entity("user", ("user_id",)), (Source("a", (EventType.PLAY,), "one"),),
                    (Feature("c1h", Agg.COUNT, "a", window=Window(MS_PER_HOUR, 15 * MS_PER_MINUTE)),
                     Feature("c7d", Agg.COUNT, "a", window=Window(7 * day, day))), ttl_ms=30 * day)
    lay, _, states = _states(fs, _ev([base + MS_PER_HOUR]), base + 2 * day)
    sv = ServedValues(lay)
    at_event, now = sv.encode(states), sv.encode(states, base + 2 * day)
    assert sv.read(at_event, base + 2 * day).expired[0]  # the 1-hour count changed since the event
    got = sv.read(now, base + 2 * day)
    assert not got.expired[0] and got.frame.values[0].tolist() == [0.0, 1.0]
    start, until = sv.interval(states, np.array([base + 2 * day]))
    assert start[0] == base + 2 * MS_PER_HOUR  # the last change: the event's tile left the hour
    assert until[0] == base + 7 * day  # next change: the day tile leaves the week
    assert sv.read(now, base + 7 * day - 1).frame.values[0].tolist() == [0.0, 1.0]
    assert sv.read(now, base + 7 * day).expired[0]
