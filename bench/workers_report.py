"""The serving study for `parity serve --workers N` (bench/serving.py --variants parity_w1,parity_w2)
as its own section of bench/RESULTS.md: capacity at p99 <= 50 ms per worker count and store,
and the ratio to one worker measured in the same run.

    python -m bench.serving --variants parity_w1,parity_w2 --out bench/results/serving_workers.json --work DIR
    python -m bench.workers_report bench/results/serving_workers.json bench/RESULTS.md

Every parity_wN variant is measured with the same client (the load generator spreads requests
over `fleet_channels` connections, so the kernel's per-connection balancing reaches every
worker); one worker under the same client is the baseline. The load generator runs on the same
cores as the fleet, which the ratio cannot hide: the section says how many cores there were.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.report import update_results
from bench.serving import fleet_size
from bench.serving_report import _f

__all__ = ["render", "main", "START", "END"]

START = "<!-- generated:serving-workers:start -->"
END = "<!-- generated:serving-workers:end -->"


def render(result: dict, command: str) -> str:
    cfg, m = result["config"], result["machine"]
    fleets = sorted({fleet_size(s["variant"]) for s in result["scenarios"] if fleet_size(s["variant"])})
    lim = cfg["p99_limit_ms"]
    out = [START, "", "### Worker processes (`parity serve --workers N`, generated)", "",
           f"`{command}`; {result.get('started_at', '?')} → {result.get('finished_at', 'unfinished')}; {m['cpu']}, {m['cores']} cores, "
           f"the load generator on the same cores. Each variant's requests go over {cfg['fleet_channels']} connections; capacity = the "
           f"highest rate with p99 ≤ {lim:g} ms, zero errors and ≥ {cfg['keep_up']:.0%} of the offered rate achieved.", "",
           f"| store | workers | p99 at {cfg['fixed_qps']:g} req/s (ms) | errors | capacity (req/s) | capacity / 1 worker | RSS idle (MB) | rates tried (✓ pass, ✗ fail, p99 ms) |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    by = {(s["store"], fleet_size(s["variant"])): s for s in result["scenarios"] if fleet_size(s["variant"])}
    for st in cfg["stores"]:
        one = by.get((st, 1), {}).get("capacity_qps")
        for n in fleets:
            s = by.get((st, n))
            if s is None:
                continue
            f, cap = s.get("fixed", {}), s.get("capacity_qps")
            ratio = f"**{cap / one:.2f}×**" if one and cap is not None else "—"
            steps = ", ".join(f"{x['qps']:g} {'✓' if x['passed'] else '✗'} {_f(x['p99_ms'])}" for x in s.get("capacity_steps", []))
            out.append(f"| {st} | {n} | {_f(f.get('p99_ms'), 2)} | {f.get('errors', '—')} | {_f(cap, 0)} | {ratio} | "
                       f"{_f(s.get('rss_mb_idle'), 0)} | {steps} |")
    out += ["", END]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.workers_report SERVING_WORKERS_JSON RESULTS_MD", file=sys.stderr)
        return 2
    src, dst = Path(args[0]), Path(args[1])
    result = json.loads(src.read_text(encoding="utf-8"))
    if not any(fleet_size(s["variant"]) for s in result.get("scenarios", [])):
        print(f"{src}: no parity_wN scenarios (run bench.serving --variants parity_w1,parity_w2)", file=sys.stderr)
        return 1
    command = (f".venv/bin/python -m bench.serving --variants {','.join(result['config']['variants'])} --out {src} && "
               f".venv/bin/python -m bench.workers_report {src} {dst}")
    update_results(dst, render(result, command), START, END)
    print(f"wrote the workers section of {dst} from {src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
