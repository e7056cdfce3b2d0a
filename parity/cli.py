"""The `parity` command: data, features (and, in later issues, train, serve, export).

Every subcommand validates its arguments up front and reports a bad value with the option
that carried it; domain errors (a missing data dir, an unreachable store) print one line
`parity: error: ...` and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from features.online.base import StoreUnavailable
from parity.argtypes import nonneg, positive

__all__ = ["main", "build_parser"]


_positive, _nonneg = positive, nonneg  # the register() functions receive these


def build_parser() -> argparse.ArgumentParser:
    from parity import cli_bench, cli_data, cli_features, cli_models, cli_serve

    p = argparse.ArgumentParser(prog="parity", description="Parity: features, models and serving that never disagree with themselves.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_data.register(sub, _positive, _nonneg)
    cli_features.register(sub, _positive, _nonneg)
    cli_models.register(sub, _positive, _nonneg)
    cli_serve.register(sub, _positive, _nonneg)
    cli_bench.register(sub, _positive, _nonneg)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, StoreUnavailable) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"parity: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def print_json(obj: object) -> None:
    print(json.dumps(obj, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
