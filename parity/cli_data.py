"""`parity data ...`: make an event log (simulated) or import one (MovieLens)."""
from __future__ import annotations

import argparse
import time


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
    s.set_defaults(func=_simulate)
    m = data.add_parser("import-movielens", help="import MovieLens 100K as an event log (ratings with their real timestamps)")
    m.add_argument("path", help="the ml-100k folder (u.data, u.item, u.user)")
    m.add_argument("--out", required=True, help="new data dir to create")
    m.set_defaults(func=_import_movielens)


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
