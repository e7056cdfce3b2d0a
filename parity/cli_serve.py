"""`parity serve`: the gRPC recommendation server (see server/app.py for what it runs)."""
from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction, positive, nonneg) -> None:
    from server.app import add_serve_arguments

    p = sub.add_parser(
        "serve",
        help="serve a release over gRPC (Recommender, Admin, health, reflection, Prometheus metrics)",
        description="Serve a release: two-stage recommendations over gRPC with the online store's features. "
        "SIGTERM drains (health NOT_SERVING, requests in flight finish) and exits 0.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from server.app import run_from_args

    return run_from_args(args)
