"""Feature-store benchmarks: batch computation, streaming ingest, online reads, PIT join.

Every figure is a real measurement of this run; every ratio is against a baseline measured
in the same run (extra_info["baseline"] names it; bench/report.py computes the ratio from
the JSON). extra_info conventions read by the report:

  work, unit   what one call processes ("events", "rows", "reads"): throughput = work / mean
  events, rows derived figures (events consumed, spine rows produced)
  baseline     name of the benchmark this one is compared with (time per unit of work)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from bench.conftest import Dataset
from features.batch import BatchEngine
from features.events import EventBatch, EventType
from features.lookup import FeatureLookup, LookupRequest, record_keys
from features.online.base import format_key
from features.online.memory import MemoryStore
from features.pit import PitJoiner
from features.served_values import served_values, state_writes, values_keys
from features.state import StateLayout, read_features
from features.streaming import StreamingIngestor

BATCH_SPINE_ROWS = 200_000
PIT_SPINE_ROWS = 100_000
STREAM_EVENTS = 100_000
STREAM_BATCH = 1_000
READ_ITEMS = 500


def _set(ds: Dataset, name: str):
    return next(fs for fs in ds.sets if fs.name == name)


def _finish(benchmark, **extra) -> None:
    """Attach derived figures; rates use the mean measured just now."""
    benchmark.extra_info.update(extra)
    mean = benchmark.stats.stats.mean
    for key in ("events", "rows"):
        if key in extra:
            benchmark.extra_info[f"{key}_per_s"] = round(extra[key] / mean, 1)


# -- 1. batch feature computation ---------------------------------------------------------
def _spine(ds: Dataset, fs, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(entity code, t) rows at the times of random events of the set (a training spine)."""
    rng = np.random.default_rng(seed)
    codes, ok = fs.entity.codes(ds.events)
    idx = rng.choice(np.flatnonzero(ok), size=n, replace=True)
    return codes[idx], ds.events.ts[idx]


@pytest.mark.benchmark(group="batch")
def test_batch_user_activity(benchmark, dataset: Dataset) -> None:
    """BatchEngine construction + features_asof for a 200k-row (user, t) spine."""
    fs = _set(dataset, "user_activity")
    lay = StateLayout(fs)
    codes, t = _spine(dataset, fs, BATCH_SPINE_ROWS, seed=1)
    n_events = int(fs.event_mask(dataset.events).sum())

    def run():
        return BatchEngine(lay, dataset.events).features_asof(codes, t)

    # one warm-up round: the first call page-faults ~400 MB of fresh state records per chunk
    frame = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert frame.values.shape == (BATCH_SPINE_ROWS, len(lay.columns))
    assert (frame.feature_ts >= 0).mean() > 0.5  # most rows see some history
    _finish(
        benchmark, work=BATCH_SPINE_ROWS, unit="rows", events=n_events, rows=BATCH_SPINE_ROWS,
        log_events=len(dataset.events), feature_columns=len(lay.columns), record_bytes=lay.record_size,
    )  # fmt: skip


@pytest.mark.benchmark(group="batch")
def test_batch_user_activity_asof_only(benchmark, dataset: Dataset) -> None:
    """features_asof alone on a prebuilt engine: splits the figure above into build vs per-row."""
    fs = _set(dataset, "user_activity")
    lay = StateLayout(fs)
    codes, t = _spine(dataset, fs, BATCH_SPINE_ROWS, seed=1)
    engine = BatchEngine(lay, dataset.events)
    benchmark.pedantic(engine.features_asof, args=(codes, t), rounds=3, iterations=1)
    _finish(benchmark, work=BATCH_SPINE_ROWS, unit="rows", rows=BATCH_SPINE_ROWS, baseline="test_batch_user_activity")


# -- 2. streaming ingest --------------------------------------------------------------------
def _stream_batches(ds: Dataset) -> list[EventBatch]:
    """The first STREAM_EVENTS events of the log in ts order, as 1000-event batches."""
    head = ds.events.take(np.arange(min(STREAM_EVENTS, len(ds.events))))
    return [head.take(np.arange(a, min(a + STREAM_BATCH, len(head)))) for a in range(0, len(head), STREAM_BATCH)]


def _ingest_all(ingestor: StreamingIngestor, batches: list[EventBatch]) -> int:
    return sum(ingestor.ingest(b).accepted for b in batches)


def _stream_run(benchmark, dataset: Dataset, **extra) -> None:
    batches = _stream_batches(dataset)
    n = sum(len(b) for b in batches)

    def setup():
        return (StreamingIngestor(MemoryStore("bench"), dataset.sets), batches), {}

    accepted = benchmark.pedantic(_ingest_all, setup=setup, rounds=3, iterations=1)
    assert accepted == n
    _finish(benchmark, work=n, unit="events", events=n, batch_size=STREAM_BATCH, **extra)


@pytest.mark.benchmark(group="streaming")
def test_stream_memory(benchmark, dataset: Dataset) -> None:
    """StreamingIngestor over all feature sets into a fresh MemoryStore, 1000 events a batch."""
    _stream_run(benchmark, dataset, feature_sets=len(dataset.sets))


@pytest.mark.benchmark(group="streaming")
def test_stream_memory_state_only(benchmark, dataset: Dataset, monkeypatch) -> None:
    """Diagnostic: the same ingest writing each state alone, without the served-values record
    beside it (features/served_values.py): what the values records cost the write path."""
    import features.streaming as streaming
    from features.served_values import writes_of

    monkeypatch.setattr(streaming, "state_writes", lambda lay, keys, states, t_ref=None: writes_of(lay, keys, lay.encode(states), None))
    _stream_run(benchmark, dataset, baseline="test_stream_memory")


@pytest.mark.redis
@pytest.mark.benchmark(group="streaming")
def test_stream_redis(benchmark, dataset: Dataset, redis_url: str) -> None:
    """The same ingest into a private Redis (one MULTI/EXEC commit per batch)."""
    import redis

    from features.online.redis_store import RedisStore

    batches = _stream_batches(dataset)
    n = sum(len(b) for b in batches)
    admin = redis.Redis.from_url(redis_url)
    stores: list[RedisStore] = []

    def setup():
        for s in stores:
            s.close()
        stores.clear()
        admin.flushall()
        store = RedisStore(redis_url, namespace="bench", socket_timeout_s=10.0)
        stores.append(store)
        return (StreamingIngestor(store, dataset.sets), batches), {}

    try:
        accepted = benchmark.pedantic(_ingest_all, setup=setup, rounds=3, iterations=1)
        keys = admin.dbsize()
        used = int(admin.info("memory")["used_memory"])
    finally:
        for s in stores:
            s.close()
        admin.close()
    assert accepted == n
    _finish(
        benchmark, work=n, unit="events", events=n, batch_size=STREAM_BATCH, baseline="test_stream_memory",
        redis_keys_after=keys, redis_used_memory_mb=round(used / 2**20, 1),
    )  # fmt: skip


# -- 3. online read: one user + 500 items ----------------------------------------------------
@dataclass
class _Online:
    user_fs: object
    item_fs: object
    users: np.ndarray  # user codes to read (cycled)
    item_sets: list[np.ndarray]  # 500-item candidate lists (cycled)
    now: int


def _online_fixture(ds: Dataset) -> tuple[_Online, dict]:
    """States of every user and item as of now, from the batch engine (the materialiser's math)."""
    user_fs, item_fs = _set(ds, "user_activity"), _set(ds, "item_popularity")
    now = ds.now_ms
    states = {}
    for fs in (user_fs, item_fs):
        lay = StateLayout(fs)
        eng = BatchEngine(lay, ds.events)
        st = eng.states_asof(eng.entities, np.full(len(eng.entities), now, dtype=np.int64))
        states[fs.name] = (lay, eng.entities, st, read_features(lay, st, now))
    rng = np.random.default_rng(7)
    users = rng.choice(states[user_fs.name][1], size=64, replace=False)
    items_all = states[item_fs.name][1]
    item_sets = [np.sort(rng.choice(items_all, size=READ_ITEMS, replace=False)) for _ in range(16)]
    return _Online(user_fs, item_fs, users, item_sets, now), states


@pytest.fixture(scope="module")
def online(dataset: Dataset):
    return _online_fixture(dataset)


def _write_packed(store, states: dict) -> int:
    """State records and their served-values records, as every writer stores them."""
    n = 0
    for lay, codes, st, _ in states.values():
        fs = lay.feature_set
        keys = record_keys(fs, codes)
        for a in range(0, len(keys), 2000):
            store.commit(state_writes(lay, keys[a : a + 2000], st[a : a + 2000]))
        n += len(keys)
    return n


def _naive_key(fs, code: int) -> str:
    return f"naive:{fs.name}:{fs.entity.key_id(code)}"


def _write_naive(client, states: dict) -> None:
    """One hash per entity, one field per feature column, values as Python float strings."""
    for lay, codes, _, frame in states.values():
        fs = lay.feature_set
        pipe = client.pipeline(transaction=False)
        for i, code in enumerate(codes.tolist()):
            pipe.hset(_naive_key(fs, code), mapping={c: repr(v) for c, v in zip(frame.columns, frame.values[i].tolist())})
            if len(pipe) >= 2000:
                pipe.execute()
        pipe.execute()


class _Cycle:
    def __init__(self, o: _Online) -> None:
        self.o, self.i = o, 0

    def next(self) -> tuple[int, np.ndarray]:
        o, i = self.o, self.i
        self.i += 1
        return int(o.users[i % len(o.users)]), o.item_sets[i % len(o.item_sets)]


def _packed_reader(store, o: _Online, repair: bool = False):
    """The product's read: FeatureLookup.read_many (served-values records, states where they cannot answer)."""
    lookup = FeatureLookup(store, [o.user_fs, o.item_fs])
    cyc = _Cycle(o)

    def read():
        user, items = cyc.next()
        res = lookup.read_many(
            [LookupRequest(o.user_fs.name, np.asarray([user], dtype=np.int64)), LookupRequest(o.item_fs.name, items)], o.now, repair=repair
        )
        return res[0].frame.values, res[1].frame.values

    return read


def _state_reader(store, o: _Online):
    """The read before served-values records: every entity's state record, decoded, read_features."""
    lays = {fs.name: StateLayout(fs) for fs in (o.user_fs, o.item_fs)}
    cyc = _Cycle(o)

    def read():
        user, items = cyc.next()
        lu, li = lays[o.user_fs.name], lays[o.item_fs.name]
        raw = store.get_many(record_keys(o.user_fs, [user]) + record_keys(o.item_fs, items))
        return read_features(lu, lu.decode(raw[:1])[0], o.now).values, read_features(li, li.decode(raw[1:])[0], o.now).values

    return read


def _values_hit_rate(store, o: _Online) -> float:
    """Share of the benchmark's reads answered by values records alone."""
    from features.served_values import expired as values_expired

    hits = total = 0
    for fs, codes in ((o.user_fs, o.users), (o.item_fs, np.unique(np.concatenate(o.item_sets)))):
        raw = store.get_many(values_keys(record_keys(fs, codes)))
        e = values_expired(StateLayout(fs), raw, o.now)
        hits += int((~e).sum())
        total += len(e)
    return round(hits / total, 4)


def _naive_reader(client, o: _Online, states: dict):
    cols = {fs.name: [c.encode() for c in fs.columns] for fs in (o.user_fs, o.item_fs)}
    defaults = {fs.name: [f.default for f in fs.features for _ in f.columns] for fs in (o.user_fs, o.item_fs)}
    cyc = _Cycle(o)

    def decode(fs, hashes) -> np.ndarray:
        names, dflt = cols[fs.name], defaults[fs.name]
        out = np.empty((len(hashes), len(names)), dtype=np.float64)
        for r, h in enumerate(hashes):
            out[r] = [float(h[c]) for c in names] if h else dflt
        return out

    def read():
        user, items = cyc.next()
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(_naive_key(o.user_fs, user))
        for code in items.tolist():
            pipe.hgetall(_naive_key(o.item_fs, code))
        raw = pipe.execute()
        return decode(o.user_fs, raw[:1]), decode(o.item_fs, raw[1:])

    return read


def _check_same(o: _Online, states: dict, reader) -> None:
    """Both layouts must serve the very values read_features gives at `now`."""
    user, items = _Cycle(o).next()
    u_vals, i_vals = reader()
    for fs, codes, vals in ((o.user_fs, [user], u_vals), (o.item_fs, items, i_vals)):
        _, ents, _, frame = states[fs.name]
        np.testing.assert_array_equal(vals, frame.values[np.searchsorted(ents, codes)])


@pytest.fixture(scope="module")
def online_redis(online, redis_server):
    """Both layouts materialised once into the private Redis, from the same states."""
    import redis

    from features.online.redis_store import RedisStore

    o, states = online
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    store = RedisStore(redis_server.url, namespace="bench", socket_timeout_s=10.0)
    n = _write_packed(store, states)
    _write_naive(client, states)
    sizes = {}
    for label, key in (
        ("packed", lambda fs, c: format_key("bench", record_keys(fs, [c])[0])),
        ("naive", _naive_key),
    ):
        for fs, codes in ((o.user_fs, o.users), (o.item_fs, o.item_sets[0][:64])):
            mem = [client.memory_usage(key(fs, int(c))) for c in codes]
            sizes[f"redis_bytes_per_{fs.entity.name}_{label}"] = int(np.mean(mem))
    yield o, states, store, client, n, sizes
    store.close()
    client.close()


@pytest.mark.redis
@pytest.mark.benchmark(group="online_read")
def test_read_state_redis(benchmark, online_redis) -> None:
    """Baseline: the read before served-values records (501 state records of ~2 KB, decoded, windows computed on read)."""
    o, states, store, _, n, sizes = online_redis
    read = _state_reader(store, o)
    _check_same(o, states, _state_reader(store, o))
    benchmark.pedantic(read, rounds=200, iterations=1, warmup_rounds=5)
    _finish(benchmark, work=1, unit="reads", keys_per_read=1 + READ_ITEMS, records_materialised=n,
            state_bytes_user=StateLayout(o.user_fs).record_size, state_bytes_item=StateLayout(o.item_fs).record_size)


@pytest.mark.redis
@pytest.mark.benchmark(group="online_read")
def test_read_packed_redis(benchmark, online_redis) -> None:
    """The product: served-values records (one MGET of ~130-330 byte records, one multiply per
    decayed column), after one pass of reads has repaired the records of entities that were
    quiet since their last event (the steady state of a server)."""
    o, states, store, _, n, sizes = online_redis
    warm = _packed_reader(store, o, repair=True)
    for _ in range(max(len(o.users), len(o.item_sets))):
        warm()
    read = _packed_reader(store, o)
    _check_same(o, states, _packed_reader(store, o))
    benchmark.pedantic(read, rounds=200, iterations=1, warmup_rounds=5)
    _finish(benchmark, work=1, unit="reads", keys_per_read=1 + READ_ITEMS, baseline="test_read_state_redis",
            values_hit_rate=_values_hit_rate(store, o), values_bytes_user=served_values(StateLayout(o.user_fs)).record_size,
            values_bytes_item=served_values(StateLayout(o.item_fs)).record_size)


@pytest.mark.redis
@pytest.mark.benchmark(group="online_read")
def test_read_packed_redis_cold(benchmark, online, redis_server) -> None:
    """Served-values records as their writers left them (values as of each entity's newest
    event, no read has repaired them): entities quiet since then read their state as well, in
    a second round trip."""
    from features.online.redis_store import RedisStore

    o, states = online
    store = RedisStore(redis_server.url, namespace="benchcold", socket_timeout_s=10.0)
    try:
        _write_packed(store, states)
        hit = _values_hit_rate(store, o)
        read = _packed_reader(store, o)
        _check_same(o, states, _packed_reader(store, o))
        benchmark.pedantic(read, rounds=200, iterations=1, warmup_rounds=5)
    finally:
        store.clear_namespace()
        store.close()
    _finish(benchmark, work=1, unit="reads", keys_per_read=1 + READ_ITEMS, baseline="test_read_state_redis", values_hit_rate=hit)


@pytest.mark.redis
@pytest.mark.benchmark(group="online_read")
def test_read_naive_redis(benchmark, online_redis) -> None:
    """Naive layout: a hash per entity, field per column; pipeline of 501 HGETALL, float() per field."""
    o, states, _, client, _, sizes = online_redis
    read = _naive_reader(client, o, states)
    _check_same(o, states, _naive_reader(client, o, states))
    benchmark.pedantic(read, rounds=200, iterations=1, warmup_rounds=5)
    _finish(benchmark, work=1, unit="reads", keys_per_read=1 + READ_ITEMS, baseline="test_read_state_redis", **sizes)


@pytest.mark.redis
@pytest.mark.benchmark(group="online_read")
def test_read_packed_redis_prebuilt_keys(benchmark, online_redis) -> None:
    """Diagnostic: the packed layout read as `RedisStore.get_many` did before it used MGET: key
    strings formatted once (no per-call key building or validation), a raw pipeline of 501
    GETs, then decode + read_features. Slower than the store's MGET read despite the
    prebuilt keys: the pipeline packs and parses 501 commands instead of one."""
    o, states, _, client, _, _ = online_redis
    lays = {fs.name: StateLayout(fs) for fs in (o.user_fs, o.item_fs)}
    ukeys = {int(c): format_key("bench", k) for c, k in zip(o.users, record_keys(o.user_fs, o.users))}
    all_items = np.unique(np.concatenate(o.item_sets))
    ikeys = {int(c): format_key("bench", k) for c, k in zip(all_items, record_keys(o.item_fs, all_items))}
    cyc = _Cycle(o)

    def read():
        user, items = cyc.next()
        pipe = client.pipeline(transaction=False)
        pipe.get(ukeys[user])
        for c in items.tolist():
            pipe.get(ikeys[c])
        raw = pipe.execute()
        lu, li = lays[o.user_fs.name], lays[o.item_fs.name]
        u = read_features(lu, lu.decode(raw[:1])[0], o.now)
        i = read_features(li, li.decode(raw[1:])[0], o.now)
        return u.values, i.values

    _check_same(o, states, read)
    cyc.i = 0
    benchmark.pedantic(read, rounds=200, iterations=1, warmup_rounds=5)
    _finish(benchmark, work=1, unit="reads", keys_per_read=1 + READ_ITEMS, baseline="test_read_state_redis")


@pytest.mark.benchmark(group="online_read")
def test_read_packed_memory(benchmark, online) -> None:
    """Reference: the product's read (steady state, as test_read_packed_redis) against the in-process MemoryStore."""
    o, states = online
    store = MemoryStore("bench")
    n = _write_packed(store, states)
    warm = _packed_reader(store, o, repair=True)
    for _ in range(max(len(o.users), len(o.item_sets))):
        warm()
    read = _packed_reader(store, o)
    _check_same(o, states, _packed_reader(store, o))
    benchmark.pedantic(read, rounds=200, iterations=1, warmup_rounds=5)
    _finish(benchmark, work=1, unit="reads", keys_per_read=1 + READ_ITEMS, records_materialised=n, baseline="test_read_state_redis")


# -- 4. point-in-time join end to end ------------------------------------------------------------
@pytest.mark.benchmark(group="pit")
def test_pit_join_all_sets(benchmark, dataset: Dataset) -> None:
    """PitJoiner over all four sets (engines built inside the timing) for a 100k impression spine."""
    ev = dataset.events
    rng = np.random.default_rng(3)
    idx = np.sort(rng.choice(np.flatnonzero(ev.type == int(EventType.IMPRESSION)), size=PIT_SPINE_ROWS, replace=False))
    spine = pa.table(
        {
            "user_id": ev.user_id[idx], "item_id": ev.item_id[idx], "topic": ev.topic[idx],
            "creator_id": ev.creator_id[idx], "ts": ev.ts[idx],
        }
    )  # fmt: skip

    timings: dict[str, list[float]] = {"build_s": [], "join_s": []}

    def run():
        t0 = time.perf_counter()
        joiner = PitJoiner(dataset.sets, ev)
        t1 = time.perf_counter()
        out = joiner.join(spine)
        t2 = time.perf_counter()
        timings["build_s"].append(t1 - t0)
        timings["join_s"].append(t2 - t1)
        return out

    out = benchmark.pedantic(run, rounds=3, iterations=1)
    assert out.num_rows == PIT_SPINE_ROWS
    _finish(
        benchmark, work=PIT_SPINE_ROWS, unit="rows", rows=PIT_SPINE_ROWS, events=len(ev),
        feature_sets=len(dataset.sets), output_columns=out.num_columns,
        build_s_mean=round(float(np.mean(timings["build_s"])), 3), join_s_mean=round(float(np.mean(timings["join_s"])), 3),
    )  # fmt: skip
