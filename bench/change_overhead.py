"""What safe change costs the answer path: the served log and the shadow, against the plain
server, measured in one run on this machine.

    python -m bench.change_overhead --out bench/results/change_overhead.json [--quick]

Variants (each a `parity serve` child process on the memory store, the serving study's data
and release):
  plain      the product server as shipped (live drift watch on);
  no_drift   without the live drift watch (`--drift-interval 0`): what the watch costs;
  log10      + `--served-log DIR --log-sample 0.1` (the issue's target: < 5 % capacity loss);
  log100     + every request logged (the worst case);
  shadow100  + a rollout whose shadow (a second copy of the release) runs for every request.
Each variant is measured at the serving study's fixed rate (p99) and by the same capacity
search (highest rate with p99 <= 50 ms, no errors, keeping up). Variants run in rounds,
plain first in each round, so drift of the shared machine hits all of them alike; the report
gives each variant's ratio to plain within its round, and the spread over rounds.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from bench.report import machine, write_json
from bench.serving import ServerProcess, ServingBenchConfig, _measure, _say, capacity_search, prepared

__all__ = ["run", "main", "VARIANTS"]

VARIANTS = ("plain", "no_drift", "log10", "log100", "shadow100")
TOKEN = "bench-admin-token"


def _argv(variant: str, release: Path, data: Path, work: Path) -> list[str]:
    argv = [sys.executable, "-m", "parity", "serve", "--release", str(release), "--events", str(data), "--store", "memory",
            "--admin-token", TOKEN]
    if variant == "no_drift":
        argv += ["--drift-interval", "0"]
    if variant.startswith("log"):
        d = work / f"served-{variant}-{time.monotonic_ns()}"
        argv += ["--served-log", str(d), "--log-sample", "0.1" if variant == "log10" else "1"]
    return argv


def _start_shadow(srv: ServerProcess, shadow: Path) -> None:
    import grpc

    from parity_api.v1 import recommender_pb2 as pb
    from parity_api.v1 import recommender_pb2_grpc as pb_grpc

    with grpc.insecure_channel(srv.target) as ch:
        pb_grpc.AdminStub(ch).SetRollout(pb.SetRolloutRequest(spec=pb.RolloutSpec(shadow=str(shadow), shadow_percent=100.0, salt="bench")),
                                         metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=120)


def run(out: Path, cfg: ServingBenchConfig, rounds: int, work: Path | None = None) -> dict:
    from bench.latency import UserMix

    tmp = tempfile.TemporaryDirectory(prefix="parity-change-bench-") if work is None else None
    work = Path(tmp.name) if tmp else Path(work)
    try:
        data, release, setup = prepared(work, cfg)
        shadow = release.parent / f"{release.name}-shadow"
        if not shadow.exists():
            shutil.copytree(release, shadow)  # the same models under another folder: a second snapshot to run
        user_ids = UserMix.from_data_dir(data).sample(int(max(cfg.fixed_qps * cfg.fixed_seconds, 100_000)), seed=cfg.seed)
        result: dict = {"config": asdict(cfg), "rounds": rounds, "setup": setup, "machine": machine(),
                        "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
        for r in range(rounds):
            for variant in VARIANTS:
                _say(f"round {r + 1}/{rounds}: {variant}")
                with ServerProcess(_argv(variant, release, data, work), work / f"server-{variant}-{r}.log") as srv:
                    if variant == "shadow100":
                        _start_shadow(srv, shadow)
                    run_ = {"round": r, "variant": variant}
                    if cfg.warmup_seconds:
                        _measure(srv, user_ids, cfg, cfg.fixed_qps / 2, cfg.warmup_seconds)
                    run_["fixed"] = _measure(srv, user_ids, cfg, cfg.fixed_qps, cfg.fixed_seconds)
                    cap, steps = capacity_search(lambda q: _measure(srv, user_ids, cfg, q, cfg.step_seconds), cfg)
                    run_["capacity_qps"] = cap
                    run_["capacity_steps"] = [asdict(s) for s in steps]
                result["runs"].append(run_)
                write_json(out, result)
        result["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_json(out, result)
        return result
    finally:
        if tmp:
            tmp.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.change_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/change_overhead.json")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a short smoke run (figures not for RESULTS.md)")
    p.add_argument("--work", default=None)
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    cfg = ServingBenchConfig.quick() if a.quick else replace(ServingBenchConfig(), bisect_steps=2)
    run(Path(a.out), cfg, a.rounds, Path(a.work) if a.work else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
