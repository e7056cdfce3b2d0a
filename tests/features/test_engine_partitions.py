"""The single-process engine past its partition threshold (a set's log split by entity hash
over in-process BatchEngines) gives one BatchEngine's results, byte for byte: materialised
records, states and feature values as of t, and training rows. The threshold is lowered here
so the small simulated data set splits into three partitions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from features.batch import BatchEngine
from features.engines import LOCAL, PARTITION_EVENTS, LocalEngine, PartitionedBatchEngine
from features.eventlog import EventLog
from features.materialize import materialize, watermark_key
from features.modes import ServingMode, SetMode, save_mode
from features.online.memory import MemoryStore
from features.repo import feature_sets
from features.state import StateLayout

SETS = feature_sets("simulated", 20)


@pytest.fixture(scope="module")
def split_engine(small_sim):
    n = len(EventLog(small_sim / "events").read())
    return LocalEngine(partition_events=n // 3 + 1)


def _store() -> MemoryStore:
    return MemoryStore("t", clock=lambda: 1_700_000_000.0)


def _records(store: MemoryStore) -> dict:
    keys = sorted(store.iter_keys(), key=lambda k: (k.feature_set, k.version, k.entity_id))
    return dict(zip(keys, store.get_many(keys)))


def test_the_threshold_picks_one_engine_or_partitions(small_sim, split_engine):
    ev = EventLog(small_sim / "events").read()
    lay = StateLayout(SETS[0])
    assert type(LOCAL.batch_engine(lay, ev)) is BatchEngine and LOCAL.partition_events == PARTITION_EVENTS > len(ev)
    eng = split_engine.batch_engine(lay, ev)
    assert isinstance(eng, PartitionedBatchEngine) and eng.n_partitions == 3
    assert all(len(p.entities) for p in eng._parts)  # every partition holds entities
    with pytest.raises(ValueError, match="partition_events"):
        LocalEngine(partition_events=0)


def test_states_and_values_as_of_t_are_the_same_for_every_set(small_sim, split_engine):
    ev = EventLog(small_sim / "events").read()
    rng = np.random.default_rng(11)
    for fs in SETS:
        lay = StateLayout(fs)
        one, split = BatchEngine(lay, ev), split_engine.batch_engine(lay, ev)
        assert np.array_equal(one.entities, split.entities), fs.name
        codes = np.concatenate([np.repeat(one.entities, 2), one.entities[:7] + 99_991, [-1, -1]])
        rng.shuffle(codes)
        t = rng.integers(int(ev.ts.min()) - 1_000, int(ev.ts.max()) + 5 * 86_400_000, len(codes))
        assert one.states_asof(codes, t).tobytes() == split.states_asof(codes, t).tobytes(), fs.name
        f1, f2 = one.features_asof(codes, t), split.features_asof(codes, t)
        assert f1.columns == f2.columns and np.array_equal(f1.feature_ts, f2.feature_ts)
        assert f1.values.tobytes() == f2.values.tobytes() and np.array_equal(f1.missing, f2.missing), fs.name


def test_materialisation_writes_the_same_records_and_watermarks(small_sim, split_engine):
    log = EventLog(small_sim / "events")
    ev = log.read()
    cut = int(np.quantile(ev.ts, 0.6))
    out = []
    for engine in (None, split_engine):
        store = _store()
        save_mode(store, SETS[3], SetMode(ServingMode.ON_READ))
        reports = [materialize(log, store, SETS, until_ts=cut, engine=engine), materialize(log, store, SETS, engine=engine)]
        out.append((store, reports))
    (one, rep_one), (split, rep_split) = out
    assert rep_one == rep_split
    a, b = _records(one), _records(split)
    assert len(a) > 0 and list(a) == list(b) and all(a[k] == b[k] for k in a)
    assert one.seen(ev.event_id.tolist()) == split.seen(ev.event_id.tolist())
    for fs in SETS:
        m1, m2 = json.loads(one.get_meta(watermark_key(fs))), json.loads(split.get_meta(watermark_key(fs)))
        m1.pop("at_ms"), m2.pop("at_ms")
        assert m1 == m2


def test_training_rows_are_the_same_arrays_in_the_same_order(small_sim, split_engine):
    from models.data import build_training_data

    one = build_training_data(small_sim, seed=0)
    split = build_training_data(small_sim, seed=0, engine=split_engine)
    for a, b in ((one.train, split.train), (one.valid, split.valid), (one.test, split.test)):
        for name in ("user_id", "item_id", "ts", "label", "H"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert a.X.tobytes() == b.X.tobytes()
    assert one.fingerprint() == split.fingerprint()
