"""The batch path on Ray gives the single-process path's results, byte for byte.

One local Ray cluster per module (`ray.cluster_utils.Cluster`, a head node with two CPUs, so
two worker actors), joined by address as `--engine ray --address` does (which ships the
features package to the workers), shut down at the end. The small simulated data set is
materialised with both engines into two memory stores and every record compared; states as
of t and the point-in-time join's training rows are compared array by array, in order."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.batch import BatchEngine
from features.engines import LOCAL, open_engine
from features.eventlog import EventLog
from features.materialize import materialize, watermark_key
from features.modes import ServingMode, SetMode, save_mode
from features.online.memory import MemoryStore
from features.repo import feature_sets
from features.state import StateLayout

ROOT = Path(__file__).resolve().parents[2]
SETS = feature_sets("simulated", 20)


@pytest.fixture(scope="module")
def cluster():
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        reason = "ray is not installed (the `ray` extra: pip install -e '.[ray]')"
        if os.environ.get("PARITY_REQUIRE_RAY") == "1":
            pytest.fail(reason + " and PARITY_REQUIRE_RAY=1", pytrace=False)
        pytest.skip(reason)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 256 << 20})
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def ray_engine(cluster):
    with open_engine("ray", cluster.address) as eng:
        yield eng
    import ray

    assert not ray.is_initialized()  # the engine joined the cluster, so it leaves it


def _store() -> MemoryStore:
    return MemoryStore("t", clock=lambda: 1_700_000_000.0)


def _records(store: MemoryStore) -> dict:
    keys = sorted(store.iter_keys(), key=lambda k: (k.feature_set, k.version, k.entity_id))
    return dict(zip(keys, store.get_many(keys)))


def _meta(store: MemoryStore) -> dict:
    out = {}
    for fs in SETS:
        m = json.loads(store.get_meta(watermark_key(fs)))
        m.pop("at_ms")  # wall-clock time of the run
        out[fs.name] = m
    return out


def test_the_engine_runs_two_workers_over_entity_partitions(ray_engine):
    assert ray_engine.workers == 2
    assert ray_engine.n_partitions == 4


def test_materialisation_on_ray_writes_every_record_with_the_same_bytes(small_sim, ray_engine):
    """Full, then incremental to the end of the log, with one set served on_read (state
    records only): the two stores hold the same keys, bytes, dedupe markers and watermarks."""
    log = EventLog(small_sim / "events")
    ev = log.read()
    cut = int(np.quantile(ev.ts, 0.6))
    stores = []
    for engine in (None, ray_engine):
        store = _store()
        save_mode(store, SETS[3], SetMode(ServingMode.ON_READ))
        reports = [materialize(log, store, SETS, until_ts=cut, engine=engine), materialize(log, store, SETS, engine=engine)]
        stores.append((store, reports))
    (one, rep_one), (ray, rep_ray) = stores
    assert [r.mode for r in rep_ray[1]] == ["incremental"] * len(SETS)
    assert rep_one == rep_ray
    a, b = _records(one), _records(ray)
    assert len(a) > 0 and list(a) == list(b)
    assert all(a[k] == b[k] for k in a)
    assert {k.version.endswith(".v") for k in a if k.feature_set == SETS[3].name} == {False}  # on_read: states only
    assert one.seen(ev.event_id.tolist()) == ray.seen(ev.event_id.tolist())
    assert _meta(one) == _meta(ray)


def test_state_as_of_t_on_ray_is_the_same_for_every_set(small_sim, ray_engine):
    """Rows in a shuffled order, entities without events and invalid ids among them, times
    before, inside and after the log: the same state bytes and feature values, row by row."""
    ev = EventLog(small_sim / "events").read()
    rng = np.random.default_rng(7)
    for fs in SETS:
        lay = StateLayout(fs)
        local, remote = BatchEngine(lay, ev), ray_engine.batch_engine(lay, ev)
        assert np.array_equal(local.entities, remote.entities)
        codes = np.concatenate([np.repeat(local.entities, 3), local.entities[:7] + 99_991, [-1, -1]])
        rng.shuffle(codes)
        t = rng.integers(int(ev.ts.min()) - 1_000, int(ev.ts.max()) + 5 * 86_400_000, len(codes))
        assert local.states_asof(codes, t).tobytes() == remote.states_asof(codes, t).tobytes(), fs.name
        f1, f2 = local.features_asof(codes, t), remote.features_asof(codes, t)
        assert f1.columns == f2.columns
        assert np.array_equal(f1.values, f2.values) and np.array_equal(f1.missing, f2.missing), fs.name
        assert np.array_equal(f1.feature_ts, f2.feature_ts)
        remote.close()


def test_training_rows_joined_on_ray_are_the_same_arrays_in_the_same_order(small_sim, ray_engine):
    from models.data import build_training_data

    one = build_training_data(small_sim, seed=0)
    ray = build_training_data(small_sim, seed=0, engine=ray_engine)
    assert len(one.train) > 0
    for a, b in ((one.train, ray.train), (one.valid, ray.valid), (one.test, ray.test)):
        for name in ("user_id", "item_id", "ts", "label", "H"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert a.X.tobytes() == b.X.tobytes()  # NaN (missing) in the same places, every value the same bits
    assert one.fingerprint() == ray.fingerprint()


def test_the_materialize_command_runs_on_ray_with_an_address(small_sim, cluster, ray_engine, capsys):
    """In this process Ray is already connected (the fixture's engine), so the command's engine
    uses that connection; its report equals the local command's."""
    from parity.cli import main

    out = {}
    for extra in ([], ["--engine", "ray", "--address", cluster.address]):
        assert main(["features", "materialize", "--events", str(small_sim), "--no-offline", *extra]) == 0
        out[bool(extra)] = capsys.readouterr().out.splitlines()
    assert out[True][0] == "engine ray: 2 workers, 4 partitions"
    online = lambda lines: [ln for ln in lines if ln.startswith("online ")]  # noqa: E731
    assert len(online(out[False])) == len(SETS) and online(out[True]) == online(out[False])


def test_engine_ray_without_ray_installed_is_an_error_naming_the_flag(small_sim):
    code = ("import sys; sys.modules['ray'] = None\nfrom parity.cli import main\n"
            f"main(['features', 'materialize', '--events', {str(small_sim)!r}, '--no-offline', '--engine', 'ray'])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0
    assert "--engine ray" in p.stderr and "pip install 'parity[ray]'" in p.stderr, p.stderr


def test_an_address_without_engine_ray_is_refused(small_sim):
    p = subprocess.run([sys.executable, "-m", "parity", "features", "materialize", "--events", str(small_sim), "--no-offline",
                        "--address", "127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "--address needs --engine ray" in p.stderr


def test_the_server_and_the_feature_store_never_import_ray():
    """Ray is an optional extra: importing the server, every features module and the CLI
    neither needs it nor loads it (the ray engine imports it only when opened)."""
    mods = sorted({f"features.{p.stem}" for p in (ROOT / "features").glob("*.py") if p.stem != "__init__"} | {"server", "parity.cli"})
    code = "import sys\n" + "".join(f"import {m}\n" for m in mods) + "print('ray' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_the_local_engine_is_the_default_and_takes_no_address():
    assert open_engine().name == LOCAL.name == "local"
    with pytest.raises(ValueError, match="engine must be one of local, ray"):
        open_engine("spark")
    with pytest.raises(ValueError, match="takes no address"):
        open_engine("local", "127.0.0.1:6379")


def test_a_dead_worker_is_replaced_and_its_partitions_rebuilt_with_the_same_answers(small_sim, ray_engine):
    """kill a worker actor (as a crash or a lost node would): the next call on its partitions
    starts one replacement, rebuilds them there, for every set's engine, and answers the same
    bytes; a materialisation that starts on a dead worker writes what the local path writes."""
    import ray

    from features.engine_ray import RayEngine

    log = EventLog(small_sim / "events")
    ev = log.read()
    t_end = int(ev.ts.max()) + 1
    eng = RayEngine(workers=2)  # joins the module's connection; its own actors
    try:
        lays = [StateLayout(SETS[0]), StateLayout(SETS[1])]
        local = [BatchEngine(lay, ev) for lay in lays]
        remote = [eng.batch_engine(lay, ev) for lay in lays]
        codes = [e.entities for e in local]
        t = [np.full(len(c), t_end) for c in codes]
        assert remote[0].states_asof(codes[0], t[0]).tobytes() == local[0].states_asof(codes[0], t[0]).tobytes()
        ray.kill(eng.actor_of(0), no_restart=True)  # partitions 0 and 2 of both sets go with it
        assert remote[0].states_asof(codes[0], t[0]).tobytes() == local[0].states_asof(codes[0], t[0]).tobytes()
        assert eng.recoveries == 1 and eng.generations == [1, 0]
        f1, f2 = local[1].features_asof(codes[1], t[1]), remote[1].features_asof(codes[1], t[1])
        assert np.array_equal(f1.values, f2.values) and np.array_equal(f1.missing, f2.missing)
        assert eng.recoveries == 1  # the second set rebuilt its partitions on the replacement, no second one
        ray.kill(eng.actor_of(1), no_restart=True)
        stores = [_store(), _store()]
        reports = [materialize(log, stores[0], SETS), materialize(log, stores[1], SETS, engine=eng)]
        assert eng.recoveries == 2 and reports[0] == reports[1]
        a, b = _records(stores[0]), _records(stores[1])
        assert len(a) > 0 and list(a) == list(b) and all(a[k] == b[k] for k in a)
        for r in remote:
            r.close()
    finally:
        eng.close()


def test_with_no_recoveries_allowed_a_dead_worker_is_an_error(small_sim, ray_engine):
    import ray
    from ray.exceptions import RayActorError

    from features.engine_ray import RayEngine

    ev = EventLog(small_sim / "events").read()
    eng = RayEngine(workers=2, max_recoveries=0)
    try:
        remote = eng.batch_engine(StateLayout(SETS[0]), ev)
        _ = remote.entities
        ray.kill(eng.actor_of(1), no_restart=True)
        with pytest.raises(RayActorError):
            remote.states_asof(remote.entities, np.full(len(remote.entities), int(ev.ts.max())))
        assert eng.recoveries == 0
    finally:
        eng.close()
    with pytest.raises(ValueError, match="max_recoveries"):
        RayEngine(workers=1, max_recoveries=-1)
