"""`parity backtest`: what stale, missing and slow feature reads cost a release, on the held-out
slice `parity eval` scores, through the server's own path (backtest/).

Prints a table of every condition and the per-set tolerance, then one JSON line (its schema:
backtest/report.py). Exit 0; 2 for bad input, with the option that carried it.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

from parity.argtypes import number
from parity.cli_monitor_drift import parse_duration
from parity.output import Output

__all__ = ["register", "share_list", "staleness_list"]

log = logging.getLogger(__name__)

DEFAULT_STALENESS = "0,1m,15m,1h,6h,1d"
DEFAULT_MISSING = "0,0.05,0.2"


def staleness_list(name: str) -> Callable[[str], list[int]]:
    """Comma-separated durations ('0', '90s', '15m', '1h', '1d' or milliseconds), >= 0."""
    one = parse_duration(name)

    def parse(text: str) -> list[int]:
        out = []
        for part in text.split(","):
            p = part.strip()
            if not p:
                raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list of durations like 0,1m,1h,1d, got {text!r}")
            out.append(0 if p == "0" else one(p))
        return sorted(set(out))

    return parse


def share_list(name: str) -> Callable[[str], list[float]]:
    """Comma-separated shares in [0, 1]."""
    def parse(text: str) -> list[float]:
        out = []
        for part in text.split(","):
            try:
                v = float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list of shares between 0 and 1, got {part.strip()!r}") from None
            if not 0.0 <= v <= 1.0:  # NaN fails this too
                raise argparse.ArgumentTypeError(f"{name} must be shares between 0 and 1, got {part.strip()}")
            out.append(v)
        return sorted(set(out))

    return parse


def _latency_option(text: str) -> tuple[float, float] | Path:
    """'p50,p99' in ms, or a file of observed latencies (checked when the command starts)."""
    from backtest.latency import parse_quantiles

    q = parse_quantiles(text)
    if q is not None:
        p50, p99 = q
        if not (0 < p50 <= p99 < float("inf")):
            raise argparse.ArgumentTypeError(f"--lookup-latency p50,p99 needs 0 < p50 <= p99 (ms), got {text!r}")
        return q
    if "," in text:
        raise argparse.ArgumentTypeError(f"--lookup-latency must be a file of latencies (ms, one per line) or 'p50,p99' in ms, got {text!r}")
    return Path(text)


def register(sub: argparse._SubParsersAction, positive: Callable, nonneg: Callable) -> None:
    p = sub.add_parser(
        "backtest", help="price stale, missing and slow feature reads on the held-out slice (last line: JSON)",
        description="Replays the held-out requests `parity eval` scores through the server's own path (read policy, "
        "record decoding, retrieval, ranking) with each feature set's records as of t - staleness (read at t), with "
        "records dropped at random, and with store reads that miss their budget served as the server serves them. One "
        "set varies at a time, then all together. Reports NDCG@10, recall@10 and AUC per condition and, per set, the "
        "largest staleness and missing rate within 1 % of the fresh NDCG@10. Last line: JSON.")
    p.add_argument("--release", required=True, help="release folder")
    p.add_argument("--events", required=True, help="data dir the release was trained on (or its events/ folder)")
    p.add_argument("--staleness", type=staleness_list("--staleness"), default=staleness_list("--staleness")(DEFAULT_STALENESS),
                   help=f"staleness levels, comma-separated (default {DEFAULT_STALENESS})")
    p.add_argument("--missing", type=share_list("--missing"), default=share_list("--missing")(DEFAULT_MISSING),
                   help=f"shares of records dropped, comma-separated (default {DEFAULT_MISSING})")
    p.add_argument("--lookup-latency", type=_latency_option, default=None, metavar="FILE|P50,P99",
                   help="store read latency: a file of observed latencies in ms (one per line) or 'p50,p99' in ms (a lognormal); needs --budget-ms")
    p.add_argument("--budget-ms", type=number("--budget-ms", strictly_positive=True), default=None,
                   help="the store budget a read must answer within (the server's store_budget_s; a slower read counts as missing)")
    p.add_argument("--sets", default=None,
                   help="comma-separated targets to vary one at a time (default: every set the release reads, and user_seen)")
    p.add_argument("--max-users", type=positive("--max-users"), default=None, help="a seeded sample of held-out users (the same as parity eval --max-users)")
    p.add_argument("--seed", type=nonneg("--seed"), default=0, help="seed of the user sample and of the dropped records (default 0)")
    p.add_argument("--creator-cap", type=nonneg("--creator-cap"), default=0,
                   help="the server's per-creator cap in the answer (default 0, as parity eval ranks; the server ships with 3)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a PNG of NDCG@10 against staleness (and missing rate), one line per set")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the JSON to this file")
    p.set_defaults(func=_backtest, outputs=lambda a: [Output.of(x, "file") for x in (a.plot, a.json) if x])


def _targets(text: str | None, available: tuple[str, ...]) -> list[str]:
    if text is None:
        return list(available)
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError("--sets: name at least one set")
    bad = [n for n in names if n not in available]
    if bad:
        raise ValueError(f"--sets: {', '.join(repr(b) for b in bad)} not read by this release; choose from {', '.join(available)}")
    return list(dict.fromkeys(names))


def _backtest(args: argparse.Namespace) -> int:
    from backtest.conditions import grid
    from backtest.latency import LatencyModel
    from backtest.replay import Replay
    from backtest.report import (
        MissingExtra,
        plot,
        render_table,
        require_matplotlib,
        to_json,
    )
    from parity.workspace import open_workspace
    from server.errors import ServingError

    if (args.lookup_latency is None) != (args.budget_ms is None):
        raise ValueError("--lookup-latency and --budget-ms go together: a latency needs a budget to miss, a budget a latency to be missed")
    latency = None
    if isinstance(args.lookup_latency, tuple):
        latency = LatencyModel.lognormal(*args.lookup_latency)
    elif args.lookup_latency is not None:
        path = args.lookup_latency
        if not path.is_file():
            raise ValueError(f"--lookup-latency {path}: no such file (give a file of latencies in ms, one per line, or 'p50,p99')")
        try:
            latency = LatencyModel.from_file(path)
        except ValueError as exc:
            raise ValueError(f"--lookup-latency {exc}") from None
    if args.plot:
        try:
            require_matplotlib()  # before the run: a missing extra should not cost it
        except MissingExtra as exc:
            raise ValueError(f"--plot: {exc}") from None
    if not Path(args.release).is_dir():
        raise ValueError(f"--release {args.release}: no such release folder")
    ws = open_workspace(args.events)
    try:
        replay = Replay(args.release, ws.data_dir, max_users=args.max_users, seed=args.seed, per_creator_cap=args.creator_cap,
                        budget_ms=args.budget_ms, latency=latency)
    except ServingError as exc:  # the server's own refusal (a skewed or broken release)
        raise ValueError(f"--release: {exc}") from None
    targets = _targets(args.sets, replay.targets)
    conditions = grid(targets, args.staleness, args.missing, latency=latency is not None)
    log.info("backtest: %d held-out requests x %d conditions", len(replay.heldout), len(conditions))
    res = replay.run(conditions, progress=lambda n, total: log.info("backtest: %d/%d requests", n, total) if n % 200 == 0 else None)
    out = to_json(res, seed=args.seed, ranker=replay.cfg.ranker)
    print(render_table(res))
    if args.plot:
        plot(res, args.plot)
        print(f"plot: {args.plot}")
    text = json.dumps(out, sort_keys=True, allow_nan=False)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0
