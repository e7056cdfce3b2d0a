"""How Parity's costs grow with the data (issue 14): scaling curves with fitted growth exponents.

    nice -n 10 python -m bench.scaling [--quick] [--curves train_events train_items batch device workers]
    python -m bench.scaling --render-only          # re-render plots and the RESULTS section from the JSON

Curves (each size measured in a fresh subprocess, one at a time; the machine is shared, so CPU
time is recorded beside wall time):
1. train_events: a whole `train_release(profile="tiny")` (pipeline/train.py: max_rows 20k, the
   tiny towers and rankers; the simulator's default ranker rows, "labelled"; the ANN index by brute
   force at every size, as bench/item_item_scale.py) on simulated logs of
   --events sizes (users = events / 100, --train-items items, 14 days): train wall and CPU time,
   the process's peak RSS (os.wait4's rusage of that child) and the manifest's step timings.
2. train_items: the same tiny release on catalogues of --items sizes with 4 users per item (so
   events grow with the catalogue, as in bench/item_item_scale.py), beside the item-item fit's
   figures read from bench/results/item_item_scale.json (cited, not re-measured).
3. batch: a full materialisation of every feature set into a memory store
   (features.materialize, the backfill), and the batch states of every entity of every set as of
   the log's end (the engine's `states_asof`, no store), with the local engine and with Ray (a
   local cluster of --ray-cpus CPUs, one worker each, 2 partitions per worker: bench/batch_engines.py's
   setting), on the --batch-events logs (the same logs as curve 1).
4. device: `export_device` of one tiny release and tiny device model (trained on the smallest log)
   for simulated logs of --device-users users (3000 items, 3 days: bench/device.py's export scaling).
5. workers: bench/results/serving_workers.json (make bench-workers) if it exists; servers are
   never started here.

Results go to --out (JSON, merged by curve so curves can be run separately), PNG plots beside it
(bench/results/scaling_*.png), and the generated:scaling block of --results (bench/scaling_report.py).
Explanations of super-linear curves, written after profiling, live in bench/results/scaling_notes.json
({curve: text}) and are rendered into the verdicts.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import machine, write_json
from bench.scaling_report import END, LINEAR_LIMIT, START, exponents, render

__all__ = ["DEFAULT_EVENTS", "QUICK", "main"]

CURVES = ("train_events", "train_items", "batch", "device", "workers")
DEFAULT_EVENTS = [250_000, 1_000_000, 4_000_000]
BIG_EVENTS = 16_000_000
EVENTS_PER_USER = 100  # the simulator gives ~100 events per user over 14 days (10k users ~ 1M events)
USERS_PER_ITEM = 4  # curve 2, as bench/item_item_scale.py
QUICK = {"events": [20_000, 40_000, 80_000], "items": [300, 600], "device_users": [300, 600, 1200], "train_items": 300}
_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _say(msg: str) -> None:
    print(f"[scaling] {msg}", file=sys.stderr, flush=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- children (each in its own process)

def _self_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child_train(data: Path, out: Path, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import export.index
    from features.datasets import load_info
    from pipeline.train import train_release

    # as bench/item_item_scale.py: the tiny towers at 10k simulated items miss the 0.95 ANN recall
    # gate with the tree index (RecallTooLow, 0.817): every size is indexed by brute force (what
    # the index picks below 10k items anyway); only the index step changes
    export.index.BRUTE_FORCE_BELOW = 1 << 62
    info = load_info(data)
    t0, c0 = time.perf_counter(), time.process_time()
    rel = train_release(data, out, profile="tiny", seed=seed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = json.loads((rel.path / "manifest.json").read_text())
    shutil.rmtree(rel.path, ignore_errors=True)  # only the timings are kept: releases at 4M events are not small
    return {"users": info.n_users, "items": info.n_items, "events": int(m["dataset"]["events"]), "train_wall_s": wall, "train_cpu_s": cpu,
            "timings_s": m["timings_s"], "ranker_rows": m["config"]["ranker_rows"], "max_rows": m["config"]["max_rows"],
            "training_rows": m["training_data"]["rows"], "self_rss_mb": _self_rss_mb()}


def _states_all(data: Path, engine) -> float:
    """Seconds to build every set's batch engine and read every entity's state as of the log's end."""
    import numpy as np

    from features.datasets import load_info
    from features.eventlog import EventLog
    from features.repo import feature_sets
    from features.state import StateLayout

    info = load_info(data)
    log = EventLog(data / "events")
    t = time.perf_counter()
    ev = log.read(must_exist=True)
    until = int(ev.ts.max()) + 1
    for fs in feature_sets(info.kind, info.n_topics):
        m = fs.event_mask(ev)
        sub = ev.take(np.flatnonzero(m))
        codes = np.unique(fs.entity.codes(sub)[0])
        eng = engine.batch_engine(StateLayout(fs), sub)
        try:
            eng.states_asof(codes, np.full(len(codes), until, dtype=np.int64))
        finally:
            if hasattr(eng, "close"):
                eng.close()
    return time.perf_counter() - t


def _child_batch(data: Path, ray_cpus: int, ppw: int, with_ray: bool) -> dict:
    from bench.batch_engines import _materialise
    from features.engines import LOCAL, open_engine

    def both(engine) -> dict:
        c = time.process_time()
        s, info = _materialise(data, engine)
        mcpu = time.process_time() - c
        c = time.process_time()
        st = _states_all(data, engine)
        return {"materialise_s": s, "materialise_cpu_s": mcpu, "records": info["records"], "events": info["events"], "digest": info["digest"],
                "states_s": st, "states_cpu_s": time.process_time() - c}

    out = {"local": both(LOCAL)}
    if with_ray:
        try:
            eng = open_engine("ray", num_cpus=ray_cpus, partitions_per_worker=ppw)
        except Exception as e:  # noqa: BLE001 - reported in the section, the local figures stand
            out["ray_error"] = f"{type(e).__name__}: {e}"
        else:
            try:
                _warm_up(data, eng)
                out["ray"] = both(eng)
                out["ray_config"] = {"cpus": ray_cpus, "workers": eng.workers, "partitions_per_worker": ppw}
            finally:
                eng.close()
        if out.get("ray") and out["ray"]["digest"] != out["local"]["digest"]:
            out["ray_error"] = "Ray's store differs from the local one"
    out["events"] = out["local"]["events"]
    out["rss_peak_mb"] = _self_rss_mb()
    return out


def _warm_up(data: Path, engine) -> None:
    """One small states call on the workers (their first call imports numpy and features)."""
    import numpy as np

    from features.datasets import load_info
    from features.eventlog import EventLog
    from features.repo import feature_sets
    from features.state import StateLayout

    info = load_info(data)
    ev = EventLog(data / "events").read(must_exist=True)
    ev = ev.take(np.arange(min(len(ev), 5000)))
    fs = feature_sets(info.kind, info.n_topics)[0]
    sub = ev.take(np.flatnonzero(fs.event_mask(ev)))
    eng = engine.batch_engine(StateLayout(fs), sub)
    try:
        codes = np.unique(fs.entity.codes(sub)[0])
        eng.states_asof(codes, np.full(len(codes), int(ev.ts.max()) + 1, dtype=np.int64))
    finally:
        eng.close()


def _child_device_setup(data: Path, work: Path, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from export.device.keys import keygen
    from export.device.tiny_model import build_device_model
    from pipeline.train import train_release

    t = time.perf_counter()
    rel = train_release(data, work / "releases", profile="tiny", seed=seed)
    model = build_device_model(rel.path, data, work / "model", seed=seed, profile="tiny")
    keygen(work / "keys", force=True)
    (work / "model.pkl").write_bytes(pickle.dumps(model))
    return {"release": str(rel.path), "keys": str(work / "keys"), "model": str(work / "model.pkl"), "setup_s": time.perf_counter() - t}


def _child_device_export(release: Path, data: Path, keys: Path, model: Path, out: Path) -> dict:
    from export.device.bundle import export_device
    from export.device.keys import load_keys
    from features.datasets import load_info

    m = pickle.loads(model.read_bytes())
    k = load_keys(keys)
    t, c = time.perf_counter(), time.process_time()
    rep = export_device(release, data, k, out, m)
    secs, cpu = time.perf_counter() - t, time.process_time() - c
    shutil.rmtree(out, ignore_errors=True)
    return {"users": rep.users_written, "events": load_info(data).n_events, "seconds": secs, "cpu_s": cpu,
            "bytes_per_user": rep.bytes_per_user, "phases_s": rep.seconds}


# ---------------------------------------------------------------- the driver

def _run_child(args: list[str], here: Path, threads: bool = True) -> dict:
    """This module in a fresh process; returns its JSON line plus the process's own rusage
    (os.wait4: peak RSS and CPU of that child and the children it waited for)."""
    env = {**os.environ, "PYTHONPATH": str(here)} | (_THREADS if threads else {})
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "bench.scaling", *args], cwd=here, env=env, stdout=so, stderr=se, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        so.seek(0)
        se.seek(0)
        out, err = so.read(), se.read()
    if p.returncode != 0:
        raise RuntimeError(f"child {args} failed ({p.returncode}):\n{err[-3000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    r.update(process_wall_s=wall, process_cpu_s=ru.ru_utime + ru.ru_stime, rss_peak_mb=ru.ru_maxrss / 1024.0)
    return r


def _simulate(work: Path, users: int, items: int, days: int, seed: int) -> tuple[Path, float]:
    from features.simulator import simulate

    d = work / f"sim-u{users}-i{items}-d{days}-s{seed}"
    if (d / "done.json").exists():
        return d / "data", json.loads((d / "done.json").read_text())["simulate_s"]
    shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    simulate(d / "data", users=users, items=items, days=days, seed=seed)
    s = time.perf_counter() - t
    (d / "done.json").write_text(json.dumps({"simulate_s": s}))
    return d / "data", s


def _item_item_citation(path: Path) -> dict | None:
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    return {"source": "bench/results/item_item_scale.json", "started_at": r.get("started_at"), "finished_at": r.get("finished_at"), "data": r.get("data"),
            "command": "nice -n 10 python -m bench.item_item_scale --out bench/results/item_item_scale.json",
            "fits": [{k: f[k] for k in ("items", "engagements", "fit_s", "fit_cpu_s", "rss_peak_mb", "stored_mb")} for f in r.get("fits", [])],
            "growth_exponent": r.get("growth_exponent", {}),
            "releases": {k: {"total_s": v["total_s"], "timings_s": v["timings_s"], "items": v.get("items")} for k, v in r.get("releases", {}).items()}}


def _plots(res: dict, out_dir: Path) -> list[str]:
    """One log-log PNG per curve measured, each series labelled with its fitted exponent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    c = res["curves"]

    def series(ax, rows, x, key, label):
        rows = [r for r in rows if _get(r, key) is not None]
        if not rows:
            return
        xs, ys = [r[x] for r in rows], [_get(r, key) for r in rows]
        e = exponents(rows, x, [key])[key]
        ax.loglog(xs, ys, "o-", label=f"{label} (exponent {e:.2f})" if e is not None else label)

    def finish(fig, axes, name):
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"scaling_{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p.as_posix())

    for name, x in (("train_events", "events"), ("train_items", "items")):
        rows = sorted((c.get(name) or {}).get("rows", []), key=lambda r: r[x])
        if len(rows) < 2:
            continue
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        series(a, rows, x, "train_cpu_s", "train CPU s")
        series(a, rows, x, "train_wall_s", "train wall s")
        for s in sorted({k for r in rows for k in r["timings_s"]}):
            series(a, rows, x, f"timings_s.{s}", f"step {s} s")
        series(b, rows, x, "rss_peak_mb", "peak RSS MB")
        a.set_xlabel(x), b.set_xlabel(x), a.set_title(f"tiny release: time against {x}"), b.set_title("peak RSS of the training process")
        finish(fig, (a, b), name)
    rows = sorted((c.get("batch") or {}).get("rows", []), key=lambda r: r["events"])
    if len(rows) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4))
        for e in ("local", "ray"):
            series(ax, rows, "events", f"{e}.materialise_s", f"{e} materialise s")
            series(ax, rows, "events", f"{e}.states_s", f"{e} batch states s")
        ax.set_xlabel("events"), ax.set_title("batch path: time against events")
        finish(fig, (ax,), "batch")
    rows = sorted((c.get("device") or {}).get("rows", []), key=lambda r: r["users"])
    if len(rows) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4))
        series(ax, rows, "users", "cpu_s", "export CPU s")
        series(ax, rows, "users", "seconds", "export wall s")
        ax.set_xlabel("users"), ax.set_title("device export: time against users")
        finish(fig, (ax,), "device")
    return made


def _get(r: dict, key: str):
    for part in key.split("."):
        r = r.get(part) if isinstance(r, dict) else None
    return r


def _finish(res: dict, out: Path, results_md: Path | None, notes: Path) -> None:
    from bench.report import update_results

    res["notes"] = json.loads(notes.read_text()) if notes.exists() else {}
    res["plots"] = _plots(res, out.parent)
    write_json(out, res)
    if results_md is not None:
        update_results(results_md, render(res), START, END)
        _say(f"wrote {out} and the scaling section of {results_md}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="the JSON (default bench/results/scaling.json; --quick: WORK/quick/scaling.json)")
    ap.add_argument("--results", type=Path, default=None, help="the RESULTS file to splice the section into (default bench/RESULTS.md; --quick: none)")
    ap.add_argument("--no-results", action="store_true", help="do not touch the RESULTS file")
    ap.add_argument("--notes", type=Path, default=Path("bench/results/scaling_notes.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/parity-scaling"), help="simulated logs (kept between runs) and scratch")
    ap.add_argument("--curves", nargs="*", choices=CURVES, default=list(CURVES))
    ap.add_argument("--events", type=int, nargs="*", default=None, help=f"curve 1 sizes (default {DEFAULT_EVENTS})")
    ap.add_argument("--big", action="store_true", help=f"add {BIG_EVENTS:,} events to curves 1 and 3 (tens of minutes on 2 cores)")
    ap.add_argument("--train-items", type=int, default=2000, help="the catalogue of curve 1's logs")
    ap.add_argument("--items", type=int, nargs="*", default=None, help="curve 2 sizes (default 3000 10000)")
    ap.add_argument("--batch-events", type=int, nargs="*", default=None, help="curve 3 sizes (default: curve 1's)")
    ap.add_argument("--device-users", type=int, nargs="*", default=None, help="curve 4 sizes (default 2000 10000 50000)")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (about 3 minutes in all, mostly fixed costs): a smoke run, written under --work, RESULTS untouched")
    ap.add_argument("--render-only", action="store_true", help="re-make the plots and the section from --out")
    ap.add_argument("--child", choices=("train", "batch", "device-setup", "device-export"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--release", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child == "train":
        print(json.dumps(_child_train(a.data, a.dest, a.seed)))
        return 0
    if a.child == "batch":
        print(json.dumps(_child_batch(a.data, a.ray_cpus, 2, not a.no_ray)))
        return 0
    if a.child == "device-setup":
        print(json.dumps(_child_device_setup(a.data, a.dest, a.seed)))
        return 0
    if a.child == "device-export":
        print(json.dumps(_child_device_export(a.release, a.data, a.keys, a.model, a.dest)))
        return 0

    if a.out is None:
        a.out = a.work / "quick/scaling.json" if a.quick else Path("bench/results/scaling.json")
    results_md = None if a.no_results else (a.results or (None if a.quick else Path("bench/RESULTS.md")))
    if a.render_only:
        res = json.loads(a.out.read_text())
        _finish(res, a.out, results_md, a.notes)
        return 0

    here = Path(__file__).resolve().parents[1]
    ev_sizes = a.events or (QUICK["events"] if a.quick else list(DEFAULT_EVENTS))
    if a.big and BIG_EVENTS not in ev_sizes:
        ev_sizes = [*ev_sizes, BIG_EVENTS]
    batch_sizes = a.batch_events or ev_sizes
    item_sizes = a.items or (QUICK["items"] if a.quick else [3000, 10000])
    dev_users = a.device_users or (QUICK["device_users"] if a.quick else [2000, 10000, 50000])
    train_items = QUICK["train_items"] if a.quick and a.train_items == 2000 else a.train_items
    work = a.work / ("quick" if a.quick else "full")
    work.mkdir(parents=True, exist_ok=True)

    prev = json.loads(a.out.read_text()) if a.out.exists() and not a.quick else {}
    command = "nice -n 10 python -m bench.scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"command": command.strip(), "started_at": _now(), "machine": machine(), "quick": a.quick,
           "config": {"days": 14, "seed": a.seed, "events_sizes": ev_sizes, "train_items": train_items, "item_sizes": item_sizes,
                      "batch_sizes": batch_sizes, "device_users": dev_users, "linear_limit": LINEAR_LIMIT,
                      "data_note": f"curves 1 and 3: users = events / {EVENTS_PER_USER}, {train_items} items; curve 2: {USERS_PER_ITEM} users "
                                   "per item; curve 4: 3000 items over 3 days (bench/device.py's export scaling)."},
           "curves": dict(prev.get("curves", {})), "not_run": []}
    if prev and set(a.curves) != set(CURVES):  # a partial run keeps the other curves' figures and says when they were measured
        res["runs"] = [r for r in prev.get("runs", [{"command": prev.get("command"), "started_at": prev.get("started_at"),
                                                       "curves": list(prev.get("curves", {}))}])]
    res.setdefault("runs", []).append({"command": res["command"], "started_at": res["started_at"], "curves": list(a.curves)})

    def save() -> None:
        write_json(a.out, res)

    def train_curve(name: str, x: str, sizes: list[int], make) -> None:
        c = res["curves"][name] = {"rows": [], "about": None}
        for n in sizes:
            users, items = make(n)
            data, sim_s = _simulate(work, users, items, 14, a.seed)
            _say(f"{name}: {x}={n:,} ({users:,} users, {items:,} items): training")
            try:
                r = _run_child(["--child", "train", "--data", str(data), "--dest", str(work / f"rel-{name}-{n}"), "--seed", str(a.seed)], here)
            except RuntimeError as e:  # one size failing leaves the others' figures and says why
                res["not_run"].append(f"{name} at {x}={n:,}: the training failed: {str(e).strip().splitlines()[-1]}")
                _say(res["not_run"][-1])
                save()
                continue
            r[x if x == "items" else "size"] = n
            r["simulate_s"] = sim_s
            c["rows"].append(r)
            _say(f"{name}: {r['events']:,} events: train {r['train_wall_s']:.1f} s wall, {r['train_cpu_s']:.1f} s CPU, peak RSS {r['rss_peak_mb']:.0f} MB")
            save()

    if "train_events" in a.curves:
        train_curve("train_events", "events", ev_sizes, lambda n: (max(n // EVENTS_PER_USER, 10), train_items))
        res["curves"]["train_events"]["about"] = (
            f"A whole `train_release(profile=\"tiny\")` per log, in its own process with one thread (pipeline/train.py's tiny profile: "
            f"max_rows 20,000 training rows, the tiny two-tower and rankers; the simulator's ranker rows, \"labelled\"; the ANN index by "
            f"brute force at every size, as bench/item_item_scale.py: the tree index misses the recall gate with tiny towers at 10k items). Users = events / "
            f"{EVENTS_PER_USER}, {train_items:,} items, 14 days. Step columns are the manifest's `timings_s` (seconds).")
    if "train_items" in a.curves:
        train_curve("train_items", "items", item_sizes, lambda n: (USERS_PER_ITEM * n, n))
        c = res["curves"]["train_items"]
        c["about"] = (f"The same tiny release on catalogues of each size with {USERS_PER_ITEM} users per item (events grow with the "
                      "catalogue, as in bench/item_item_scale.py), the simulator's default ranker rows (labelled: the item-item model is fitted "
                      "only on the candidate-list path, whose release is cited below); the ANN index by brute force at every size (the tree "
                      "index misses the recall gate with tiny towers at 10k items).")
        c["item_item_fit"] = _item_item_citation(here / "bench/results/item_item_scale.json")
        save()
    if "batch" in a.curves:
        c = res["curves"]["batch"] = {"rows": [], "about": (
            "Per log, in one fresh process: a full materialisation of every feature set into a memory store (features.materialize: "
            "states, served values, writes; the backfill), then every set's batch states for every entity as of the log's end "
            "(`engine.batch_engine(...).states_asof`, no store), first with the local engine, then on Ray. Throughput = the log's events / seconds.")}
        for n in batch_sizes:
            data, _ = _simulate(work, max(n // EVENTS_PER_USER, 10), train_items, 14, a.seed)
            _say(f"batch: {n:,} events")
            args = ["--child", "batch", "--data", str(data), "--ray-cpus", str(a.ray_cpus)] + (["--no-ray"] if a.no_ray else [])
            r = _run_child(args, here, threads=False)
            r["size"] = n
            if r.get("ray_config"):
                c["ray"] = r.pop("ray_config")
            c["rows"].append(r)
            _say(f"batch: {r['events']:,} events: local materialise {r['local']['materialise_s']:.1f} s"
                 + (f", ray {r['ray']['materialise_s']:.1f} s" if r.get("ray") else f" ({r.get('ray_error', 'no ray')})"))
            save()
    if "device" in a.curves:
        c = res["curves"]["device"] = {"rows": [], "about": (
            "`export_device` (export/device/bundle.py) of one tiny release and one tiny device model for logs of each size "
            "(3000 items, 3 days), each export in a fresh process (the model handed over pickled).")}
        logs = [(n, _simulate(work, n, 3000, 3, a.seed)[0]) for n in dev_users]
        dwork = work / "device"
        shutil.rmtree(dwork, ignore_errors=True)
        dwork.mkdir(parents=True)
        _say(f"device: release and model on {dev_users[0]:,} users")
        s = _run_child(["--child", "device-setup", "--data", str(logs[0][1]), "--dest", str(dwork), "--seed", str(a.seed)], here)
        c["setup"] = {"note": f"{dev_users[0]:,} users, setup {s['setup_s']:.0f} s"}
        for n, data in logs:
            _say(f"device: export of {n:,} users")
            r = _run_child(["--child", "device-export", "--release", s["release"], "--data", str(data), "--keys", s["keys"],
                            "--model", s["model"], "--dest", str(dwork / f"bundle-{n}")], here)
            c["rows"].append(r)
            _say(f"device: {r['users']:,} users in {r['seconds']:.1f} s")
            save()
    if "workers" in a.curves:
        src = here / "bench/results/serving_workers.json"
        res["curves"]["workers"] = {"source": "bench/results/serving_workers.json",
                                    "result": json.loads(src.read_text()) if src.exists() else None}
    if not a.big and not a.quick:
        res["not_run"].append(f"{BIG_EVENTS:,} events (`--big`): not run by default on this machine (2 shared cores).")
    res["finished_at"] = _now()
    _finish(res, a.out, results_md, a.notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
