"""`parity data ...`: make an event log (simulated) or import one (MovieLens)."""
from __future__ import annotations

import argparse
import time

from parity.output import Output
from parity.workspace import existing_data_dir


def register(sub: argparse._SubParsersAction, positive, nonneg) -> None:
    data = sub.add_parser("data", help="create or import event data").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = data.add_parser(
        "simulate",
        help="generate a synthetic video platform (deterministic from --seed)",
        description="Users with topic tastes, items that keep arriving, sessions of impressions, plays, likes and skips, "
        "popularity that rises and decays, and a topic-trend shift over the last days.",
    )
    s.add_argument("--out", required=True, help="new data dir to create")
    s.add_argument("--users", type=positive("--users"), default=2000, help="number of users (default 2000)")
    s.add_argument("--items", type=positive("--items"), default=500, help="items at the start; more arrive daily (default 500)")
    s.add_argument("--days", type=positive("--days"), default=14, help="days simulated (default 14)")
    s.add_argument("--seed", type=nonneg("--seed"), default=0, help="random seed: same seed, same data (default 0)")
    s.set_defaults(func=_simulate, outputs=lambda a: [Output.of(a.out)])
    m = data.add_parser("import-movielens", help="import MovieLens 100K as an event log (ratings with their real timestamps)")
    m.add_argument("path", help="the ml-100k folder (u.data, u.item, u.user)")
    m.add_argument("--out", required=True, help="new data dir to create")
    m.set_defaults(func=_import_movielens, outputs=lambda a: [Output.of(a.out)])
    c = data.add_parser(
        "check",
        help="verify every event-log part against its checksum; optionally repair or quarantine",
        description="Hashes every part of the event log and compares it with its .sha256 checksum file. Lists what is "
        "wrong, one line each, then a JSON summary; exit 1 if a corrupt part (or, in a checksummed log, a part without "
        "a checksum) remains. --repair records missing checksums of parts that read in full (an old log becomes a "
        "checksummed one), settles checksums left by an interrupted erasure, removes orphan checksum and temp files; "
        "it never re-checksums a corrupt part. --quarantine moves corrupt parts out of the log (their events are lost "
        "to readers; restoring from a backup keeps them).",
    )
    c.add_argument("--events", required=True, help="data dir (or its events/ folder)")
    c.add_argument("--repair", action="store_true", help="add missing checksums, settle interrupted ones, remove leftovers")
    c.add_argument("--quarantine", action="store_true", help="move corrupt parts to EVENTS/_quarantine/ so the log reads again")
    c.set_defaults(func=_check, outputs=_check_outputs)


def _report(info, out: str, seconds: float) -> None:
    days = (info.end_ts - info.start_ts) / 86_400_000
    print(f"wrote {out}: {info.n_events} events, {info.n_users} users, {info.n_items} items, {info.n_topics} topics, {days:.1f} days ({seconds:.1f} s)")


def _simulate(args: argparse.Namespace) -> int:
    from features.simulator import simulate

    t = time.perf_counter()
    info = simulate(args.out, users=args.users, items=args.items, days=args.days, seed=args.seed)
    _report(info, args.out, time.perf_counter() - t)
    return 0


def _import_movielens(args: argparse.Namespace) -> int:
    from features.movielens import import_movielens

    t = time.perf_counter()
    info = import_movielens(args.path, args.out)
    _report(info, args.out, time.perf_counter() - t)
    return 0


def _check_outputs(args: argparse.Namespace) -> list[Output]:
    d = existing_data_dir(args.events) if (args.repair or args.quarantine) else None
    return [Output.of(d / "events")] if d is not None else []


def _check(args: argparse.Namespace) -> int:
    import json

    from features.logcheck import check_log
    from parity.workspace import open_workspace

    log = open_workspace(args.events).log
    if not log.exists():
        raise ValueError(f"{log.root} holds no event-log partitions; nothing to check")
    rep = check_log(log, repair=args.repair, quarantine=args.quarantine)
    for f in rep.findings:
        print(f"{f.kind.upper()} {f.path.relative_to(rep.root)}: {f.detail}" + (f" -> {f.action}" if f.action else ""))
    state = "checksummed" if rep.requires_checksums else "old format: parts without a checksum are accepted (--repair adds them)"
    print(f"{rep.parts} parts hashed in {rep.seconds * 1000:.0f} ms: {rep.verified} match their checksum, {len(rep.errors)} errors; log {state}")
    print(json.dumps(rep.summary(), sort_keys=True))
    return 0 if rep.ok else 1
