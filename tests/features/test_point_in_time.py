"""The point-in-time join: as-of semantics, no leakage, TTL, missing policy."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from feature_oracle import oracle_row

from features.definitions import Agg, Entity, Feature, FeatureSet, Source, Window
from features.eventlog import EventLog
from features.events import MS_PER_HOUR, EventBatch, EventType
from features.pit import PitJoiner, point_in_time_join
from features.repo import feature_sets
from features.verify import values_match

T0 = 1_760_000_000_000 - (1_760_000_000_000 % MS_PER_HOUR)
PLAYS = Source("plays", (EventType.PLAY,), "value")
SET = FeatureSet(
    "u",
    Entity("user", ("user_id",)),
    (PLAYS,),
    (
        Feature("plays_2h", Agg.COUNT, "plays", window=Window(2 * MS_PER_HOUR, MS_PER_HOUR)),
        Feature("last_watch", Agg.LAST, "plays", default=-1.0),
    ),
    ttl_ms=5 * MS_PER_HOUR,
)


def _events(*rows) -> EventBatch:
    return EventBatch.from_rows(
        [{"event_id": i + 1, "ts": ts, "user_id": u, "item_id": 1, "type": EventType.PLAY, "value": v} for i, (ts, u, v) in enumerate(rows)]
    )


def test_a_label_event_never_sees_itself_or_anything_later():
    ev = _events((T0 + 10, 1, 5.0), (T0 + 20, 1, 7.0), (T0 + 20, 1, 9.0), (T0 + 30, 1, 11.0))
    spine = pa.table({"user_id": ev.user_id, "ts": ev.ts})  # the label events themselves
    out = point_in_time_join(spine, [SET], ev)
    assert out["u.plays_2h"].to_pylist() == [0.0, 1.0, 1.0, 3.0]  # ties at ts=20 see neither
    assert out["u.last_watch"].to_pylist() == [-1.0, 5.0, 5.0, 9.0]
    assert out["u.last_watch.missing"].to_pylist() == [True, False, False, False]
    assert out["u.feature_ts"].to_pylist() == [-1, T0 + 10, T0 + 10, T0 + 20]


def test_training_rows_never_use_events_from_their_future_on_simulated_data(small_sim):
    """Leakage check on real-shaped data: recompute every row with the log cut at its time."""
    ev = EventLog(small_sim / "events").read()
    sets = feature_sets("simulated", 20)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(ev), size=25, replace=False)
    spine = pa.table({"user_id": ev.user_id[rows], "item_id": ev.item_id[rows], "topic": ev.topic[rows], "creator_id": ev.creator_id[rows], "ts": ev.ts[rows]})
    full = PitJoiner(sets, ev).join(spine)
    for r, i in enumerate(rows):
        past = ev.take(np.flatnonzero(ev.ts < ev.ts[i]))  # the world as it was at the label time
        cut = PitJoiner(sets, past).join(spine.slice(r, 1))
        for col in full.column_names[5:]:
            assert full[col][r].as_py() == pytest.approx(cut[col][0].as_py(), rel=1e-9, abs=1e-9), col


def test_join_matches_the_oracle_for_every_feature_of_a_real_feature_set(small_sim):
    ev = EventLog(small_sim / "events").read()
    fs = feature_sets("simulated", 20)[0]
    rng = np.random.default_rng(1)
    users = rng.choice(np.unique(ev.user_id), 6)
    ts = rng.integers(int(ev.ts.min()), int(ev.ts.max()) + 2 * 86_400_000, 6)
    out = point_in_time_join(pa.table({"user_id": users, "ts": ts}), [fs], ev)
    for r in range(6):
        want, miss, fts = oracle_row(fs, ev, int(users[r]), int(ts[r]))
        got = np.asarray([out[f"{fs.name}.{c}"][r].as_py() for c in fs.columns])
        assert values_match(got, np.asarray(want)).all()
        assert out[f"{fs.name}.feature_ts"][r].as_py() == fts


def test_values_older_than_the_ttl_read_as_missing_with_defaults():
    ev = _events((T0, 1, 5.0))
    spine = pa.table({"user_id": [1, 1], "ts": [T0 + 5 * MS_PER_HOUR, T0 + 5 * MS_PER_HOUR + 1]})
    out = point_in_time_join(spine, [SET], ev)
    assert out["u.last_watch"].to_pylist() == [5.0, -1.0]
    assert out["u.last_watch.missing"].to_pylist() == [False, True]
    assert out["u.plays_2h.missing"].to_pylist() == [False, True]
    assert out["u.feature_ts"].to_pylist() == [T0, -1]


def test_unknown_entities_and_invalid_ids_get_defaults_and_missing_flags():
    ev = _events((T0, 1, 5.0))
    out = point_in_time_join(pa.table({"user_id": [999, -1], "ts": [T0 + 1, T0 + 1]}), [SET], ev)
    assert out["u.last_watch"].to_pylist() == [-1.0, -1.0]
    assert all(out["u.last_watch.missing"].to_pylist())


def test_duplicated_events_in_the_log_count_once():
    ev = _events((T0, 1, 5.0))
    twice = EventBatch.concat([ev, ev])
    out = point_in_time_join(pa.table({"user_id": [1], "ts": [T0 + 1]}), [SET], twice)
    assert out["u.plays_2h"].to_pylist() == [1.0]


def test_a_spine_without_the_entity_column_is_refused_with_the_column_name():
    with pytest.raises(ValueError, match="user_id"):
        point_in_time_join(pa.table({"item_id": [1], "ts": [T0]}), [SET], _events((T0, 1, 1.0)))
    with pytest.raises(ValueError, match="ts"):
        point_in_time_join(pa.table({"user_id": [1], "when": [T0]}), [SET], _events((T0, 1, 1.0)))
