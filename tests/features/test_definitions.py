"""Feature declarations: versions follow the maths, bad declarations fail early, and the
segmented scans the batch path relies on equal their naive definitions."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from features.definitions import Agg, Entity, Feature, FeatureSet, Source, Window
from features.events import MS_PER_HOUR, EventType
from features.repo import W7D, feature_sets
from features.scan import segmented_cummax, segmented_cumsum, segmented_linear_scan
from features.state import StateLayout

PLAYS = Source("plays", (EventType.PLAY,))


def _set(**kw) -> FeatureSet:
    base = dict(name="s", entity=Entity("user", ("user_id",)), sources=(PLAYS,), features=(Feature("n", Agg.COUNT, "plays", window=W7D),), ttl_ms=MS_PER_HOUR)
    base.update(kw)
    return FeatureSet(**base)


def test_the_version_changes_with_the_maths_and_not_with_the_prose():
    a = _set()
    assert a.version == _set(description="new words").version
    assert a.version != _set(ttl_ms=2 * MS_PER_HOUR).version
    assert a.version != _set(features=(Feature("n", Agg.COUNT, "plays", window=Window(7 * 86_400_000, 3_600_000)),)).version
    assert a.version != _set(features=(dataclasses.replace(a.features[0], default=1.0),)).version


def test_every_shipped_feature_set_has_a_distinct_stable_version():
    for kind in ("simulated", "movielens"):
        sets = feature_sets(kind, 19)
        assert len({fs.version for fs in sets}) == len(sets)
        assert [fs.version for fs in sets] == [fs.version for fs in feature_sets(kind, 19)]


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: Window(90, 60), "multiple"),
        (lambda: Feature("x", Agg.COUNT, "plays"), "needs a window"),
        (lambda: Feature("x", Agg.LAST, "plays", window=W7D), "takes no window"),
        (lambda: Feature("x", Agg.DECAYED_SUM, "plays"), "half_life_ms"),
        (lambda: Feature("x", Agg.DECAYED_VECTOR, "plays", half_life_ms=1, dim=3), "index_column"),
        (lambda: Feature("x", Agg.MEAN, "plays", window=W7D, default=float("nan")), "finite"),
        (lambda: _set(features=(Feature("n", Agg.COUNT, "nope", window=W7D),)), "unknown source"),
        (lambda: _set(ttl_ms=0), "ttl_ms"),
        (lambda: Source("s", ()), "event type"),
        (lambda: Entity("e", ("a", "b", "c")), "one or two"),
    ],
)
def test_bad_declarations_fail_with_a_message_naming_the_problem(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_pair_entity_ids_round_trip_through_store_keys():
    e = Entity("user_topic", ("user_id", "topic"))
    code = e.code_of(42, 7)
    assert e.key_id(code) == "42|7" and e.parse_key_id("42|7") == code
    with pytest.raises(ValueError, match="bad user_topic id"):
        e.parse_key_id("42")


def test_records_round_trip_and_foreign_records_are_refused():
    lay = StateLayout(feature_sets()[0])
    st_ = lay.empty(3)
    st_["feature_ts"] = [1, 2, 3]
    back, present = lay.decode([*lay.encode(st_), None])
    assert present.tolist() == [True, True, True, False]
    assert back["feature_ts"].tolist() == [1, 2, 3, -1]
    with pytest.raises(ValueError, match="another layout"):
        lay.decode([b"\x00" * 10])


@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-1e6, 1e6), st.floats(0, 1)), max_size=60))
def test_segmented_scans_equal_their_sequential_definitions(rows):
    rows.sort(key=lambda r: r[0])
    seg = np.asarray([r[0] for r in rows], dtype=np.int64)
    v = np.asarray([r[1] for r in rows])
    a = np.asarray([r[2] for r in rows])
    cs, cm, lin = segmented_cumsum(v, seg), segmented_cummax(v, seg), segmented_linear_scan(a, v, seg)
    for i in range(len(rows)):
        same = [j for j in range(i + 1) if seg[j] == seg[i]]
        assert cs[i] == pytest.approx(sum(v[j] for j in same), rel=1e-9, abs=1e-6)
        assert cm[i] == max(v[j] for j in same)
        y = 0.0
        for k, j in enumerate(same):
            y = v[j] if k == 0 else a[j] * y + v[j]
        assert lin[i] == pytest.approx(y, rel=1e-9, abs=1e-6)
