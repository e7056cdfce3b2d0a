"""`parity monitor`: checks that read the served log (skew against the batch path, drift
against the release's reference). Each check registers its own subcommand from its module."""
from __future__ import annotations

import argparse
from typing import Callable

from parity import cli_monitor_drift, cli_monitor_skew

__all__ = ["register"]


def register(sub: argparse._SubParsersAction, positive: Callable, nonneg: Callable) -> None:
    p = sub.add_parser("monitor", help="check what the server served: skew against the batch path, drift against the release")
    msub = p.add_subparsers(dest="monitor_command", required=True, metavar="CHECK")
    # one line per check module (each owns its arguments and its output)
    cli_monitor_drift.register(msub, positive, nonneg)
    cli_monitor_skew.register(msub, positive, nonneg)
