"""How stale can each feature set be? `parity backtest` on the demo-size simulated data (seeds
0, 1, 2) and on MovieLens 100K, spliced into bench/RESULTS.md.

    python -m bench.backtest_study [--seeds 0 1 2] [--work DIR] [--out bench/results/backtest.json] [--results bench/RESULTS.md]

Per seed: `parity data simulate` with its defaults (2,000 users, 500 items, 14 days) and a
release trained with the default profile; MovieLens 100K (env PARITY_MOVIELENS, default
../shared/data/ml-100k, read in place and imported into --work, never into the repository;
skipped with a message when absent) with the default profile, seed 0. Each release is
backtested on its whole held-out slice (parity eval's users) with the same grid, one set at a
time, then all. `--work` keeps the data and releases: a second run reuses them and only
backtests again. The plots of the first seed and of MovieLens go to bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from backtest.conditions import ALL, USER_RECORD, format_ms, grid
from backtest.latency import LatencyModel
from backtest.replay import Replay
from backtest.report import plot, to_json
from bench.report import machine, update_results, write_json

__all__ = ["END", "START", "main", "render", "run"]

START = "<!-- generated:backtest:start -->"
END = "<!-- generated:backtest:end -->"
COMMAND = ".venv/bin/python -m bench.backtest_study --seeds 0 1 2 --out bench/results/backtest.json --results bench/RESULTS.md"
STALENESS = (0, 60_000, 15 * 60_000, 3_600_000, 6 * 3_600_000, 86_400_000)  # parity backtest's default grid
MISSING = (0.0, 0.05, 0.2)
LATENCY = (1.0, 20.0)  # p50, p99 ms of the illustrative slow store (a lognormal; not a measurement)
BUDGET_MS = 10.0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _release(data: Path, work: Path, seed: int, prepare) -> tuple[Path, float]:
    """(release folder, seconds spent training; 0 when reused from --work). Imports torch
    (pipeline.train) only when a release must be trained."""
    from pipeline.train import train_release

    mark = work / "release.txt"
    if mark.exists() and Path(mark.read_text().strip()).is_dir():
        return Path(mark.read_text().strip()), 0.0
    if not data.exists():
        prepare(data)
    t = time.perf_counter()
    rel = train_release(data, work / "releases", profile="default", seed=seed)
    mark.write_text(str(rel.path))
    return rel.path, time.perf_counter() - t


def _backtest(release: Path, data: Path, seed: int, png: Path | None) -> dict:
    lat = LatencyModel.lognormal(*LATENCY)
    rp = Replay(release, data, seed=seed, budget_ms=BUDGET_MS, latency=lat)
    res = rp.run(grid(rp.targets, STALENESS, MISSING, latency=True))
    if png is not None:
        plot(res, png)
    return to_json(res, seed=seed, ranker=rp.cfg.ranker)


def run(seeds: list[int], work: Path, movielens: Path | None, plots: Path | None) -> dict:
    from features.movielens import import_movielens
    from features.simulator import simulate

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t_all = time.perf_counter()
    runs = []
    for seed in seeds:
        w = work / f"sim-{seed}"
        w.mkdir(parents=True, exist_ok=True)
        rel, train_s = _release(w / "data", w, seed, lambda d, s=seed: simulate(d, seed=s))
        t = time.perf_counter()
        bt = _backtest(rel, w / "data", seed, plots / "backtest_simulated.png" if plots is not None and seed == seeds[0] else None)
        _say(f"simulated seed {seed}: trained in {train_s:.0f} s, backtest {time.perf_counter() - t:.0f} s, fresh NDCG@10 {bt['fresh']['ndcg@10']:.4f}")
        runs.append({"dataset": "simulated", "seed": seed, "train_s": round(train_s, 1), "backtest": bt})
    ml: dict = {}
    if movielens is None or not (movielens / "u.data").is_file():
        ml = {"skipped": f"MovieLens 100K not found at {movielens} (set PARITY_MOVIELENS)"}
        _say(ml["skipped"])
    else:
        w = work / "movielens"
        w.mkdir(parents=True, exist_ok=True)
        rel, train_s = _release(w / "data", w, 0, lambda d: import_movielens(movielens, d))
        t = time.perf_counter()
        bt = _backtest(rel, w / "data", 0, plots / "backtest_movielens.png" if plots is not None else None)
        _say(f"MovieLens: trained in {train_s:.0f} s, backtest {time.perf_counter() - t:.0f} s, fresh NDCG@10 {bt['fresh']['ndcg@10']:.4f}")
        ml = {"dataset": "movielens", "seed": 0, "train_s": round(train_s, 1), "backtest": bt}
    return {"command": COMMAND, "started_at": started, "seconds": round(time.perf_counter() - t_all, 1), "machine": machine(),
            "grid": {"staleness_ms": list(STALENESS), "missing": list(MISSING), "latency_p50_p99_ms": list(LATENCY), "budget_ms": BUDGET_MS},
            "profile": "default", "runs": runs, "movielens": ml}


# -- the report ---------------------------------------------------------------------------------
def _fmt_st(v: int | None) -> str:
    return "—" if v is None else format_ms(int(v))


def _fmt_mi(v: float | None) -> str:
    return "—" if v is None else f"{v:g}"


def _changes(bt: dict, target: str, kind: str, level) -> float | None:
    key = "staleness_ms" if kind == "staleness" else "missing"
    for c in bt["conditions"]:
        if c["target"] == target and c["kind"] == kind and c[key] == level:
            return c["ndcg_change"]
    return None


def _spread(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    med = statistics.median(xs)
    return f"{med:+.1%}" if len(xs) == 1 else f"{med:+.1%} ({min(xs):+.1%} … {max(xs):+.1%})"


def _targets(bt: dict) -> list[str]:
    return [*bt["sets"], USER_RECORD, ALL]


def _change_table(bts: list[dict], kind: str, levels) -> list[str]:
    fmt = _fmt_st if kind == "staleness" else _fmt_mi
    levels = [v for v in levels if v]
    lines = ["| set | " + " | ".join(fmt(v) for v in levels) + " |", "|---|" + "---:|" * len(levels)]
    for t in _targets(bts[0]):
        cells = [_spread([_changes(bt, t, kind, v) for bt in bts]) for v in levels]
        if all(c == "—" for c in cells):
            continue
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def render(res: dict) -> str:
    g = res["grid"]
    sims = [r["backtest"] for r in res["runs"]]
    seeds = [r["seed"] for r in res["runs"]]
    ml = res["movielens"].get("backtest")
    lines = [START, "", "### Backtest: how stale can each feature set be before NDCG@10 drops by 1 %?", "", f"`{res['command']}`", ""]
    users = ", ".join(f"{bt['users']}" for bt in sims)
    lines.append(f"`parity backtest` replays `parity eval`'s held-out requests through the server's own path (read policy, "
                 f"record decoding, retrieval, int8 ranking; per-creator cap 0 as eval ranks) with each set's records as of "
                 f"t − s and read at t, with records dropped at random, and with store reads past a {g['budget_ms']:g} ms budget "
                 f"(an illustrative lognormal store, p50 {g['latency_p50_p99_ms'][0]:g} ms, p99 {g['latency_p50_p99_ms'][1]:g} ms) "
                 f"served as the server serves a store that did not answer. Simulated data: `parity data simulate` defaults, "
                 f"seeds {', '.join(map(str, seeds))} ({users} held-out requests), release profile {res['profile']} per seed. "
                 f"Tolerance: the largest tested level with NDCG@10 within 1 % of fresh at it and at every smaller level. "
                 f"`user_seen` is the seen record (filter and history), `user_record` the user's whole store read, `all` every set at once. "
                 f"Run {res['started_at']}, {res['seconds']:.0f} s in all on {res['machine'].get('cores_usable', '?')} cores.")
    lines += ["", "Tolerance per set (simulated: seed " + " / ".join(map(str, seeds)) + (", then MovieLens 100K)" if ml else ")"), "",
              "| set | max staleness | max missing |", "|---|---|---|"]
    for t in _targets(sims[0]):
        st = " / ".join(_fmt_st(bt["tolerance"].get(t, {}).get("max_staleness_ms")) for bt in sims)
        mi = " / ".join(_fmt_mi(bt["tolerance"].get(t, {}).get("max_missing")) for bt in sims)
        lines.append(f"| {t} | {st} | {mi} |")
    if ml:
        lines += ["", "| MovieLens set | max staleness | max missing |", "|---|---|---|"]
        for t in _targets(ml):
            tol = ml["tolerance"].get(t, {})
            lines.append(f"| {t} | {_fmt_st(tol.get('max_staleness_ms'))} | {_fmt_mi(tol.get('max_missing'))} |")
    fresh = ", ".join(f"{bt['fresh']['ndcg@10']:.4f}" for bt in sims)
    lines += ["", f"NDCG@10 change against fresh (simulated, median and range over seeds; fresh NDCG@10 {fresh}), by staleness:", ""]
    lines += _change_table(sims, "staleness", g["staleness_ms"])
    lines += ["", "... and by share of records missing (`user_record`: share of user reads the store did not answer):", ""]
    lines += _change_table(sims, "missing", g["missing"])
    lat = [_changes(bt, USER_RECORD, "latency", 0) for bt in sims]
    share = sims[0]["latency"]["expected_share_over"] if sims[0].get("latency") else None
    if share is not None:
        lines += ["", f"Store reads past the {g['budget_ms']:g} ms budget (expected share {share:.1%}): NDCG@10 {_spread(lat)}"
                  + (f"; MovieLens {_spread([_changes(ml, USER_RECORD, 'latency', 0)])}" if ml else "") + "."]
    if ml:
        head = (f"MovieLens 100K (per-user split, {ml['users']} held-out requests, fresh NDCG@10 {ml['fresh']['ndcg@10']:.4f}), "
                "NDCG@10 change by staleness:")
        lines += ["", head, ""]
        lines += _change_table([ml], "staleness", g["staleness_ms"])
        lines += ["", "... and by share missing:", ""]
        lines += _change_table([ml], "missing", g["missing"])
    else:
        lines += ["", f"MovieLens 100K: {res['movielens'].get('skipped', 'not run')}."]
    times = ", ".join(f"{r['backtest']['seconds']:.0f} s" for r in res["runs"])
    lines += ["", f"Backtest time per release (all conditions): simulated {times}" + (f"; MovieLens {ml['seconds']:.0f} s" if ml else "") + ".",
              "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backtest_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", default=None, help="folder for data and releases (kept; default: a temporary folder)")
    p.add_argument("--out", default="bench/results/backtest.json")
    p.add_argument("--results", default="bench/RESULTS.md")
    p.add_argument("--render-only", action="store_true", help="only splice --out's JSON into --results")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.render_only:
        default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"
        ml = Path(os.environ.get("PARITY_MOVIELENS", str(default)))
        if args.work is None:
            with tempfile.TemporaryDirectory(prefix="parity-backtest-") as tmp:
                res = run(args.seeds, Path(tmp), ml, out.parent)
        else:
            res = run(args.seeds, Path(args.work), ml, out.parent)
        write_json(out, res)
    update_results(Path(args.results), render(json.loads(out.read_text())), START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
