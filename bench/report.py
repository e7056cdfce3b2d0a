"""Turn a pytest-benchmark JSON into the generated section of bench/RESULTS.md.

    python -m bench.report RESULTS_JSON RESULTS_MD

Only the block between the markers below is rewritten; everything outside it (hand-written
notes, sections other benchmarks add) is kept byte for byte. A file without the block gets
it appended. Every derived figure (throughput, ratio vs baseline) is computed here from the
numbers in the one JSON, so a table never mixes runs.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

START = "<!-- generated:features:start -->"
END = "<!-- generated:features:end -->"
COMMAND = "make bench"
EXACT = (
    ".venv/bin/python -m pytest bench --benchmark-only --benchmark-json=bench/results/latest.json -p no:cacheprovider"
    " && .venv/bin/python -m bench.report bench/results/latest.json bench/RESULTS.md"
)
GROUP_ORDER = ["batch", "streaming", "eventlog", "online_read", "pit", "retrieval", "ranking", "pipeline", "training"]
GROUP_TITLES = {
    "batch": "Batch feature computation (BatchEngine)",
    "streaming": "Streaming ingest (StreamingIngestor, 1000-event batches)",
    "eventlog": "Event log: a whole read against verifying every part's checksum (the share the check adds)",
    "online_read": "Online read: 1 user + 500 items",
    "pit": "Point-in-time join, all feature sets",
    "retrieval": "Candidate retrieval, one query, top 100 of 100k items (exact vs ScaNN vs faiss HNSW at equal recall)",
    "ranking": "Ranking 500 candidates (one call, one thread)",
    "pipeline": "The whole Recommend path in process, no network (memory store)",
    "training": "Training a release (`parity train`), per profile",
}
# extra_info keys shown in the "details" column (derived rates are recomputed, not copied)
_SKIP_EXTRA = {"work", "unit", "baseline", "events", "rows", "events_per_s", "rows_per_s"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """The machine a result was measured on (one definition for every bench JSON)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "cores_usable": usable, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}


def write_json(out: Path, result: dict) -> None:
    """A result JSON, written whole or not at all (a run stopped half-way keeps the last one)."""
    from features.atomic import write_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode("utf-8")))


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.1f}"


def fmt_extra(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _singular(unit: str) -> str:
    if unit.endswith("ies"):
        return unit[:-3] + "y"
    return unit[:-1] if unit.endswith("s") else unit


def per_unit(b: dict) -> float:
    """Mean seconds per unit of work (per call when no work is recorded)."""
    work = b["extra_info"].get("work") or 1
    return b["stats"]["mean"] / work


def ratio_vs_baseline(b: dict, by_name: dict[str, dict]) -> tuple[str, float | None] | None:
    """(baseline name, time-per-unit ratio this/baseline), both from the same JSON.

    The ratio is None when the baseline did not run (e.g. skipped: no redis-server): a ratio
    is never taken against a number from another run.
    """
    base_name = b["extra_info"].get("baseline")
    if not base_name:
        return None
    base = by_name.get(base_name)
    if base is None:
        return base_name, None
    unit, base_unit = b["extra_info"].get("unit"), base["extra_info"].get("unit")
    if unit != base_unit:
        raise ValueError(f"{b['name']} ({unit}) and its baseline {base_name} ({base_unit}) measure different units")
    return base_name, per_unit(b) / per_unit(base)


def render(data: dict) -> str:
    benches = data.get("benchmarks", [])
    by_name = {b["name"]: b for b in benches}
    mi = data.get("machine_info", {})
    ci = data.get("commit_info", {})
    parity = data.get("parity", {})
    ds = parity.get("dataset", {})
    cpu = mi.get("parity_cpu_model") or (mi.get("cpu") or {}).get("brand_raw") or _cpu_model()
    cores = mi.get("parity_cores") or (mi.get("cpu") or {}).get("count") or os.cpu_count()
    when = data.get("datetime", "")
    try:
        when = dt.datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        pass

    out: list[str] = [START, "", "## Micro-benchmarks (generated)", ""]
    out.append("_Generated by `python -m bench.report` from `bench/results/latest.json`; do not edit inside this block._")
    out.append("")
    out.append(f"- **Command:** `{COMMAND}` (i.e. `{EXACT}`)")
    out.append(f"- **Date:** {when}")
    out.append(f"- **Machine:** {cpu}, {cores} cores, {mi.get('system', '')} {mi.get('release', '')}".rstrip())
    out.append(
        f"- **Python:** {mi.get('python_implementation', 'CPython')} {mi.get('python_version', platform.python_version())}"
        f", pytest-benchmark {data.get('version', '?')}"
    )
    if ci.get("id"):
        out.append(f"- **Commit:** `{ci['id'][:12]}`" + (f" ({ci['branch']})" if ci.get("branch") else "") + " (working tree may differ)")
    if ds:
        out.append(
            f"- **Dataset:** `simulate(users={ds.get('users')}, items={ds.get('items')}, days={ds.get('days')}, "
            f"seed={ds.get('seed')})` → **{ds.get('events', 0):,} events** "
            f"(simulated in {ds.get('simulate_s', 0):.1f} s, read back in {ds.get('read_s', 0):.1f} s)"
        )
    out.append("")
    out.append(
        "Throughput = work per call / mean. Ratio = (mean time per unit of work) / (the same for the named "
        "baseline, measured in this run); > 1 means slower than the baseline."
    )

    groups: dict[str, list[dict]] = {}
    for b in benches:
        groups.setdefault(b.get("group") or "ungrouped", []).append(b)
    order = [g for g in GROUP_ORDER if g in groups] + [g for g in groups if g not in GROUP_ORDER]
    for g in order:
        out += ["", f"### {GROUP_TITLES.get(g, g)}", ""]
        out.append("| benchmark | mean | median | stddev | rounds | throughput | ratio vs baseline | details |")
        out.append("|---|---:|---:|---:|---:|---:|---|---|")
        for b in groups[g]:
            st, ex = b["stats"], b["extra_info"]
            mean = st["mean"]
            rates = []
            if ex.get("work") and ex.get("unit"):
                rates.append(f"{fmt_rate(ex['work'] / mean)} {ex['unit']}/s")
            for key in ("events", "rows"):
                if key in ex and key != ex.get("unit"):
                    rates.append(f"{fmt_rate(ex[key] / mean)} {key}/s")
            r = ratio_vs_baseline(b, by_name)
            if r is None:
                ratio = "—"
            elif r[1] is None:
                ratio = f"n/a (`{r[0]}` not in this run)"
            else:
                ratio = f"**{r[1]:.2f}×** vs `{r[0]}`"
            details = ", ".join(f"{k}={fmt_extra(v)}" for k, v in ex.items() if k not in _SKIP_EXTRA)
            if "events" in ex:
                details = f"events={ex['events']:,}" + (", " + details if details else "")
            if "rows" in ex and ex.get("unit") != "rows":
                details = f"rows={ex['rows']:,}" + (", " + details if details else "")
            out.append(
                f"| `{b['name']}` | {fmt_time(mean)} | {fmt_time(st['median'])} | {fmt_time(st['stddev'])} | "
                f"{st['rounds']} | {' / '.join(rates) or '—'} | {ratio} | {details} |"
            )
    # the headline ratios, spelled out
    lines = []
    for b in benches:
        r = ratio_vs_baseline(b, by_name)
        if r and r[1] is not None:
            lines.append(f"- `{b['name']}` / `{r[0]}` = **{r[1]:.2f}×** (time per {_singular(b['extra_info'].get('unit', 'call'))})")
    if lines:
        out += ["", "Ratios (same run):", ""] + lines
    out += ["", END]
    return "\n".join(out) + "\n"


def splice(existing: str, block: str, start: str = START, end: str = END) -> str:
    """Replace the generated block (start..end markers) in `existing`, or append it if there is none."""
    a = existing.find(start)
    if a >= 0:
        z = existing.find(end, a)
        if z < 0:
            raise ValueError(f"RESULTS.md has {start} but no {end}: fix the file by hand")
        z += len(end)
        if existing[z : z + 1] == "\n":
            z += 1
        return existing[:a] + block + existing[z:]
    if not existing:
        return "# Benchmark results\n\n" + block
    sep = "" if existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
    return existing + sep + block


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.report RESULTS_JSON RESULTS_MD", file=sys.stderr)
        return 2
    src, dst = Path(args[0]), Path(args[1])
    data = json.loads(src.read_text(encoding="utf-8"))
    if not data.get("benchmarks"):
        print(f"{src}: no benchmarks in the JSON (was the run --benchmark-only with every benchmark skipped?)", file=sys.stderr)
        return 1
    update_results(dst, render(data))
    print(f"wrote {dst} ({len(data['benchmarks'])} benchmarks from {src})")
    return 0


def update_results(dst: Path, block: str, start: str = START, end: str = END) -> None:
    """Splice `block` into the file `dst` atomically, keeping everything else and the file mode."""
    existing = dst.read_text(encoding="utf-8") if dst.exists() else ""
    text = splice(existing, block, start, end)
    if dst.exists():
        mode = dst.stat().st_mode & 0o777
    else:  # what open() would give a new file
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=".RESULTS-", suffix=".md.tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    raise SystemExit(main())
