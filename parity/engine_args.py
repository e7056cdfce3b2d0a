"""`--engine local|ray [--address ADDR]`: where a command's batch path runs (features.engines).

One definition for every command that takes it (`parity features materialize`, `parity train`),
so the flags, their help and their errors read the same: `--address` without `--engine ray` is
an error, and `--engine ray` without Ray installed exits with a message naming `--engine` and
the extra to install."""
from __future__ import annotations

import argparse

from features.engines import ENGINES, EngineUnavailable, open_engine

__all__ = ["add_engine_args", "engine_from_args"]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="where the batch path runs: local (this process, the default) or ray (partitions of the event log by "
                        "entity hash on Ray workers; the same results)")
    p.add_argument("--address", default=None,
                   help="with --engine ray: join this running Ray cluster (e.g. HOST:6379); default: start a local one")


def engine_from_args(args: argparse.Namespace, prog: str):
    """The engine the flags ask for, opened (close it, or use it as a context); SystemExit(2) on a bad combination."""
    if args.address is not None and args.engine != "ray":
        raise SystemExit(f"{prog}: error: --address needs --engine ray")
    try:
        return open_engine(args.engine, args.address)
    except EngineUnavailable as exc:
        raise SystemExit(f"{prog}: error: --engine ray: {exc}") from None
