"""The device section of bench/RESULTS.md, generated from bench/results/device.json.

    python -m bench.device_report bench/results/device.json bench/RESULTS.md

Only the block between the device markers is rewritten (bench.report.update_results).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from bench.report import update_results

__all__ = ["render", "main", "START", "END"]

START = "<!-- generated:device:start -->"
END = "<!-- generated:device:end -->"


def _f(v, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _lat(d: dict) -> str:
    return f"{_f(d['p50_ms'])} / {_f(d['p99_ms'])}"


def render(res: dict) -> str:
    m, cfg = res.get("machine", {}), res.get("config", {})
    b, dev, srv = res["bundle"], res["device"], res["server_recommend"]
    out = [START, "", "## The device path: bundles, export, on-device ranking, sync, hybrid mode, quality (generated)", "",
           f"Run {res.get('started_at', '?')} – {res.get('finished_at', '?')} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores)"
           f"{' — QUICK smoke run, not for comparison' if res.get('quick') else ''}. Command: `python -m bench.device --out "
           "bench/results/device.json` (part of `make bench`; `make bench-device` alone). Simulated data "
           f"{cfg.get('sim')}, release profile {cfg.get('profile')}.", ""]
    out += ["**Bundle**", "", "| what | size |", "|---|---:|",
            f"| tiny ranker, int8 ONNX (hidden {'-'.join(map(str, b['model_hidden']))}, {b['model_columns']} inputs) | {_f(b['model_int8_onnx_kb'], 1)} KB |",
            f"| the same, ORT format | {_f(b['model_ort_kb'], 1)} KB |",
            f"| item table (int8 embeddings + attributes) per 1k items | {_f(b['item_chunk_kb_per_1k_items'], 1)} KB |",
            f"| item statistics per 1k items | {_f(b['item_stats_kb_per_1k_items'], 1)} KB |",
            f"| one user file (embedding, 200 candidates, recent items), mean | {_f(b['bytes_per_user_file'], 0)} bytes |",
            f"| one bin (token -> user file), mean; {b['bins']} bins | {_f(b['bin_bytes_mean'], 0)} bytes |",
            f"| manifest.json | {_f(b['manifest_bytes'])} bytes |", ""]
    sc = res["export_scaling"]
    out += ["**Export throughput** (one tiny release and tiny model, `export_device` per log; simulated "
            f"{sc['sim']})", "", "| users | seconds | users/s | bytes per user |", "|---:|---:|---:|---:|"]
    for r in sc["rows"]:
        out.append(f"| {_f(r['users'])} | {_f(r['seconds'], 1)} | {_f(r['users_per_s'], 0)} | {_f(r['bytes_per_user'], 0)} |")
    out += ["", f"Growth exponent of export time in users: **{_f(sc['time_exponent'])}** (1 = linear).", ""]
    d = res["delta"]
    out += [f"**Delta** ({d['new_items']} new items = 1 %, {d['active_users']} users with new events = 1 %): `export_delta` "
            f"{_f(d['delta_seconds'])} s writing {d['delta_files']} files / {_f(d['delta_bytes'])} bytes, against the full export's "
            f"{_f(d['full_export_seconds'])} s / {_f(d['full_export_bytes'])} bytes. A device's sync: full {d['sync_full']['files']} files / "
            f"{_f(d['sync_full']['bytes'])} bytes in {_f(d['sync_full']['ms'], 1)} ms; after the delta {d['sync_incremental']['files']} files / "
            f"{_f(d['sync_incremental']['bytes'])} bytes in {_f(d['sync_incremental']['ms'], 1)} ms.", ""]
    rk = dev["rank"]
    out += ["**On the device** (this machine's CPU, one thread; p50 / p99 ms)", "", "| what | p50 / p99 ms |", "|---|---:|",
            f"| `Client.rank`, {rk['candidates']} candidates, k=10 ({rk['n']} calls) | **{_lat(rk)}** |",
            f"| the server's Recommend, same release, memory store, sequential ({srv['n']} calls, same run) | {_lat(srv)} |",
            f"| cold start: `Client(...)` from its cache (signature and sha256 re-checked) + first rank | {_lat(dev['cold_start_and_first_rank'])} |",
            f"| full sync over loopback ({dev['full_sync_files']} files, {_f(dev['full_sync_bytes'])} bytes) | {_lat(dev['full_sync'])} |",
            f"| sync when nothing changed (304) | {_lat(dev['not_modified_sync'])} |", ""]
    h = res["hybrid"]
    out += ["**Hybrid mode behind a faulty network** (bench/delay_proxy.py: "
            f"{h.get('plan', {}).get('delay_share', 0.2):.0%} of calls delayed {h.get('plan', {}).get('delay_ms', [80, 200])} ms, "
            f"{h.get('plan', {}).get('drop_share', 0.05):.0%} dropped; same seeded faults for both legs)", "",
            "| leg | phase | calls | failed | p50 ms | p99 ms | max ms | answered by |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for leg in ("server_only", "hybrid"):
        for phase in ("sequential", "concurrent", "all"):
            a = h[leg][phase]
            lat = a["latency_ms"]
            src = ", ".join(f"{k} {v:.0%}" for k, v in sorted(a.get("sources", {}).items()))
            out.append(f"| {leg} | {phase} | {a['calls']} | {a['failed']} | {_f(lat['p50'], 1)} | {_f(lat['p99'], 1)} | {_f(lat['max'], 1)} | {src} |")
    out += ["", f"Sequential: one device asking {h.get('n')} times, one call at a time (a phone's feed); concurrent: "
                f"{h.get('concurrency')} threads of this one process calling at once (several devices share this process's GIL and "
                "its 2 cores with the server, so this phase measures the harness's contention as much as the SDK). Latency is what "
                "the caller waited, failed calls included; the server-only client's deadline is 1 s, the SDK's server deadline 40 ms."]
    if h.get("proxy_overhead"):
        po = h["proxy_overhead"]
        out += ["", f"The proxy's own cost in the same run: +{_f(po['added_p50_ms'])} ms p50 per forwarded call "
                    f"({po['n']} interleaved direct/proxied calls)."]
    out += [""]
    q = res.get("quality", [])
    if q:
        out += ["**Quality** (held-out NDCG@10, `pipeline.device_eval.evaluate_device`: the same users and cut times as "
                "`parity eval`; device = the tiny int8 ranker on the user's retrieval top-200 with device inputs only)", "",
                "| data | users | device int8 | server two-stage int8 | popularity | device / server | device / popularity |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in q:
            out.append(f"| {r['data']} | {r['users']} | {r['device_int8']['ndcg@10']:.4f} | {r['server_student_int8']['ndcg@10']:.4f} | "
                       f"{r['popularity']['ndcg@10']:.4f} | {r['ratios']['device_over_server_ndcg']:.2f} | {r['ratios']['device_over_popularity_ndcg']:.2f} |")
    out += ["", END, ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m bench.device_report RESULT.json RESULTS.md", file=sys.stderr)
        return 2
    src, dst = Path(args[0]), Path(args[1])
    if not src.is_file():
        block = f"{START}\n\nNo device results yet: `python -m bench.device --out {src}` makes them.\n\n{END}"
    else:
        block = render(json.loads(src.read_text()))
    update_results(dst, block, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
