"""The device path, measured: bundle sizes, export throughput and its growth, delta exports,
on-device ranking latency, sync over loopback, hybrid mode behind a faulty network, quality.

    python -m bench.device --out bench/results/device.json [--quick]

One run, one machine, every figure beside its baseline from the same run:
- bundle: the tiny ranker (int8 ONNX, ORT), item table KB per 1k items, bytes per user;
- export: users/s and bytes per user at `scale_users` simulated users (one release, one tiny
  model), and the growth exponent of export time in users (1 = linear);
- delta: `parity export delta` after 1 % new items and 1 % of users active, its time and bytes
  against the full export's, and the SDK's incremental sync against its full sync;
- device: `Client.rank` of the user's 200 candidates on one thread (p50/p99 over `rank_reps`
  calls), beside the server's Recommend p99 (a `parity serve` child process, memory store,
  sequential calls from this process, same run); cold start of a `Client` from its cache;
- hybrid: bench/hybrid.py behind bench/delay_proxy.py (20 % of calls delayed 80-200 ms, 5 %
  dropped): the SDK's `recommend` (40 ms server deadline, device fallback) against a plain
  server-only client (1 s deadline);
- quality: `pipeline.device_eval.evaluate_device` (device int8 vs the server's two-stage
  student_int8 vs popularity, NDCG@10) on the simulator at two seeds and on MovieLens 100K.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.report import machine, write_json

__all__ = ["DeviceBenchConfig", "run", "main", "growth_exponent"]


@dataclass(frozen=True)
class DeviceBenchConfig:
    sim: dict = field(default_factory=lambda: {"users": 2000, "items": 500, "days": 14, "seed": 0})
    profile: str = "small"
    device_profile: str | None = None  # build_device_model's profile (None: choose the width on validation)
    scale_users: tuple[int, ...] = (10_000, 100_000)
    scale_sim: dict = field(default_factory=lambda: {"items": 3000, "days": 3, "seed": 0})
    rank_reps: int = 2000
    recommend_reps: int = 1000
    sync_reps: int = 5
    hybrid_n: int = 300
    hybrid_concurrency: int = 8
    hybrid_users: int = 16
    quality_seeds: tuple[int, ...] = (0, 11)
    quality_movielens: bool = True

    @classmethod
    def quick(cls) -> "DeviceBenchConfig":
        return cls(sim={"users": 400, "items": 120, "days": 5, "seed": 0}, profile="tiny", device_profile="tiny",
                   scale_users=(1000, 4000), scale_sim={"items": 300, "days": 2, "seed": 0}, rank_reps=200, recommend_reps=100,
                   sync_reps=2, hybrid_n=30, hybrid_concurrency=4, hybrid_users=4, quality_seeds=(0,), quality_movielens=False)


def _say(msg: str) -> None:
    print(f"[device] {msg}", file=sys.stderr, flush=True)


def _pct(a: Sequence[float]) -> dict:
    x = np.asarray(a, dtype=np.float64)
    return {"n": int(len(x)), "p50_ms": float(np.percentile(x, 50)), "p99_ms": float(np.percentile(x, 99)),
            "max_ms": float(x.max()), "mean_ms": float(x.mean())}


def growth_exponent(sizes: Sequence[float], costs: Sequence[float]) -> float:
    """Slope of log(cost) against log(size): 1 = linear growth."""
    return float(np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(costs, float)), 1)[0])


def _setup(cfg: DeviceBenchConfig, work: Path) -> dict:
    from export.device.bundle import export_device
    from export.device.keys import keygen
    from export.device.tiny_model import build_device_model
    from features.simulator import simulate
    from pipeline.train import train_release

    data = work / "data"
    simulate(data, **cfg.sim)
    rel = train_release(data, work / "releases", profile=cfg.profile, seed=0)
    keys = keygen(work / "keys")
    t = time.perf_counter()
    model = build_device_model(rel.path, data, work / "model", seed=0, profile=cfg.device_profile)
    model_s = time.perf_counter() - t
    rep = export_device(rel.path, data, keys, work / "bundle", model)
    return {"data": data, "release": rel, "keys": keys, "model": model, "model_s": model_s, "export": rep}


def _bundle_sizes(bundle: Path, keys, model) -> dict:
    from export.device.files import MANIFEST, read_manifest, read_npz

    p = read_manifest(bundle / MANIFEST, keys.public_pem)
    files = p["files"]
    n_items = sum(len(read_npz(bundle / c)["item_id"]) for c in p["items"]["chunks"])
    user_bytes = [f.stat().st_size for f in (bundle / "users").glob("*.npz")]
    return {"model_int8_onnx_kb": files[p["model"]["onnx"]]["bytes"] / 1024, "model_ort_kb": files[p["model"]["ort"]]["bytes"] / 1024,
            "model_hidden": list(model.hidden), "model_columns": len(model.columns), "items": n_items,
            "item_chunk_kb_per_1k_items": sum(files[c]["bytes"] for c in p["items"]["chunks"]) / 1024 / n_items * 1000,
            "item_stats_kb_per_1k_items": files[p["items"]["stats"]]["bytes"] / 1024 / n_items * 1000,
            "users": len(user_bytes), "bytes_per_user_file": float(np.mean(user_bytes)),
            "bins": len(p["users"]["bins"]), "bin_bytes_mean": float(np.mean([files[b]["bytes"] for b in p["users"]["bins"].values()])),
            "manifest_bytes": (bundle / MANIFEST).stat().st_size}


def _device_latency(cfg: DeviceBenchConfig, s: dict, work: Path) -> dict:
    from export.device.cdn import BackgroundCDN
    from features.eventlog import EventLog
    from mobile_sdk import Client

    keys, bundle = s["keys"], work / "bundle"
    events = EventLog(s["data"] / "events").read()
    user = int(np.bincount(events.user_id).argmax())
    token = keys.token(user)
    out: dict[str, Any] = {"user_events": int((events.user_id == user).sum())}
    full, nm = [], []
    with BackgroundCDN(bundle) as cdn:
        for r in range(cfg.sync_reps):
            cache = work / f"cache-full-{r}"
            c = Client(cdn.url, cache, keys.public_pem, token)
            res = c.sync()
            full.append(res.seconds * 1000)
            out["full_sync_files"], out["full_sync_bytes"] = res.files_fetched, res.bytes_fetched
            res = c.sync()
            nm.append(res.seconds * 1000)
            assert res.not_modified
            c.close()
    out["full_sync"] = _pct(full)
    out["not_modified_sync"] = _pct(nm)
    cold = []
    for _ in range(cfg.sync_reps * 4):
        t = time.perf_counter()
        c = Client("http://127.0.0.1:9/", work / "cache-full-0", keys.public_pem, token)  # offline: cold start from the cache
        c.rank(user, k=10)
        cold.append((time.perf_counter() - t) * 1000)
        c.close()
    out["cold_start_and_first_rank"] = _pct(cold)
    c = Client("http://127.0.0.1:9/", work / "cache-full-0", keys.public_pem, token)
    first = c.rank(user, k=10)
    n_cand = len(c.rank(user, k=10_000))
    lat = []
    for _ in range(cfg.rank_reps):
        t = time.perf_counter()
        c.rank(user, k=10)
        lat.append((time.perf_counter() - t) * 1000)
    out["rank"] = _pct(lat) | {"candidates": n_cand, "source": first.source}
    c.close()
    return out


def _server_recommend(cfg: DeviceBenchConfig, s: dict, work: Path) -> tuple[dict, Any]:
    from bench.serving import ServerProcess
    from server.client import ParityClient

    users = np.unique(__import__("features.eventlog", fromlist=["EventLog"]).EventLog(s["data"] / "events").read().user_id)
    argv = [sys.executable, "-m", "parity", "serve", "--release", str(s["release"].path), "--events", str(s["data"]), "--store", "memory"]
    srv = ServerProcess(argv, work / "server.log").start()
    lat = []
    rng = np.random.default_rng(0)
    with ParityClient(srv.target, timeout_s=1.0, retries=0) as client:
        for _ in range(50):
            client.recommend(int(rng.choice(users)), k=10)
        for _ in range(cfg.recommend_reps):
            u = int(rng.choice(users))
            t = time.perf_counter()
            client.recommend(u, k=10)
            lat.append((time.perf_counter() - t) * 1000)
    return _pct(lat), srv


def _hybrid(cfg: DeviceBenchConfig, s: dict, work: Path, upstream: str) -> dict:
    from bench.delay_proxy import FaultPlan
    from bench.hybrid import run_hybrid, sdk_hybrid_call
    from features.eventlog import EventLog

    events = EventLog(s["data"] / "events").read()
    users = [int(u) for u in np.random.default_rng(1).choice(np.unique(events.user_id), cfg.hybrid_users, replace=False)]
    factory = sdk_hybrid_call(work / "bundle", s["keys"], users, work / "hybrid-devices")
    return run_hybrid(upstream, [str(u) for u in users], hybrid_call=factory, plan=FaultPlan(), n=cfg.hybrid_n,
                      concurrency=cfg.hybrid_concurrency, deadline_s=1.0)


def _delta(cfg: DeviceBenchConfig, s: dict, work: Path) -> dict:
    """1 % new items and 1 % of users with new plays, then `export_delta` and an incremental sync."""
    import pyarrow as pa

    from export.device.bundle import export_delta
    from export.device.cdn import BackgroundCDN
    from export.device.files import MANIFEST, read_manifest
    from features.datasets import load_info, read_items, read_users, write_catalogue
    from features.eventlog import EventLog
    from features.events import EventBatch, EventType
    from mobile_sdk import Client

    keys = s["keys"]
    data, bundle = work / "delta-data", work / "delta-bundle"
    shutil.copytree(s["data"], data)
    shutil.copytree(work / "bundle", bundle)
    old = read_manifest(bundle / MANIFEST, keys.public_pem)
    w = int(old["watermark_ms"])
    items = read_items(data)
    n_new = max(1, len(items) // 100)
    ids = items.column("item_id").to_numpy()
    new = {c: [items.column(c)[i % len(items)].as_py() for i in range(n_new)] for c in items.column_names}
    new["item_id"] = [int(ids.max()) + 1 + i for i in range(n_new)]
    new["publish_ts"] = [w - 60_000] * n_new
    info = load_info(data)
    write_catalogue(data, pa.concat_tables([items, pa.table(new, schema=items.schema)]), read_users(data, include_pii=True),
                    dataclasses.replace(info, n_items=info.n_items + n_new))
    log = EventLog(data / "events")
    ev = log.read()
    users = np.unique(ev.user_id)
    active = np.random.default_rng(2).choice(users, max(1, len(users) // 100), replace=False)
    rows = [{"event_id": 10**13 + j, "ts": w + j, "user_id": int(u), "item_id": int(ids[j % len(ids)]), "topic": -1,
             "type": EventType.PLAY, "value": 10.0} for j, u in enumerate(active.tolist())]
    log.append(EventBatch.from_rows(rows))
    probe = int(active[0])
    with BackgroundCDN(bundle) as cdn:
        c = Client(cdn.url, work / "delta-cache", keys.public_pem, keys.token(probe))
        full = c.sync()
        t = time.perf_counter()
        rep = export_delta(bundle, data, keys, release_dir=s["release"].path)
        delta_s = time.perf_counter() - t
        inc = c.sync()
        c.close()
    full_rep = s["export"]
    return {"new_items": n_new, "active_users": int(len(active)), "delta_seconds": delta_s, "delta_files": rep.files_written,
            "delta_bytes": rep.bytes_written, "full_export_seconds": full_rep.seconds["total"], "full_export_bytes": full_rep.bytes_written,
            "sync_full": {"files": full.files_fetched, "bytes": full.bytes_fetched, "ms": full.seconds * 1000},
            "sync_incremental": {"files": inc.files_fetched, "bytes": inc.bytes_fetched, "ms": inc.seconds * 1000}}


def _export_scaling(cfg: DeviceBenchConfig, s: dict, work: Path) -> dict:
    """Export throughput at growing user counts: one release (trained on the smallest log) and
    one tiny model, exported for each log."""
    from export.device.bundle import export_device
    from export.device.tiny_model import build_device_model
    from features.simulator import simulate
    from pipeline.train import train_release

    logs = []
    for n in cfg.scale_users:
        d = work / f"scale-{n}"
        simulate(d, users=n, **cfg.scale_sim)
        logs.append(d)
    rel = train_release(logs[0], work / "scale-releases", profile="tiny", seed=0)
    model = build_device_model(rel.path, logs[0], work / "scale-model", seed=0, profile="tiny")
    rows = []
    for n, d in zip(cfg.scale_users, logs):
        _say(f"export of {n} users")
        t = time.perf_counter()
        rep = export_device(rel.path, d, s["keys"], work / f"scale-bundle-{n}", model)
        secs = time.perf_counter() - t
        rows.append({"users": rep.users_written, "seconds": secs, "users_per_s": rep.users_written / secs,
                     "bytes_per_user": rep.bytes_per_user, "phases_s": rep.seconds})
        shutil.rmtree(work / f"scale-bundle-{n}")
    return {"rows": rows, "time_exponent": growth_exponent([r["users"] for r in rows], [r["seconds"] for r in rows]),
            "release_profile": "tiny", "sim": cfg.scale_sim}


def _quality(cfg: DeviceBenchConfig, s: dict, work: Path) -> list[dict]:
    from pipeline.device_eval import evaluate_device
    from export.device.tiny_model import build_device_model
    from features.simulator import simulate
    from pipeline.train import train_release

    out = []
    cases: list[tuple[str, Path, Any, Any]] = []
    for seed in cfg.quality_seeds:
        if seed == cfg.sim.get("seed", 0):
            cases.append((f"simulated seed {seed}", s["data"], s["release"].path, s["model"]))
            continue
        d = work / f"q-sim-{seed}"
        simulate(d, **{**cfg.sim, "seed": seed})
        rel = train_release(d, work / "q-releases", profile=cfg.profile, seed=seed)
        cases.append((f"simulated seed {seed}", d, rel.path, None))
    ml = Path(os.environ.get("PARITY_MOVIELENS", Path(__file__).resolve().parents[2] / "shared/data/ml-100k"))
    if cfg.quality_movielens and ml.is_dir():
        from features.movielens import import_movielens

        d = work / "q-ml"
        import_movielens(ml, d)
        rel = train_release(d, work / "q-releases", profile=cfg.profile, seed=0)
        cases.append(("MovieLens 100K", d, rel.path, None))
    for name, d, rpath, model in cases:
        _say(f"quality: {name}")
        if model is None:
            model = build_device_model(rpath, d, work / f"q-model-{len(out)}", seed=0, profile=cfg.device_profile)
        res = evaluate_device(rpath, d, model)
        out.append({"data": name, **res})
    return out


def run(cfg: DeviceBenchConfig, work: Path) -> dict:
    result: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                              "config": dataclasses.asdict(cfg)}
    _say("setup: simulate, train, build the tiny ranker, export")
    s = _setup(cfg, work)
    result["setup"] = {"release": s["release"].release_id, "model_build_s": s["model_s"], "export": s["export"].summary(),
                       "model_valid": s["model"].valid, "model_tried": s["model"].tried}
    result["bundle"] = _bundle_sizes(work / "bundle", s["keys"], s["model"])
    _say("device: sync, cold start, rank")
    result["device"] = _device_latency(cfg, s, work)
    _say("server Recommend in the same run, then hybrid behind the fault proxy")
    rec, srv = _server_recommend(cfg, s, work)
    try:
        result["server_recommend"] = rec
        result["hybrid"] = _hybrid(cfg, s, work, srv.target)
    finally:
        srv.stop()
    _say("delta")
    result["delta"] = _delta(cfg, s, work)
    _say("export scaling")
    result["export_scaling"] = _export_scaling(cfg, s, work)
    _say("quality")
    result["quality"] = _quality(cfg, s, work)
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/device.json"))
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every step (figures not for RESULTS.md)")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed after)")
    a = p.parse_args(argv)
    cfg = DeviceBenchConfig.quick() if a.quick else DeviceBenchConfig()
    tmp = None
    work = a.work
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="parity-device-bench-")
        work = Path(tmp.name)
    try:
        result = run(cfg, work)
        result["quick"] = a.quick
        write_json(a.out, result)
        print(json.dumps({k: result[k] for k in ("bundle", "server_recommend")}, default=str))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
