"""`parity bench latency`: the open-loop latency harness (bench/latency.py) against a running server.

    parity bench latency --target 127.0.0.1:50051 --qps 100 --seconds 10 --events DATA_DIR

Prints a short table, then as its LAST line one JSON object:
{"qps": .., "p50_ms": .., "p99_ms": .., "errors": .., ...}. Loopback targets only.
"""
from __future__ import annotations

import argparse
import json
import sys

from parity.argtypes import number
from parity.output import Output

__all__ = ["register"]


def _share(text: str) -> tuple[float, float, float]:
    parts = text.split("/")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 0 or sum(vals) <= 0:
        raise argparse.ArgumentTypeError(f"--mix must be KNOWN/NEW/HEAVY shares such as 70/10/20, got {text!r}")
    return vals  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction, positive, nonneg) -> None:
    p = sub.add_parser("bench", help="load and latency measurements against a running server (loopback only)",
                       description="Measure a running Parity server from this machine.")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    lat = bsub.add_parser(
        "latency",
        help="open-loop Recommend latency at a fixed arrival rate (no coordinated omission)",
        description="Send Recommend requests at a fixed rate (request i due at t0 + i/qps, never waiting for earlier ones) "
        "over one gRPC channel and report latency percentiles measured from each request's intended send time. "
        "The last line printed is JSON.",
    )
    lat.add_argument("--target", required=True, help="HOST:PORT of the server; 127.0.0.0/8, localhost or ::1 only")
    lat.add_argument("--qps", type=number("--qps", strictly_positive=True), required=True, help="offered rate, requests per second")
    lat.add_argument("--seconds", type=number("--seconds", strictly_positive=True), required=True, help="how long to offer it")
    lat.add_argument("--events", default=None, help="data dir the server serves: user ids are drawn from it (default: synthetic ids 0..999)")
    lat.add_argument("--k", type=positive("--k"), default=10, help="items per request (default 10)")
    lat.add_argument("--mix", type=_share, default=(70.0, 10.0, 20.0), help="known/new/heavy user shares (default 70/10/20)")
    lat.add_argument("--timeout", type=number("--timeout", strictly_positive=True), default=1.0, help="deadline of each request in seconds (default 1)")
    lat.add_argument("--concurrency-cap", type=positive("--concurrency-cap"), default=1000,
                     help="most requests in flight; a due request beyond it is not sent and counts as an error (default 1000)")
    lat.add_argument("--warmup", type=nonneg("--warmup"), default=20, help="requests sent one by one first, not counted (default 20)")
    lat.add_argument("--seed", type=nonneg("--seed"), default=0, help="seed of the user id draw (default 0)")
    lat.add_argument("--out", default=None, help="also write the JSON summary (with every latency) to this file")
    lat.set_defaults(func=_latency, outputs=lambda a: [Output.of(a.out, "file")] if a.out else [])


def _latency(args: argparse.Namespace) -> int:
    from bench.latency import UserMix, check_loopback, run_latency

    try:
        check_loopback(args.target)
        mix = UserMix.from_data_dir(args.events, shares=args.mix) if args.events else UserMix.synthetic(shares=args.mix)
        n = max(1, int(round(args.qps * args.seconds)))
        rep = run_latency(args.target, args.qps, args.seconds, user_ids=mix.sample(min(n, 100_000), seed=args.seed), k=args.k,
                          timeout_s=args.timeout, concurrency_cap=args.concurrency_cap, warmup=args.warmup)
    except (ValueError, FileNotFoundError, ConnectionError, OSError) as exc:
        print(f"parity bench latency: error: {exc}", file=sys.stderr)
        return 2
    summary = rep.summary()
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps({**summary, "latencies_ms": list(rep.latencies_ms)}) + "\n", encoding="utf-8")
    print(rep.table())
    print(json.dumps(summary, sort_keys=True))
    return 0
