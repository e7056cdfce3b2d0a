"""`make loadtest`: Locust, headless, for a fixed time and user count, against a server this
command starts itself (or one you name), then a summary beside Locust's CSV.

    python -m bench.loadtest [--host 127.0.0.1:50051 --events DATA] [--users 30] [--run-time 60s]
                             [--out bench/results/locust]

Without --host it serves the demo workspace (`make demo`'s data and newest release under
--workspace, default demo-out; made here with the small profile if missing) on a free port
and stops it afterwards. Writes {out}_stats.csv, {out}_stats_history.csv, {out}_failures.csv,
{out}_exceptions.csv (Locust's own) and {out}_summary.json / {out}_summary.md: per RPC the
requests, failures, req/s and p50/p95/p99/max, plus the run's settings. Exit status 1 when any
request failed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["summarise", "main"]

REPO = Path(__file__).resolve().parents[1]
_COLS = {"Request Count": "requests", "Failure Count": "failures", "Requests/s": "rps", "50%": "p50_ms", "95%": "p95_ms",
         "99%": "p99_ms", "Max Response Time": "max_ms", "Average Response Time": "mean_ms"}


def summarise(stats_csv: Path) -> dict[str, dict[str, float]]:
    """Per request name (and 'Aggregated'): Locust's figures from its _stats.csv."""
    out: dict[str, dict[str, float]] = {}
    with open(stats_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name = row.get("Name") or "?"
            out[name] = {k: float(row[c]) if row.get(c) not in (None, "", "N/A") else float("nan") for c, k in _COLS.items()}
    if "Aggregated" not in out:
        raise ValueError(f"{stats_csv}: no Aggregated row (did Locust run?)")
    return out


def _markdown(summary: dict, settings: dict) -> str:
    lines = [f"# Locust load test ({settings['started_at']})", "",
             f"`{settings['command']}`", "",
             f"{settings['users']} users for {settings['run_time']} against {settings['host']}"
             + (f" (release {settings['release']})" if settings.get("release") else ""), "",
             "| RPC | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['requests']:.0f} | {s['failures']:.0f} | {s['rps']:.1f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | "
                     f"{s['p99_ms']:.0f} | {s['max_ms']:.0f} |")
    lines += ["", "Locust's percentiles are closed-loop and rounded; the open-loop figures are in bench/RESULTS.md."]
    return "\n".join(lines) + "\n"


def _demo_release(workspace: Path) -> tuple[Path, Path]:
    data = workspace / "data"
    if not (data / "dataset.json").is_file():
        from features.simulator import simulate

        print(f"[loadtest] no demo data in {workspace}: simulating it", file=sys.stderr)
        simulate(data)
    releases = sorted(p for p in (workspace / "releases").glob("*") if (p / "manifest.json").is_file()) if (workspace / "releases").is_dir() else []
    if releases:
        return data, releases[-1]
    from pipeline.train import train_release

    print(f"[loadtest] no release in {workspace}/releases: training the small profile", file=sys.stderr)
    return data, train_release(data, workspace / "releases", profile="small", seed=0).path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=None, help="HOST:PORT of a running server (default: start one on the demo workspace)")
    p.add_argument("--events", default=None, help="the data dir the server serves (user ids are drawn from it)")
    p.add_argument("--server-args", default="", help="extra `parity serve` options for the server this starts, e.g. '--core-pending 4,8'")
    p.add_argument("--token", default=os.environ.get("PARITY_LOADTEST_TOKEN"),
                   help="IngestEvents bearer token of a running --host (its ingest or admin token; env PARITY_LOADTEST_TOKEN)")
    p.add_argument("--workspace", default="demo-out", help="demo workspace used without --host (default demo-out)")
    p.add_argument("--users", type=int, default=30, help="Locust users (default 30; about 5 requests/s each)")
    p.add_argument("--run-time", default="60s", help="how long (Locust syntax, default 60s)")
    p.add_argument("--out", default="bench/results/locust", help="CSV prefix (default bench/results/locust)")
    a = p.parse_args(argv)
    if a.users < 1:
        p.error("--users must be >= 1")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    server = None
    release = None
    try:
        token = a.token
        if a.host:
            host, events = a.host, a.events
        else:
            from bench.serving import ServerProcess

            events, release = _demo_release(Path(a.workspace))
            token = token or secrets.token_hex(16)
            server = ServerProcess([sys.executable, "-m", "parity", "serve", "--release", str(release), "--events", str(events),
                                    "--ingest-token", token, *a.server_args.split()], out.parent / "loadtest-server.log").start()
            host = server.target
        cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"), "--headless", "--host", host,
               "--users", str(a.users), "--spawn-rate", str(a.users), "--run-time", a.run_time, "--csv", str(out), "--only-summary"]
        if events:
            cmd += ["--parity-events", str(events)]
        env = {**os.environ, "PARITY_LOADTEST_TOKEN": token} if token else None  # not on the command line: ps would show it
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        r = subprocess.run(cmd, cwd=REPO, env=env)
        if r.returncode not in (0, 1):  # 1: Locust saw failures; the summary says which
            print(f"[loadtest] locust exited with {r.returncode}", file=sys.stderr)
            return r.returncode
    finally:
        if server is not None:
            server.stop()
    summary = summarise(Path(f"{out}_stats.csv"))
    settings = {"started_at": started, "host": host, "users": a.users, "run_time": a.run_time, "release": str(release.name) if release else None,
                "command": " ".join(["python -m bench.loadtest", *(argv if argv is not None else sys.argv[1:])])}
    Path(f"{out}_summary.json").write_text(json.dumps({"settings": settings, "rpcs": summary}, indent=1) + "\n", encoding="utf-8")
    md = _markdown(summary, settings)
    Path(f"{out}_summary.md").write_text(md, encoding="utf-8")
    print(md)
    return 1 if summary["Aggregated"]["failures"] > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
