"""The batch path in one process vs on Ray: materialisation and point-in-time-join throughput.

    python -m bench.batch_engines --out bench/results/batch_engines.json [--users 11000 --days 14] [--rounds 3] [--work DIR]

On one simulated log (~1M events at the defaults), in the same run and in alternating order
per round (so drift on a shared machine falls on both): a full materialisation of every
feature set into a fresh memory store, and the point-in-time join that builds the ranker's
training rows (PitJoiner over the ranker's sets, then `feature_matrix` for every labelled
impression: models.data's path), each with the local engine and with Ray (a local cluster
with `--ray-cpus` CPUs, one worker actor each, P = workers x k partitions). Throughput is
events of the log per second; the ratio is Ray's over the local engine's, per round, and the
spread over rounds is reported. Both engines' outputs are hashed every round and must match.

Where Ray's time goes: one more run of each operation with Ray under cProfile (the driver's
phases: partitioning, waiting on the workers, writing) and `ray.timeline()` (the workers'
phases: method execution per actor, argument deserialisation, result storing). The cluster's
start-up is timed once and is not in the throughput.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import hashlib
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import machine, write_json

__all__ = ["main"]


def _say(msg: str) -> None:
    print(f"[batch-engines] {msg}", flush=True)


def _data(work: Path, users: int, items: int, days: int, seed: int) -> Path:
    from features.simulator import simulate

    d = work / f"sim-u{users}-i{items}-d{days}-s{seed}"
    if not (d / "events").is_dir():
        t = time.perf_counter()
        simulate(d, users=users, items=items, days=days, seed=seed)
        _say(f"simulated {d} in {time.perf_counter() - t:.1f} s")
    return d


def _digest_store(store) -> str:
    h = hashlib.sha256()
    keys = sorted(store.iter_keys(), key=lambda k: (k.feature_set, k.version, k.entity_id))
    for k, v in zip(keys, store.get_many(keys)):
        h.update(f"{k.feature_set}:{k.version}:{k.entity_id}".encode())
        h.update(v)
    return h.hexdigest()[:16]


def _materialise(data: Path, engine) -> tuple[float, dict]:
    from features.eventlog import EventLog
    from features.materialize import materialize
    from features.online.memory import MemoryStore
    from features.repo import feature_sets
    from features.datasets import load_info

    info = load_info(data)
    log = EventLog(data / "events")
    store = MemoryStore("bench")
    t = time.perf_counter()
    reports = materialize(log, store, feature_sets(info.kind, info.n_topics), engine=engine)
    s = time.perf_counter() - t
    return s, {"events": reports[0].events_read, "records": sum(r.entities_written for r in reports), "digest": _digest_store(store)}


class _PitInputs:
    """What the training-data join reads, loaded once (the log read is not the join's cost)."""

    def __init__(self, data: Path) -> None:
        from features.catalog import ItemCatalog
        from features.datasets import load_info, read_items
        from features.eventlog import EventLog
        from features.assemble import ranker_inputs
        from features.repo import feature_sets
        from models.data import label_rows

        self.info = load_info(data)
        sets = feature_sets(self.info.kind, self.info.n_topics)
        self.events = EventLog(data / "events").read(must_exist=True).deduplicated()
        self.items = ItemCatalog.from_table(read_items(data))
        self.rows = label_rows(self.info.kind, self.events, self.items, seed=0)
        self.inputs = ranker_inputs(sets)
        self.needed = [fs for fs in sets if fs.name in self.inputs.sets]


def _pit(inp: _PitInputs, engine) -> tuple[float, dict]:
    from features.pit import PitJoiner
    from models.data import feature_matrix

    t = time.perf_counter()
    joiner = PitJoiner(inp.needed, inp.events, engine)
    X = feature_matrix(inp.inputs, joiner, inp.needed, inp.items, inp.rows.user_id, inp.rows.item_id, inp.rows.ts)
    s = time.perf_counter() - t
    joiner.close()
    return s, {"events": int(len(inp.events)), "rows": int(len(X)), "digest": hashlib.sha256(X.tobytes()).hexdigest()[:16]}


_DRIVER_PHASES = {  # (file suffix, function) -> phase name: where the driver's time goes on Ray
    ("features/engine_ray.py", "__init__"): "partition the events and submit the builds (RayBatchEngine)",
    ("features/engine_ray.py", "_ready"): "wait for the partitions' engines (build on the workers; inside the next two)",
    ("features/engine_ray.py", "_routed"): "route the query rows, wait for the answers (join)",
    ("features/engine_ray.py", "map_chunks"): "submit the record computation, wait for the records (materialise)",
    ("features/served_values.py", "writes_of"): "wrap the records into writes with their keys",
    ("features/online/memory.py", "commit"): "commit the writes to the store",
    ("features/eventlog.py", "read"): "read the event log",
    ("features/partition.py", "split_by_partition"): "hash-partition rows (inside the above)",
    ("features/batch.py", "__init__"): "build the batch engines (local)",
    ("features/batch.py", "features_asof"): "features as of t (local)",
    ("features/materialize.py", "_records"): "states and records (local)",
}


def _driver_profile(fn) -> tuple[float, dict]:
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    wall = time.perf_counter() - t
    st = pstats.Stats(prof)
    out: dict[str, float] = collections.defaultdict(float)
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        for (suffix, name), phase in _DRIVER_PHASES.items():
            if func == name and file.endswith(suffix):
                out[phase] += ct
    return wall, {k: round(v, 3) for k, v in out.items()}


def _worker_timeline(since_us: float) -> dict:
    """Seconds per Ray timeline span name since `since_us` (epoch µs), summed over the workers."""
    import ray

    tot: dict[str, float] = collections.defaultdict(float)
    n: dict[str, int] = collections.defaultdict(int)
    for e in ray.timeline():
        if e.get("ph") == "X" and e.get("ts", 0) >= since_us:
            tot[e["name"]] += e["dur"] / 1e6
            n[e["name"]] += 1
    return {k: {"seconds": round(v, 3), "calls": n[k]} for k, v in sorted(tot.items(), key=lambda kv: -kv[1])}


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "values": [round(x, 4) for x in xs]}


def run(users: int, items: int, days: int, seed: int, rounds: int, ray_cpus: int, k: int, work: Path) -> dict:
    from features.engines import LOCAL, open_engine

    data = _data(work, users, items, days, seed)
    t = time.perf_counter()
    inp = _PitInputs(data)
    _say(f"{len(inp.events)} events, {len(inp.rows.ts)} labelled rows (loaded in {time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    ray_engine = open_engine("ray", num_cpus=ray_cpus, partitions_per_worker=k)
    start_s = time.perf_counter() - t
    workers = ray_engine.workers
    _say(f"ray: local cluster of {ray_cpus} CPUs up in {start_s:.1f} s, {workers} workers, {ray_engine.n_partitions} partitions")
    res: dict = {"materialise": collections.defaultdict(list), "pit_join": collections.defaultdict(list)}
    checks = {"materialise": [], "pit_join": []}
    try:
        # warm-up (not timed): the workers import numpy and the features package on their first call
        _pit(inp, ray_engine)
        for r in range(rounds):
            order = [("local", LOCAL), ("ray", ray_engine)]
            if r % 2:
                order.reverse()
            for op, fn, arg in (("materialise", _materialise, data), ("pit_join", _pit, inp)):
                got = {}
                for name, eng in order:
                    s, info = fn(arg, eng)
                    res[op][name].append(s)
                    got[name] = info
                    _say(f"round {r} {op:<11} {name:<5} {s:7.2f} s  {info['events'] / s:>10,.0f} events/s")
                checks[op].append(got["local"]["digest"] == got["ray"]["digest"])
                res[op]["info"] = got["local"] | {"digest": None}
        # where Ray's time goes: one more run of each under the driver's profiler and the timeline
        profile = {}
        for op, fn, arg in (("materialise", _materialise, data), ("pit_join", _pit, inp)):
            since = time.time() * 1e6
            wall, phases = _driver_profile(lambda: fn(arg, ray_engine))
            profile[op] = {"wall_s": round(wall, 3), "driver_phases_s": phases, "workers_timeline": _worker_timeline(since)}
            lw, lphases = _driver_profile(lambda: fn(arg, LOCAL))
            profile[op]["local"] = {"wall_s": round(lw, 3), "phases_s": lphases}
    finally:
        ray_engine.close()
    out = {"machine": machine(), "log": {"users": users, "items": items, "days": days, "seed": seed, "events": int(len(inp.events)),
                                         "labelled_rows": int(len(inp.rows.ts))},
           "ray": {"version": _ray_version(), "cpus": ray_cpus, "workers": workers, "partitions_per_worker": k,
                   "partitions": workers * k, "cluster_start_s": round(start_s, 2)},
           "rounds": rounds, "identical_outputs": {op: all(v) for op, v in checks.items()}, "ops": {}, "profile": profile}
    for op in ("materialise", "pit_join"):
        ev = res[op]["info"]["events"]
        loc, ray = res[op]["local"], res[op]["ray"]
        out["ops"][op] = {
            "events": ev, "detail": {k2: v for k2, v in res[op]["info"].items() if k2 != "digest"},
            "seconds": {"local": _spread(loc), "ray": _spread(ray)},
            "events_per_s": {"local": _spread([ev / s for s in loc]), "ray": _spread([ev / s for s in ray])},
            "ray_over_local_throughput": _spread([a / b for a, b in zip(loc, ray)]),  # per round: local seconds / ray seconds
        }
    return out


def _ray_version() -> str:
    import ray

    return ray.__version__


def table(res: dict) -> str:
    lines = [f"{res['log']['events']:,} events ({res['log']['users']} users, {res['log']['days']} days); Ray {res['ray']['version']}: "
             f"local cluster, {res['ray']['workers']} workers x {res['ray']['partitions_per_worker']} = {res['ray']['partitions']} partitions "
             f"(start-up {res['ray']['cluster_start_s']} s, not counted); {res['rounds']} rounds, median [min, max]; "
             f"{res['machine']['cores']} cores shared with other jobs", "",
             "| operation | local events/s | Ray events/s | Ray / local | outputs identical |", "|---|---|---|---|---|"]
    for op, name in (("materialise", "full materialisation, every set -> memory store"), ("pit_join", "PIT join of the training rows")):
        o = res["ops"][op]
        f = lambda s: f"{s['median']:,.0f} [{s['min']:,.0f}, {s['max']:,.0f}]"  # noqa: E731
        r = o["ray_over_local_throughput"]
        lines.append(f"| {name} | {f(o['events_per_s']['local'])} | {f(o['events_per_s']['ray'])} | "
                     f"{r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}] | {res['identical_outputs'][op]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/batch_engines.json"))
    ap.add_argument("--users", type=int, default=11_000)
    ap.add_argument("--items", type=int, default=2_000)
    ap.add_argument("--days", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--partitions-per-worker", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep the simulated log here (default: a temporary folder)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="parity-batch-engines-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = run(a.users, a.items, a.days, a.seed, a.rounds, a.ray_cpus, a.partitions_per_worker, work)
    write_json(a.out, res)
    print(table(res))
    print(json.dumps({op: res["ops"][op]["ray_over_local_throughput"]["median"] for op in res["ops"]}))
    return 0 if all(res["identical_outputs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
