"""The scaling study (bench/scaling.py) as its own section of bench/RESULTS.md: for each curve a
table, the fitted growth exponents and a one-line verdict.

    python -m bench.scaling_report bench/results/scaling.json bench/RESULTS.md

Pure: everything derived (exponents, throughput, which training step grows fastest, the
verdicts) is computed here from the one result dict, so the section never mixes runs. A
growth exponent is the slope of log(value) against log(size) over the sizes measured
(`bench.item_item_scale.growth_exponent`): 1 is linear, 2 quadratic. A cost that should grow
linearly passes at an exponent <= `LINEAR_LIMIT`; above it the verdict names the exponent and
gives the explanation the run recorded (`notes`, from bench/results/scaling_notes.json), or says
that none was found.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.item_item_scale import growth_exponent
from bench.report import update_results

__all__ = ["END", "LINEAR_LIMIT", "START", "exponents", "fastest_step", "main", "render", "verdict"]

START = "<!-- generated:scaling:start -->"
END = "<!-- generated:scaling:end -->"
LINEAR_LIMIT = 1.1
STEP_SHARE = 0.05  # a training step is ranked by growth only if it takes >= 5 % of the largest run


def exponents(rows: list[dict], x: str, keys: list[str]) -> dict[str, float | None]:
    """{key: growth exponent of rows[key] against rows[x]} (None where fewer than two sizes have it).
    A key may be a path "a.b" into nested dicts."""
    def get(r: dict, k: str):
        for part in k.split("."):
            r = r.get(part) if isinstance(r, dict) else None
        return r

    xs = [get(r, x) for r in rows]
    out = {}
    for k in keys:
        pts = [(a, b) for a, b in zip(xs, (get(r, k) for r in rows)) if a is not None and b is not None]
        out[k] = growth_exponent([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 2 else None
    return out


def fastest_step(rows: list[dict], x: str) -> tuple[str, float, dict[str, float | None]] | None:
    """(step, exponent, every step's exponent) of the manifest step whose time grows fastest
    against `x`, among steps taking >= STEP_SHARE of the largest run's summed step time."""
    if len(rows) < 2:
        return None
    steps = sorted({k for r in rows for k in r.get("timings_s", {})})
    exps = {s: growth_exponent([r[x] for r in rows if s in r["timings_s"]], [r["timings_s"][s] for r in rows if s in r["timings_s"]])
            for s in steps}
    big = max(rows, key=lambda r: r[x])["timings_s"]
    total = sum(big.values()) or 1.0
    ranked = [(s, e) for s, e in exps.items() if e is not None and big.get(s, 0.0) >= STEP_SHARE * total]
    if not ranked:
        return None
    s, e = max(ranked, key=lambda se: se[1])
    return s, e, exps


def verdict(judged: dict[str, float | None], note: str | None = None, limit: float = LINEAR_LIMIT) -> str:
    """One line: linear when every judged exponent is <= limit, else which are above and why
    (`note`: the run's explanation, after either verdict)."""
    known = {k: v for k, v in judged.items() if v is not None}
    if not known:
        return "**Verdict: not enough sizes measured to fit an exponent.**"
    shown = ", ".join(f"{k} {v:.2f}" for k, v in known.items())
    over = {k: v for k, v in known.items() if v > limit}
    if not over:
        return f"**Verdict: linear** (exponents {shown}; all <= {limit:g})." + (f" {note}" if note else "")
    why = note or "no explanation recorded yet: profile it (py-spy record) before trusting this cost at larger sizes"
    return f"**Verdict: super-linear** ({', '.join(f'{k} {v:.2f}' for k, v in over.items())} > {limit:g}): {why}"


def _f(v, nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{nd}f}"


def _e(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def _train_table(rows: list[dict]) -> list[str]:
    steps = _steps(rows)
    out = ["| users | items | events | train wall s | train CPU s | process CPU s | peak RSS MB | " + " | ".join(steps) + " |",
           "|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(steps)]
    for r in rows:
        out.append(f"| {_f(r['users'])} | {_f(r['items'])} | {_f(r['events'])} | {_f(r['train_wall_s'])} | {_f(r['train_cpu_s'])} | "
                   f"{_f(r['process_cpu_s'])} | {_f(r['rss_peak_mb'], 0)} | " + " | ".join(_f(r["timings_s"].get(s), 1) for s in steps) + " |")
    return out


def _steps(rows: list[dict]) -> list[str]:
    order = ["training_data", "two_tower", "candidate_lists", "teacher", "student", "export", "index", "reference"]
    seen = {k for r in rows for k in r.get("timings_s", {})}
    return [s for s in order if s in seen] + sorted(seen - set(order))


def _train_curve(c: dict, x: str, notes: dict, name: str) -> list[str]:
    rows = sorted(c.get("rows", []), key=lambda r: r[x])
    if not rows:
        return [f"Not run: {c.get('not_run', 'no sizes measured')}."]
    out = _train_table(rows)
    ex = exponents(rows, x, ["train_wall_s", "train_cpu_s", "rss_peak_mb", "events"])
    out += ["", f"Growth exponents against {x}: train wall {_e(ex['train_wall_s'])}, train CPU {_e(ex['train_cpu_s'])}, "
            f"peak RSS {_e(ex['rss_peak_mb'])}" + (f", events {_e(ex['events'])}" if x != "events" else "") + "."]
    if len(rows) >= 3:
        tail = exponents(rows[-2:], x, ["train_cpu_s", "rss_peak_mb"])
        out.append(f"Between the two largest sizes alone: train CPU {_e(tail['train_cpu_s'])}, peak RSS {_e(tail['rss_peak_mb'])} "
                   "(the verdict is on the fit over every size).")
    fs = fastest_step(rows, x)
    if fs:
        s, e, all_e = fs
        out.append(f"Fastest-growing step (of those >= {STEP_SHARE:.0%} of the largest run): **{s}**, exponent {e:.2f} "
                   f"(every step: {', '.join(f'{k} {_e(v)}' for k, v in all_e.items())}).")
    out += ["", verdict({"train CPU": ex["train_cpu_s"], "peak RSS": ex["rss_peak_mb"]}, notes.get(name))]
    if c.get("not_run"):
        out += ["", f"Not run: {c['not_run']}."]
    return out


def _items_curve(c: dict, notes: dict) -> list[str]:
    out = []
    fit = c.get("item_item_fit")
    if fit:
        out += [(f"The item-item fit alone, from `{fit['source']}` ({fit.get('started_at', '?')}, `{fit.get('command', 'python -m bench.item_item_scale')}`; "
                f"{fit.get('data', '')}):"), "",
                "| items | engagements | fit wall s | fit CPU s | process peak RSS MB | stored MB |", "|---:|---:|---:|---:|---:|---:|"]
        for f in fit["fits"]:
            out.append(f"| {_f(f['items'])} | {_f(f['engagements'])} | {_f(f['fit_s'])} | {_f(f['fit_cpu_s'])} | {_f(f['rss_peak_mb'], 0)} | {_f(f['stored_mb'])} |")
        g = fit.get("growth_exponent", {})
        out += ["", (f"Its growth exponents against items (as recorded there): fit CPU {_e(g.get('fit_cpu_s'))}, fit wall {_e(g.get('fit_s'))}, "
                f"peak RSS {_e(g.get('rss_peak_mb'))}, stored size {_e(g.get('stored_mb'))}."), "",
                verdict({"fit CPU": g.get("fit_cpu_s"), "peak RSS": g.get("rss_peak_mb")}, notes.get("item_item_fit")), ""]
        rel = fit.get("releases") or {}
        if rel:
            out += ["Whole tiny releases on the candidate-list path (the one that fits the item-item model), from the same file: "
                    + "; ".join(f"{name} at {_f(r.get('items'))} items {_f(r['total_s'], 0)} s (candidate_lists "
                                f"{_f(r['timings_s'].get('candidate_lists'), 0)} s, training_data {_f(r['timings_s'].get('training_data'), 0)} s)"
                                for name, r in rel.items()) + ".", ""]
        out += ["Whole tiny releases against items, this run:", ""]
    return out + _train_curve(c, "items", notes, "train_items")


def _batch_curve(c: dict, notes: dict) -> list[str]:
    rows = sorted(c.get("rows", []), key=lambda r: r["events"])
    if not rows:
        return [f"Not run: {c.get('not_run', 'no sizes measured')}."]
    engines = [e for e in ("local", "ray") if any(e in r for r in rows)]
    out = ["| events | engine | materialise s | materialise events/s | materialise driver CPU s | records | batch states s | states events/s | driver peak RSS MB |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for e in engines:
            m = r.get(e)
            if not m:
                out.append(f"| {_f(r['events'])} | {e} | not run: {r.get(e + '_error', '?')} | | | | | | |")
                continue
            out.append(f"| {_f(r['events'])} | {e} | {_f(m['materialise_s'], 2)} | {_f(r['events'] / m['materialise_s'], 0)} | "
                       f"{_f(m['materialise_cpu_s'], 2)} | {_f(m['records'])} | {_f(m['states_s'], 2)} | {_f(r['events'] / m['states_s'], 0)} | "
                       f"{_f(r.get('rss_peak_mb'), 0)} |")
    judged = {}
    lines = []
    for e in engines:
        er = [r for r in rows if r.get(e)]
        ex = exponents(er, "events", [f"{e}.materialise_s", f"{e}.states_s", f"{e}.materialise_cpu_s"])
        lines.append(f"{e}: materialise wall {_e(ex[f'{e}.materialise_s'])} (driver CPU {_e(ex[f'{e}.materialise_cpu_s'])}), "
                     f"batch states wall {_e(ex[f'{e}.states_s'])}")
        if len(er) >= 3:
            tail = exponents(er[-2:], "events", [f"{e}.materialise_s", f"{e}.states_s"])
            lines[-1] += f" (two largest sizes alone: {_e(tail[f'{e}.materialise_s'])} and {_e(tail[f'{e}.states_s'])})"
        judged[f"{e} materialise"] = ex[f"{e}.materialise_s"]
        judged[f"{e} states"] = ex[f"{e}.states_s"]
    ratio = [f"{_f(r['events'])}: {r['local']['materialise_s'] / r['ray']['materialise_s']:.2f}x materialise, "
             f"{r['local']['states_s'] / r['ray']['states_s']:.2f}x states" for r in rows if r.get("local") and r.get("ray")]
    out += ["", "Growth exponents of time against events (throughput grows as 1 - exponent): " + "; ".join(lines) + "."]
    if ratio:
        out.append("Ray over the single process (throughput ratio, same process and log): " + "; ".join(ratio) + ".")
    cfg = c.get("ray")
    if cfg:
        out.append(f"Ray: a local cluster of {cfg['cpus']} CPUs, {cfg['workers']} workers x {cfg['partitions_per_worker']} partitions, "
                   f"started in each size's process (start-up not timed; one small warm-up call first).")
    out += ["", verdict(judged, notes.get("batch"))]
    if c.get("not_run"):
        out += ["", f"Not run: {c['not_run']}."]
    return out


def _device_curve(c: dict, notes: dict) -> list[str]:
    rows = sorted(c.get("rows", []), key=lambda r: r["users"])
    if not rows:
        return [f"Not run: {c.get('not_run', 'no sizes measured')}."]
    phases = sorted({k for r in rows for k in r.get("phases_s", {})} - {"total"})
    out = ["| users exported | events | export wall s | export CPU s | users/s | bytes/user | peak RSS MB | " + " | ".join(phases) + " |",
           "|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(phases)]
    for r in rows:
        out.append(f"| {_f(r['users'])} | {_f(r.get('events'))} | {_f(r['seconds'], 2)} | {_f(r.get('cpu_s'), 2)} | {_f(r['users'] / r['seconds'], 0)} | "
                   f"{_f(r.get('bytes_per_user'), 0)} | {_f(r.get('rss_peak_mb'), 0)} | " + " | ".join(_f(r["phases_s"].get(p), 2) for p in phases) + " |")
    ex = exponents(rows, "users", ["seconds", "cpu_s", "rss_peak_mb"])
    out += ["", f"Growth exponents against users: export wall {_e(ex['seconds'])}, export CPU {_e(ex['cpu_s'])}, peak RSS {_e(ex['rss_peak_mb'])}."]
    ph = exponents(rows, "users", [f"phases_s.{p}" for p in phases])
    if phases:
        out.append("Per phase: " + ", ".join(f"{p} {_e(ph[f'phases_s.{p}'])}" for p in phases) + ".")
    if c.get("setup"):
        s = c["setup"]
        out.append(f"One tiny release and one tiny device model, trained on the smallest log ({s.get('note', '')}), exported for every log.")
    out += ["", verdict({"export CPU": ex["cpu_s"], "export wall": ex["seconds"]}, notes.get("device"))]
    if c.get("not_run"):
        out += ["", f"Not run: {c['not_run']}."]
    return out


def _fleet(variant: str) -> int | None:
    tail = variant[len("parity_w"):] if variant.startswith("parity_w") else ""
    return int(tail) if tail.isdigit() and int(tail) >= 1 else None


def _workers_curve(c: dict) -> list[str]:
    w = c.get("result")
    if not w:
        return [(f"`{c.get('source', 'bench/results/serving_workers.json')}` does not exist: run `make bench-workers` "
                "(servers are not started by this study).")]
    scen = [s for s in w.get("scenarios", []) if _fleet(s["variant"])]
    out = [f"From `{c['source']}` ({w.get('started_at', '?')}, `make bench-workers`), not re-measured here:", "",
           "| store | workers | capacity req/s (p99 <= limit) | capacity / 1 worker |", "|---|---:|---:|---:|"]
    stores = sorted({s["store"] for s in scen})
    pts = []
    for st in stores:
        by = {_fleet(s["variant"]): s.get("capacity_qps") for s in scen if s["store"] == st}
        for n in sorted(by):
            cap, one = by[n], by.get(1)
            out.append(f"| {st} | {n} | {_f(cap, 0)} | {f'{cap / one:.2f}x' if cap and one else '—'} |")
            if cap:
                pts.append((st, n, cap))
    ex = {st: growth_exponent([n for s2, n, _ in pts if s2 == st], [c2 for s2, _, c2 in pts if s2 == st]) for st in stores}
    out += ["", "Growth exponent of capacity against workers (1 = perfect scaling): " + ", ".join(f"{k} {_e(v)}" for k, v in ex.items()) + "."]
    return out


def _runs(result: dict) -> list[str]:
    """The command and date lines: one per run whose curves the result holds (a partial run keeps the others')."""
    runs = result.get("runs") or [{"command": result.get("command", "make bench-scaling"), "started_at": result.get("started_at", "?")}]
    if len(runs) == 1:
        return [f"- **Command:** `{runs[0]['command']}`", f"- **Date:** {runs[0]['started_at']} → {result.get('finished_at', 'unfinished')}"]
    latest = {}
    for r in runs:  # the last run of a curve is the one whose figures are shown
        for c in r.get("curves") or []:
            latest[c] = r
    out = ["- **Commands and dates** (curves measured by separate runs):"]
    for r in runs:
        mine = [c for c, lr in latest.items() if lr is r]
        if mine:
            out.append(f"  - `{r['command']}` at {r['started_at']}: {', '.join(mine)}")
    return out


def render(result: dict) -> str:
    """The generated block (with its markers) for a scaling result dict."""
    m, cfg, curves = result.get("machine", {}), result.get("config", {}), result.get("curves", {})
    notes = result.get("notes", {})
    out = [START, "", "## Scaling: costs against the size of the data (generated)", "",
           "_Generated by `python -m bench.scaling_report` from `bench/results/scaling.json`; do not edit inside this block._", "",
           *_runs(result),
           (f"- **Machine:** {m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('cores_usable', '?')} usable), shared with other jobs; "
           f"every measurement under `nice -n 10`, one at a time, each in a fresh process; Python {m.get('python', '?')}"),
           (f"- **Exponent:** slope of log(cost) against log(size) (`bench.item_item_scale.growth_exponent`); linear means <= {LINEAR_LIMIT:g}. "
           "CPU time is the steadier figure on a shared machine; wall time is beside it."),
           f"- **Data:** `features.simulator.simulate`, {cfg.get('days', 14)} days, seed {cfg.get('seed', 0)}; {cfg.get('data_note', '')}",
           f"- **Plots:** {', '.join(f'`{p}`' for p in result.get('plots', [])) or 'none'}"]
    if result.get("quick"):
        out.append("- **Quick run** (`--quick`): tiny sizes, a smoke test, not a measurement.")
    sections = [
        ("train_events", "1. Training time and peak memory against events", lambda c: _train_curve(c, "events", notes, "train_events")),
        ("train_items", "2. Training time against items", lambda c: _items_curve(c, notes)),
        ("batch", "3. Materialisation and batch states against events: one process vs Ray", lambda c: _batch_curve(c, notes)),
        ("device", "4. Device export against users", lambda c: _device_curve(c, notes)),
        ("workers", "5. Server capacity against workers", _workers_curve),
    ]
    for key, title, fn in sections:
        c = curves.get(key)
        out += ["", f"### {title}", ""]
        if c is None:
            out.append("Not run in this study's last run.")
            continue
        if c.get("about"):
            out += [c["about"], ""]
        out += fn(c)
    if result.get("not_run"):
        out += ["", "### Not run", ""] + [f"- {x}" for x in result["not_run"]]
    out += ["", END]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.scaling_report SCALING_JSON RESULTS_MD", file=sys.stderr)
        return 2
    src, dst = Path(args[0]), Path(args[1])
    update_results(dst, render(json.loads(src.read_text(encoding="utf-8"))), START, END)
    print(f"wrote the scaling section of {dst} from {src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
