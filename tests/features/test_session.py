"""Session features: the feature store (PitJoiner over features/session.py) computes exactly what
mobile_sdk/BUNDLE_FORMAT.md tells a device to compute from its recorded events."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.events import EventBatch
from features.pit import PitJoiner
from features.session import session_columns, session_sets, session_spec, session_values

T0 = 1_767_571_200_000  # a UTC midnight
SPAN = 3 * 3_600_000  # events over 3 hours: inside and outside the 30 min window


def reference(spec: dict, events: list[dict], user: int, item: int, topic: int, creator: int, now: int) -> list[float]:
    """BUNDLE_FORMAT.md's session rule, read literally, over one user's recorded events."""
    tile, n = spec["tile_ms"], spec["window_ms"] // spec["tile_ms"]
    c = now // tile
    out = []
    for f in spec["features"]:
        vals = []
        for e in events:
            if e["user_id"] != user or not e["ts"] < now or e["ts"] // tile < c - n + 1 or e["type"] not in f["types"]:
                continue
            ent = f["entity"]
            if ent == "topic" and not (e["topic"] == topic and topic >= 0 and e["topic"] >= 0):
                continue
            if ent == "creator" and not (e["creator_id"] == creator and creator >= 0 and e["creator_id"] >= 0):
                continue
            if ent == "item" and e["item_id"] != item:
                continue
            vals.append(1.0 if f["value"] == "one" else e["value"])
        if f["agg"] == "count":
            out.append(float(len(vals)))
        elif f["agg"] == "sum":
            out.append(float(sum(vals)))
        else:
            out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def _events(kind: str):
    types = st.sampled_from([0, 1, 2, 3]) if kind == "simulated" else st.just(4)
    ev = st.fixed_dictionaries({
        "ts": st.integers(T0, T0 + SPAN), "user_id": st.integers(0, 2), "item_id": st.integers(0, 4),
        "topic": st.integers(-1, 2), "creator_id": st.integers(-1, 2), "type": types,
        "value": st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0, 37.5]),
    })
    return st.lists(ev, min_size=0, max_size=40)


def _queries():
    q = st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(-1, 2), st.integers(-1, 2), st.integers(T0, T0 + SPAN + 3_600_000))
    return st.lists(q, min_size=1, max_size=12)


def _check(kind: str, evs: list[dict], queries) -> None:
    rows = [dict(e, event_id=i + 1, session_id=-1) for i, e in enumerate(evs)]
    batch = EventBatch.from_rows(rows) if rows else EventBatch.empty()
    joiner = PitJoiner(session_sets(kind), batch)
    u, i, tp, cr, t = (np.asarray(c, dtype=np.int64) for c in zip(*queries))
    got = session_values(kind, joiner.join(pa.table({"user_id": u, "item_id": i, "topic": tp, "creator_id": cr, "ts": t})))
    spec = session_spec(kind).to_json()
    want = np.asarray([reference(spec, rows, *map(int, q)) for q in queries], dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9, equal_nan=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_events("simulated"), _queries())
def test_simulated_session_features_match_the_bundle_rule(evs, queries):
    _check("simulated", evs, queries)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_events("movielens"), _queries())
def test_movielens_session_features_match_the_bundle_rule(evs, queries):
    _check("movielens", evs, queries)


def test_an_event_at_the_window_edge_counts_and_one_tile_older_does_not():
    tile = 300_000
    now = T0 + 10 * tile + 1234  # tile c = 10: the window holds tiles 5..10
    rows = [dict(event_id=1, ts=T0 + 5 * tile, user_id=1, item_id=7, topic=2, creator_id=3, session_id=-1, type=1, value=10.0),
            dict(event_id=2, ts=T0 + 5 * tile - 1, user_id=1, item_id=7, topic=2, creator_id=3, session_id=-1, type=1, value=20.0),
            dict(event_id=3, ts=now, user_id=1, item_id=7, topic=2, creator_id=3, session_id=-1, type=1, value=40.0)]
    j = PitJoiner(session_sets("simulated"), EventBatch.from_rows(rows))
    v = session_values("simulated", j.join(pa.table({"user_id": [1], "item_id": [7], "topic": [2], "creator_id": [3], "ts": [now]})))
    cols = dict(zip(session_columns("simulated"), v[0]))
    assert cols["session.user.engaged"] == 1.0 and cols["session.user.watch_s"] == 10.0  # not the older one, not the one at now
    assert cols["session.topic.engaged"] == 1.0 and cols["session.creator.engaged"] == 1.0
    assert cols["session.item.impressions"] == 0.0


def test_the_spec_is_generated_from_the_feature_sets():
    spec = session_spec("simulated").to_json()
    assert (spec["window_ms"], spec["tile_ms"]) == (1_800_000, 300_000)
    by = {f["column"]: f for f in spec["features"]}
    assert list(by) == list(session_columns("simulated"))
    assert by["session.topic.engaged"] == {"column": "session.topic.engaged", "entity": "topic", "agg": "count", "types": [1, 2], "value": "one"}
    assert by["session.user.watch_s"]["agg"] == "sum" and by["session.user.watch_s"]["value"] == "value"
    ml = {f["column"]: f for f in session_spec("movielens").to_json()["features"]}
    assert set(ml) == {"session.user.ratings", "session.user.rating_mean", "session.topic.ratings", "session.topic.rating_mean"}
    assert ml["session.user.rating_mean"]["agg"] == "mean" and ml["session.user.rating_mean"]["types"] == [4]
    for fs in session_sets("simulated"):
        assert fs.ttl_ms == 35 * 60_000
