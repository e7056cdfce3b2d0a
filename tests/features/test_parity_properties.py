"""Property-based parity: for random logs (duplicates, out-of-order arrival within the
allowed lateness, random windows, half-lives and probe times), the streaming path, the
batch path and a naive oracle written from the spec agree."""
from __future__ import annotations

import numpy as np
from feature_oracle import oracle_row
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.batch import BatchEngine
from features.definitions import Agg, Entity, Feature, FeatureSet, Source, Window
from features.events import MS_PER_HOUR, MS_PER_MINUTE, EventBatch, EventType
from features.lookup import FeatureLookup
from features.online.memory import MemoryStore
from features.state import StateLayout
from features.streaming import StreamingIngestor
from features.verify import values_match

T0 = 1_750_000_000_000
LATENESS = 30 * MS_PER_MINUTE


@st.composite
def feature_sets(draw) -> FeatureSet:
    tile = draw(st.sampled_from([MS_PER_MINUTE, 5 * MS_PER_MINUTE, 15 * MS_PER_MINUTE, MS_PER_HOUR]))
    k = draw(st.integers(1, 6))
    k2 = draw(st.integers(1, 4))
    w, w2 = Window(tile * k, tile), Window(tile * 2 * k2, tile * 2)
    half = draw(st.integers(MS_PER_MINUTE, 3 * MS_PER_HOUR))
    pair = draw(st.booleans())
    entity = Entity("user_topic", ("user_id", "topic")) if pair else Entity("user", ("user_id",))
    a = Source("a", (EventType.PLAY, EventType.LIKE), "value")
    b = Source("b", (EventType.IMPRESSION,), "one")
    feats = (
        Feature("a_count", Agg.COUNT, "a", window=w),
        Feature("a_sum", Agg.SUM, "a", window=w),
        Feature("a_mean", Agg.MEAN, "a", window=w2, default=-1.0),
        Feature("a_max", Agg.MAX, "a", window=w, default=-2.0),
        Feature("b_count", Agg.COUNT, "b", window=w2),
        Feature("a_decayed", Agg.DECAYED_SUM, "a", half_life_ms=half),
        Feature("a_last", Agg.LAST, "a", default=-3.0),
        Feature("topics", Agg.DECAYED_VECTOR, "a", half_life_ms=half, dim=3, index_column="topic"),
    )
    ttl = draw(st.sampled_from([10 * MS_PER_MINUTE, 2 * MS_PER_HOUR, 100 * MS_PER_HOUR]))
    return FeatureSet("prop", entity, (a, b), feats, ttl)


@st.composite
def logs(draw) -> EventBatch:
    n = draw(st.integers(1, 40))
    span = draw(st.sampled_from([10 * MS_PER_MINUTE, 3 * MS_PER_HOUR, 30 * MS_PER_HOUR]))
    rows = []
    for i in range(n):
        rows.append(
            {
                "event_id": i + 1,
                "ts": T0 + draw(st.integers(0, span)),
                "user_id": draw(st.integers(0, 2)),
                "item_id": draw(st.integers(0, 3)),
                "topic": draw(st.integers(-1, 2)),
                "type": draw(st.sampled_from([EventType.PLAY, EventType.LIKE, EventType.IMPRESSION, EventType.SKIP])),
                "value": draw(st.one_of(st.integers(0, 100).map(float), st.floats(0, 1000, allow_nan=False, allow_infinity=False))),
            }
        )
    dups = draw(st.lists(st.integers(0, n - 1), max_size=5))
    rows += [dict(rows[i]) for i in dups]  # redelivered: same id, same content
    return EventBatch.from_rows(rows)


def _entities(fs: FeatureSet, ev: EventBatch) -> np.ndarray:
    codes, ok = fs.entity.codes(ev)
    return np.unique(codes[ok & fs.event_mask(ev)])


def _assert_same(fs, codes, t, online, batch):
    ok = values_match(online.values, batch.values) & (online.missing == batch.missing)
    assert ok.all(), f"t={t} streaming vs batch differ at {np.argwhere(~ok)[:3].tolist()} cols={online.columns}"
    assert (online.feature_ts == batch.feature_ts).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=feature_sets(), ev=logs(), data=st.data())
def test_in_order_replay_matches_batch_and_oracle_at_any_probe_time(fs, ev, data):
    lay = StateLayout(fs)
    engine = BatchEngine(lay, ev)
    store = MemoryStore(namespace="prop")
    ing = StreamingIngestor(store, [fs], allowed_lateness_ms=0, dedupe_ttl_ms=MS_PER_HOUR)
    lookup = FeatureLookup(store, [fs])
    codes = _entities(fs, ev)
    # Probes anywhere, including exactly at event times (an event never sees itself).
    probes = sorted(set(data.draw(st.lists(st.sampled_from(ev.ts.tolist()), max_size=3)))
                    | set(data.draw(st.lists(st.integers(T0 - MS_PER_HOUR, T0 + 200 * MS_PER_HOUR), min_size=1, max_size=3))))
    order = np.argsort(ev.ts, kind="stable")
    pos = 0
    for t in probes:
        end = int(np.searchsorted(ev.ts[order], t, side="left"))
        if end > pos:
            ing.ingest(ev.take(order[pos:end]))
        pos = end
        if len(codes) == 0:
            continue
        online = lookup.read("prop", codes, t).frame
        batch = engine.features_asof(codes, np.full(len(codes), t))
        _assert_same(fs, codes, t, online, batch)
        for i, code in enumerate(codes.tolist()):
            vals, miss, fts = oracle_row(fs, ev, code, t)
            assert values_match(batch.values[i], np.asarray(vals)).all(), (code, t, batch.values[i].tolist(), vals)
            assert batch.missing[i].tolist() == miss
            assert int(batch.feature_ts[i]) == fts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fs=feature_sets(), ev=logs(), data=st.data())
def test_out_of_order_arrival_within_lateness_gives_the_in_order_state(fs, ev, data):
    lay = StateLayout(fs)
    jitter = np.asarray(data.draw(st.lists(st.integers(0, LATENESS - 1), min_size=len(ev), max_size=len(ev))), dtype=np.int64)
    arrival = np.argsort(ev.ts + jitter, kind="stable")  # each event late by < LATENESS
    store = MemoryStore(namespace="ooo")
    ing = StreamingIngestor(store, [fs], allowed_lateness_ms=LATENESS, dedupe_ttl_ms=2 * LATENESS)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(ev)), max_size=4))) | {len(ev)})
    start, late = 0, 0
    for c in cuts:
        late += ing.ingest(ev.take(arrival[start:c])).late
        start = c
    assert late == 0
    again = ing.ingest(ev)  # a full redelivery changes nothing
    assert again.accepted == 0 and again.duplicates == len(ev)
    codes = _entities(fs, ev)
    if len(codes) == 0:
        return
    engine = BatchEngine(lay, ev)
    lookup = FeatureLookup(store, [fs])
    t_end = int(ev.ts.max()) + 1
    for t in [t_end] + data.draw(st.lists(st.integers(t_end, t_end + 150 * MS_PER_HOUR), max_size=3)):
        _assert_same(fs, codes, t, lookup.read("prop", codes, t).frame, engine.features_asof(codes, np.full(len(codes), t)))
