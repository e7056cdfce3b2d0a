"""The `parity` command: data, features (and, in later issues, train, serve, export).

Every subcommand validates its arguments up front and reports a bad value with the option
that carried it; domain errors (a missing data dir, an unreachable store) print one line
`parity: error: ...` and exit 2, never a traceback. A subcommand that writes declares its
outputs (parity.output): they are checked before it starts, and a filesystem refusal prints
`parity: error: cannot write PATH: REASON` and exits 1, as does any other OSError (one line).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from features.online.base import StoreUnavailable
from parity.argtypes import nonneg, positive
from parity.output import CannotWrite, Output, cannot_write, preflight

__all__ = ["main", "build_parser"]


_positive, _nonneg = positive, nonneg  # the register() functions receive these


def build_parser() -> argparse.ArgumentParser:
    from parity import cli_backtest, cli_bench, cli_data, cli_export, cli_features, cli_models, cli_monitor, cli_privacy, cli_rollout, cli_serve

    p = argparse.ArgumentParser(prog="parity", description="Parity: features, models and serving that never disagree with themselves.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_data.register(sub, _positive, _nonneg)
    cli_features.register(sub, _positive, _nonneg)
    cli_models.register(sub, _positive, _nonneg)
    cli_serve.register(sub, _positive, _nonneg)
    cli_export.register(sub, _positive, _nonneg)
    cli_monitor.register(sub, _positive, _nonneg)
    cli_privacy.register(sub, _positive, _nonneg)
    cli_rollout.register(sub, _positive, _nonneg)
    cli_bench.register(sub, _positive, _nonneg)
    cli_backtest.register(sub, _positive, _nonneg)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    outputs: list[Output] = list(args.outputs(args)) if hasattr(args, "outputs") else []
    try:
        for out in outputs:
            preflight(out)
        return int(args.func(args) or 0)
    except CannotWrite as exc:
        print(f"parity: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (`parity ... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        refused = cannot_write(exc, outputs)
        if refused is not None:
            print(f"parity: error: {refused}", file=sys.stderr)
            return 1
        if isinstance(exc, (FileNotFoundError, FileExistsError)):
            print(f"parity: error: {exc}", file=sys.stderr)  # a missing input or a taken name: a domain error
            return 2
        print(f"parity: error: {exc}", file=sys.stderr)  # any other I/O failure: one line, not a traceback
        return 1
    except (ValueError, KeyError, StoreUnavailable) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"parity: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def print_json(obj: object) -> None:
    print(json.dumps(obj, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
