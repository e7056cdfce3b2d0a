"""bench/results/change_overhead.json -> the "safe change" overhead section of bench/RESULTS.md.

    python -m bench.change_report bench/results/change_overhead.json bench/RESULTS.md

Ratios are taken within a round (each variant against the plain server measured just before
it), then summarised over rounds as median and range.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench.report import update_results

__all__ = ["render", "main", "START", "END"]

START = "<!-- generated:change:start -->"
END = "<!-- generated:change:end -->"
COMMAND = ".venv/bin/python -m bench.change_overhead --out bench/results/change_overhead.json && .venv/bin/python -m bench.change_report bench/results/change_overhead.json bench/RESULTS.md"
LABEL = {"plain": "plain server (as shipped: live drift watch on)", "no_drift": "without the live drift watch", "log10": "+ served log, 10 % sampled", "log100": "+ served log, every request",
         "shadow100": "+ shadow on every request"}


def _spread(xs: list[float], fmt: str) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "—"
    med = statistics.median(xs)
    return fmt.format(med) if len(xs) == 1 else f"{fmt.format(med)} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def render(res: dict) -> str:
    cfg = res["config"]
    by_round: dict[int, dict[str, dict]] = {}
    for r in res["runs"]:
        by_round.setdefault(r["round"], {})[r["variant"]] = r
    lines = [START, "", "### Safe change: what the served log and the shadow cost the answer path", "",
             f"`{COMMAND}`", "",
             f"Memory store, {cfg['profile']} release on {cfg['sim']}, fixed rate {cfg['fixed_qps']:g} req/s for "
             f"{cfg['fixed_seconds']:g} s, capacity = highest rate with p99 <= {cfg['p99_limit_ms']:g} ms, no errors and keeping up. "
             f"{res['rounds']} round(s); each variant's ratio is to the plain server of its round (median, range). "
             f"Machine: {res['machine'].get('cores_usable', '?')} cores, load generator beside the server. Run {res.get('started_at', '?')}.", "",
             "| variant | p99 at fixed rate (ms) | p99 ratio to plain | capacity (req/s) | capacity ratio to plain |",
             "|---|---:|---:|---:|---:|"]
    variants = [v for v in ("plain", "no_drift", "log10", "log100", "shadow100") if any(v in d for d in by_round.values())]
    for v in variants:
        p99 = [d[v]["fixed"]["p99_ms"] for d in by_round.values() if v in d]
        cap = [d[v]["capacity_qps"] for d in by_round.values() if v in d]
        rp = [d[v]["fixed"]["p99_ms"] / d["plain"]["fixed"]["p99_ms"] for d in by_round.values() if v in d and "plain" in d]
        rc = [d[v]["capacity_qps"] / d["plain"]["capacity_qps"] for d in by_round.values() if v in d and "plain" in d and d["plain"]["capacity_qps"]]
        lines.append(f"| {LABEL.get(v, v)} | {_spread(p99, '{:.2f}')} | {_spread(rp, '{:.2f}×')} | {_spread(cap, '{:.0f}')} | {_spread(rc, '{:.2f}×')} |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Splice the overhead section, and the canary and drift sections when their JSONs exist
    beside it (bench/results/canary.json, drift.json), into RESULTS_MD."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bench.change_report RESULTS_JSON RESULTS_MD", file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    if src.exists():
        update_results(dst, render(json.loads(src.read_text())), START, END)
    from bench import canary_report, drift_report

    for mod, name in ((canary_report, "canary.json"), (drift_report, "drift.json")):
        j = src.parent / name
        if j.exists():
            block = mod.render(json.loads(j.read_text())).strip()
            update_results(dst, block, mod.BEGIN, mod.END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
