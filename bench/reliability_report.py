"""The reliability section of bench/RESULTS.md, generated from the two reliability JSON files.

    python -m bench.reliability_report bench/results/reliability.json bench/results/reliability_faults.json bench/RESULTS.md

Only the block between the reliability markers is rewritten (bench.report.update_results). A
missing JSON file leaves its table out with a line saying which command makes it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from bench.report import update_results

__all__ = ["render", "main", "START", "END"]

START = "<!-- generated:reliability:start -->"
END = "<!-- generated:reliability:end -->"


def _fmt(v, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _codes(d: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items())) or "none"


def _overload(res: dict) -> list[str]:
    m = res.get("machine", {})
    out = [f"Run {res.get('started_at', '?')} – {res.get('finished_at', 'unfinished')} on {m.get('cpu', '?')} "
           f"({m.get('cores', '?')} cores); server {'pinned to CPU 0, load generator to CPU 1' if res.get('pinned') else 'and generator unpinned'}; "
           f"release profile {res.get('setup', {}).get('profile', '?')}, data {res.get('setup', {}).get('sim', '?')}. "
           "Command: `python -m bench.reliability --out bench/results/reliability.json` (part of `make bench`).", ""]
    for st in res.get("stores", []):
        cap = st.get("capacity_qps") or 0.0
        out += [f"### Overload, {st['store']} store: capacity {cap:g} req/s (p99 <= 50 ms, no errors)", "",
                "| offered | generator sent | goodput (OK/s) | goodput / capacity | OK p50 | OK p99 | not OK (by code) | health p99 main / ops (failed) |",
                "|---|---:|---:|---:|---:|---:|---|---|"]
        for r in st.get("multiples", []):
            h = r.get("health", {})
            hm, ho = h.get("main", {}), h.get("ops", {})
            health = (f"{_fmt(hm.get('p99_ms'))} / {_fmt(ho.get('p99_ms'))} ms ({hm.get('failed', 0)} / {ho.get('failed', 0)} of "
                      f"{hm.get('checks', 0)})")
            out.append(f"| {r['multiple']:g}x = {r['qps']:g}/s | {_fmt(r.get('offered_achieved'))}/s | {_fmt(r.get('qps_achieved'))} | "
                       f"{_fmt(r.get('goodput_ratio'), 2)} | {_fmt(r.get('p50_ms'), 2)} ms | {_fmt(r.get('p99_ms'), 2)} ms | "
                       f"{_codes(r.get('errors_by_code', {}))} | {health} |")
        rec = st.get("recovery")
        if rec:
            out += ["", f"Recovery: {rec.get('at_fraction', 1.0):g}x offered right after the {rec['after_multiple']:g}x run ({rec['gap_s']} s later) had p99 <= 50 ms and no "
                        f"errors in every 0.5 s window from {rec['recovery_s']} s on (run p99 {_fmt(rec.get('p99_ms'), 2)} ms, "
                        f"errors {_codes(rec.get('errors_by_code', {}))})."]
        cpu = [(r["multiple"], r.get("server_cpu_s", {})) for r in st.get("multiples", []) if r.get("server_cpu_s")]
        if cpu:
            out += ["", "Server CPU seconds per thread kind during each run (`python`: the event loop and Python's threads; the others "
                        "are gRPC's C core, which also does the HTTP/2 work of every call it drops): " +
                    "; ".join(f"{m:g}x " + ", ".join(f"{k} {v:g}" for k, v in d.items()) for m, d in cpu) + "."]
        sm = st.get("server_metrics", {})
        if sm:
            adm = {k.split('outcome="')[1].rstrip('"}'): int(v) for k, v in sm.items() if k.startswith('parity_admission_total{lane="serve"')}
            codes = {k.split('code="')[1].split('"')[0]: int(v) for k, v in sm.items() if 'rpc="Recommend"' in k}
            core = {k.split('result="')[1].split('"')[0]: int(v) for k, v in sm.items() if k.startswith('parity_grpc_calls_total{') and 'server="main"' in k}
            dropped = core.get("started", 0) - core.get("succeeded", 0) - core.get("failed", 0)
            out += ["", f"The server's own count over the whole run: admission (serve lane) {_codes(adm)}; Recommend status codes "
                        f"{_codes(codes)}; gRPC's count of calls (channelz, `parity_grpc_calls_total`) {_codes(core)}, so "
                        f"{dropped:,} calls were dropped by the C core before Python saw them (the clients' CANCELLED)."]
        out.append("")
    return out


def _faults(res: dict) -> list[str]:
    m = res.get("machine", {})
    out = [f"### Faults (run {res.get('started_at', '?')} on {m.get('cpu', m) if isinstance(m, dict) else m})", "",
           "Command: `python -m bench.reliability_faults --out bench/results/reliability_faults.json` (part of `make bench`).", "",
           "| fault | what was done | requests | failed | degraded | events sent | lost | double-counted | seconds | notes |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res.get("rows", []):
        notes = str(r.get("notes", "")).replace("|", "/").replace("\n", " ")
        out.append(f"| {r['fault']} | {r['scenario']} | {_fmt(r.get('requests'))} | {_fmt(r.get('requests_failed'))} | "
                   f"{_fmt(r.get('requests_degraded'))} | {_fmt(r.get('events_sent'))} | {_fmt(r.get('events_lost'))} | "
                   f"{_fmt(r.get('events_double_counted'))} | {_fmt(r.get('seconds'))} | {notes} |")
    out.append("")
    return out


def render(overload: dict | None, faults: dict | None) -> str:
    out = [START, "", "## Reliability: overload and faults (generated)", ""]
    out += _overload(overload) if overload else ["(no bench/results/reliability.json: run `python -m bench.reliability`)", ""]
    out += _faults(faults) if faults else ["(no bench/results/reliability_faults.json: run `python -m bench.reliability_faults`)", ""]
    out.append(END)
    return "\n".join(out)


def _load(p: str) -> dict | None:
    path = Path(p)
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m bench.reliability_report RELIABILITY_JSON FAULTS_JSON RESULTS_MD", file=sys.stderr)
        return 2
    update_results(Path(args[2]), render(_load(args[0]), _load(args[1])), START, END)
    print(f"wrote the reliability section of {args[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
