"""How the item-item model's fit, its stored size and a whole release grow with the catalogue
(issue 13: the dense EASE was an n x n float32 matrix fitted by an n x n inverse).

    nice -n 10 python -m bench.item_item_scale --out bench/results/item_item_scale.json

Simulated catalogues (features.simulator) of each --sizes items, with 4 users per item over 14
days, so events per item (and per user) stay about constant while the catalogue grows. For each
size, in a fresh subprocess (its peak memory is its own): read the engagements (plays and likes,
features.history's definition), fit features.item_item with the defaults, and measure the fit's
wall and CPU time (the machine is shared: CPU time is the steadier figure), its peak traced allocation (tracemalloc: numpy and scipy arrays) and the process's
peak RSS before and after the fit, the stored size of the release files (export.item_item), and
the time to score a 50-item history (500 candidates, `scores`) and to take its top 200 (`top`).
The dense EASE (the closed form the sparse fit replaces) is fitted in the same run as the
baseline where it is affordable (--dense-sizes; X is users x n float64, G is n x n).

At --release-at items, a whole `train_release(profile="tiny", ranker_rows="candidates")` (the
path that fits and ships the item-item model; MovieLens's default, the simulated data's when
asked) runs from this tree and, with --baseline-tree, from another tree with the dense model (the
main branch) on the same data: total time, the manifest's step timings, the release's size on
disk and its item-item files. Each curve's growth exponent is the slope of log(value) against
log(items), fitted over the sizes measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "growth_exponent"]

_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def growth_exponent(n: list[float], v: list[float]) -> float | None:
    """The slope of log(v) against log(n): 1 is linear, 2 quadratic."""
    pts = [(a, b) for a, b in zip(n, v) if a and b and b > 0]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _child_fit(data: Path, dense: bool, seed: int) -> dict:
    """Runs in its own process: one fit over one data dir, printed as JSON."""
    import tempfile
    import tracemalloc

    import scipy.sparse  # noqa: F401 - imported before tracing

    from bench.item_item_quality import dense_ease
    from export.item_item import FILES, save_item_item
    from features.datasets import read_items
    from features.eventlog import EventLog
    from features.events import EventType
    from features.history import engagement_mask
    from features.item_item import DEFAULT_L2, fit_item_item

    t0 = time.perf_counter()
    ev = EventLog(data / "events").read(types=[EventType.PLAY, EventType.LIKE], must_exist=True)
    m = engagement_mask(ev, "simulated")
    users, items = ev.user_id[m], ev.item_id[m]
    vocab = np.asarray(read_items(data).column("item_id").to_numpy(), np.int64)
    del ev
    read_s = time.perf_counter() - t0
    rss_before = _rss_mb()
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    model = dense_ease(vocab, users, items, DEFAULT_L2) if dense else fit_item_item(vocab, users, items)
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out = {"items": int(len(vocab)), "engagements": int(len(users)), "users": int(len(np.unique(users))),
           "pairs": int(len(np.unique(users * (int(vocab.max()) + 1) + items))), "read_s": read_s, "fit_s": fit_s, "fit_cpu_s": fit_cpu_s,
           "fit_traced_peak_mb": peak / 1e6, "rss_before_fit_mb": rss_before, "rss_peak_mb": _rss_mb(),
           "weights": model.nnz, "neighbours": model.neighbours, "l2": model.l2,
           "dense_float32_mb": len(vocab) ** 2 * 4 / 1e6}
    with tempfile.TemporaryDirectory() as tmp:
        save_item_item(model, tmp)
        out["stored_mb"] = sum((Path(tmp) / f).stat().st_size for f in FILES) / 1e6
    rng = np.random.default_rng(seed)
    known = np.unique(items)
    score_ms, top_ms = [], []
    for _ in range(200):
        h = rng.choice(known, 50, replace=False)
        c = rng.choice(vocab, 500, replace=False)
        t0 = time.perf_counter()
        model.scores(h, c)
        score_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        model.top(h, 200)
        top_ms.append((time.perf_counter() - t0) * 1e3)
    out["scores_ms_p50"], out["top_ms_p50"] = float(np.median(score_ms)), float(np.median(top_ms))
    return out


def _child_release(data: Path, out: Path, seed: int) -> dict:
    """Runs in its own process with cwd = the tree to measure: one tiny release with the item-item model."""
    import torch

    torch.set_num_threads(1)
    from pipeline.train import train_release

    t0 = time.perf_counter()
    rel = train_release(data, out, profile="tiny", seed=seed, ranker_rows="candidates")
    total = time.perf_counter() - t0
    m = json.loads((rel.path / "manifest.json").read_text())
    files = {p.relative_to(rel.path).as_posix(): p.stat().st_size for p in rel.path.rglob("*") if p.is_file()}
    ii = {k: v for k, v in files.items() if k.startswith("retrieval/item_item")}
    return {"total_s": total, "timings_s": m["timings_s"], "release_mb": sum(files.values()) / 1e6,
            "item_item_mb": sum(ii.values()) / 1e6, "item_item_files": ii, "item_item_meta": m["retrieval"].get("item_item"),
            "rss_peak_mb": _rss_mb(), "release_id": m["release_id"]}


def _run_child(args: list[str], cwd: Path) -> dict:
    """This script run as a file, with `cwd` (the source tree to measure) on the path for everything else."""
    env = {**os.environ, **_THREADS, "PYTHONPATH": str(cwd)}
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _simulate(work: Path, items: int, seed: int) -> tuple[Path, float]:
    d = work / f"sim-{items}-s{seed}"
    if (d / "done").exists():
        return d, json.loads((d / "done").read_text())["simulate_s"]
    from features.simulator import simulate

    t0 = time.perf_counter()
    simulate(d / "data", users=4 * items, items=items, days=14, seed=seed)
    s = time.perf_counter() - t0
    (d / "done").write_text(json.dumps({"simulate_s": s}))
    return d, s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/item_item_scale.json")
    ap.add_argument("--work", default="/tmp/parity-item-item-scale", help="where simulated data and releases go (kept between runs)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[3000, 10000, 50000, 100000])
    ap.add_argument("--dense-sizes", type=int, nargs="*", default=[3000])
    ap.add_argument("--release-at", type=int, default=10000, help="the size at which to train whole releases (0: none)")
    ap.add_argument("--baseline-tree", default=None, help="a source tree with the dense model (e.g. /work/main) to train the same release")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=("fit", "dense", "release"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--release-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child in ("fit", "dense"):
        print(json.dumps(_child_fit(Path(a.data), a.child == "dense", a.seed)))
        return 0
    if a.child == "release":
        print(json.dumps(_child_release(Path(a.data), Path(a.release_out), a.seed)))
        return 0
    here = Path(__file__).resolve().parents[1]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": {"cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "python": platform.python_version()}, "seed": a.seed,
           "data": "features.simulator, users = 4 x items, 14 days, seed", "threads": 1, "fits": [], "dense_fits": [], "releases": {}}

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")

    for n in a.sizes:
        d, sim_s = _simulate(work, n, a.seed)
        r = _run_child(["--child", "fit", "--data", str(d / "data"), "--seed", str(a.seed)], here)
        r["simulate_s"] = sim_s
        res["fits"].append(r)
        print(json.dumps(r), flush=True)
        if n in a.dense_sizes:
            r = _run_child(["--child", "dense", "--data", str(d / "data"), "--seed", str(a.seed)], here)
            res["dense_fits"].append(r)
            print(json.dumps(r), flush=True)
        f = res["fits"]
        res["growth_exponent"] = {k: growth_exponent([x["items"] for x in f], [x[k] for x in f])
                                  for k in ("fit_s", "fit_cpu_s", "fit_traced_peak_mb", "rss_peak_mb", "stored_mb", "weights", "scores_ms_p50", "top_ms_p50", "engagements")}
        save()
    print(json.dumps(res["growth_exponent"]), flush=True)
    if a.release_at:  # after the fits: the whole releases are the slow part
        d, _ = _simulate(work, a.release_at, a.seed)
        trees = {"sparse": here} | ({"dense_baseline": Path(a.baseline_tree).resolve()} if a.baseline_tree else {})
        for name, tree in trees.items():
            out = work / f"releases-{name}-{a.release_at}"
            r = _run_child(["--child", "release", "--data", str(d / "data"), "--release-out", str(out), "--seed", str(a.seed)], tree)
            r["tree"], r["items"] = str(tree), a.release_at
            res["releases"][name] = r
            print(name, json.dumps(r), flush=True)
            save()
    res["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
