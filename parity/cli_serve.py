"""`parity serve`: the gRPC recommendation server (server/app.py runs it). Argument parsing
lives here, not in server/, so the server package stays free of the command line."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from parity.argtypes import integer, number, share
from server.clock import CLOCK_MODES
from server.config import MATERIALIZE_MODES, RETRIEVAL_MODES, ServerConfig
from server.errors import ServingError

__all__ = ["register", "add_serve_arguments", "config_from_args", "run_from_args", "main"]


def register(sub: argparse._SubParsersAction, positive, nonneg) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a release over gRPC (Recommender, Admin, health, reflection, Prometheus metrics)",
        description="Serve a release: two-stage recommendations over gRPC with the online store's features. "
        "SIGTERM drains (health NOT_SERVING, requests in flight finish) and exits 0.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=run_from_args)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", required=True, help="release folder to serve (see `parity releases list`)")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder): feature definitions, item catalogue, event log")
    p.add_argument("--port", type=integer("--port", 0), default=50051, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--store", default="memory", help="online store: memory or redis://HOST:PORT/DB (default memory, filled from --events)")
    p.add_argument("--namespace", default="parity", help="key namespace in the store (default parity)")
    p.add_argument("--metrics-port", type=integer("--metrics-port", 0), default=9100, help="Prometheus /metrics port (default 9100; 0: off)")
    p.add_argument("--metrics-host", default=None, help="address the metrics endpoint binds (default: the same as --host)")
    p.add_argument("--ops-port", type=integer("--ops-port", 0), default=None,
                   help="also serve health and Admin on this port, never shed by request floods (default: off; 0 picks one)")
    p.add_argument("--admin-token", default=None, help="bearer token for the Admin service (default: env PARITY_ADMIN_TOKEN; unset: Admin refused)")
    p.add_argument("--ingest-token", default=None,
                   help="bearer token for IngestEvents (default: env PARITY_INGEST_TOKEN, else the admin token; neither: ingest refused)")
    p.add_argument("--releases-root", default=None, help="LoadRelease loads only folders under this one (default: the folder holding --release)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain; with --tls-key the server speaks TLS only")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--clock", choices=CLOCK_MODES, default="auto",
                   help="event time to read features as of: wall, data (start at the log's end), auto (data when the log ended > 1 day ago)")
    p.add_argument("--materialize", choices=MATERIALIZE_MODES, default="auto",
                   help="fill the store from the event log at start-up: auto (memory store, or a store never materialised), always, never")
    p.add_argument("--modes", type=_modes, default="",
                   help="how feature sets are kept online, saved to the store for every worker: SET=MODE,... with MODE streaming, "
                        "materialized:EVERY (e.g. 15m; runs come from `parity features materialize --every`) or on_read[:cap=N]")
    p.add_argument("--drain-notice", type=number("--drain-notice", what="a number of seconds"), default=0.0, help="on SIGTERM, seconds of NOT_SERVING before refusing RPCs (default 0)")
    p.add_argument("--drain-grace", type=number("--drain-grace", what="a number of seconds"), default=10.0, help="seconds to wait for RPCs in flight when stopping (default 10)")
    p.add_argument("--ranker", default="student_int8",
                   help="ranker of the release: student_int8 (default), student_fp32 or teacher_fp32 (ONNX Runtime)")
    p.add_argument("--retrieval", choices=RETRIEVAL_MODES, default="ann", help="candidate retrieval: ann (the release's ScaNN index, default) or exact (numpy)")
    p.add_argument("--core-pending", default=None, metavar="SOFT,HARD",
                   help="calls gRPC may hold before Python picks them up: none dropped up to SOFT, all past HARD (default 24,48; see README)")
    p.add_argument("--serve-concurrency", type=integer("--serve-concurrency", 0), default=0,
                   help="Recommend/Rank requests in service at once (default 0: 1 on the memory store, 16 on Redis)")
    p.add_argument("--max-queue-wait-ms", type=number("--max-queue-wait-ms", what="a number of milliseconds"), default=None,
                   help="the longest a request waits for a slot before it is refused with RESOURCE_EXHAUSTED (default 20)")
    p.add_argument("--served-log", default=None, metavar="DIR",
                   help="write the served log here (Parquet: request, user, release, arm, ranker inputs, items, scores, latency; "
                        "read by `parity monitor`); default: off")
    p.add_argument("--log-sample", type=share("--log-sample"), default=0.1,
                   help="share of OK answers the served log keeps (default 0.1; errors and degraded answers are always kept)")
    p.add_argument("--drift-interval", type=number("--drift-interval", what="a number of seconds"), default=60.0,
                   help="how often the live drift window is tested and its gauges updated (default 60; 0: no live drift watch)")
    p.add_argument("--no-caches", action="store_true", help="turn off the response cache, the user-feature cache and the shared item frame (baseline)")
    p.add_argument("--workers", type=integer("--workers", 1), default=1,
                   help="server processes sharing the port (SO_REUSEPORT), one per core; worker i serves metrics on --metrics-port + i; "
                        "rollouts and LoadRelease reach every worker through a shared (redis) store (default 1)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set by the supervisor for its workers
    p.add_argument("--worker-index", type=integer("--worker-index", 0), default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    token = args.admin_token if args.admin_token is not None else os.environ.get("PARITY_ADMIN_TOKEN") or None
    ingest = args.ingest_token if args.ingest_token is not None else os.environ.get("PARITY_INGEST_TOKEN") or None
    return ServerConfig(
        release=Path(args.release), data_dir=Path(args.events), host=args.host, port=args.port, store=args.store, namespace=args.namespace,
        metrics_port=args.metrics_port or None, metrics_host=args.metrics_host, ops_port=args.ops_port, ingest_token=ingest,
        releases_root=Path(args.releases_root) if args.releases_root else None, admin_token=token, tls_cert=args.tls_cert, tls_key=args.tls_key, clock=args.clock,
        materialize=args.materialize, modes=args.modes, drain_notice_s=args.drain_notice, drain_grace_s=args.drain_grace,
        ranker=args.ranker, retrieval=args.retrieval, served_log=Path(args.served_log) if args.served_log else None,
        log_sample=args.log_sample, reuse_port=args.reuse_port, worker_index=args.worker_index, drift_interval_s=args.drift_interval, serve_max_running=args.serve_concurrency, **_core_pending(args.core_pending),
        **({"serve_max_wait_s": args.max_queue_wait_ms / 1000.0} if args.max_queue_wait_ms is not None else {}),
        **({"response_cache_ttl_s": 0.0, "feature_cache_ttl_s": 0.0, "item_frame_cache": False} if args.no_caches else {}),
    )


def _core_pending(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        soft, hard = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--core-pending must be SOFT,HARD (two integers), got {text!r}") from None
    return {"core_pending_soft": soft, "core_pending_hard": hard}


def run_from_args(args: argparse.Namespace) -> int:
    """Start-up errors (a missing data dir, a refused release, a bad flag) print one line and return 2."""
    try:
        cfg = config_from_args(args)
        for f in (cfg.tls_cert, cfg.tls_key):
            if f is not None and not Path(f).is_file():
                raise FileNotFoundError(f"TLS file {f} does not exist")
        if args.workers > 1:
            return _run_fleet(args, cfg)
        from server.app import serve

        return asyncio.run(serve(cfg))
    except (ServingError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"parity serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def worker_argv(args: argparse.Namespace, **overrides) -> list[str]:
    """`parity serve` arguments that rebuild `args` (with `overrides` by dest) for a worker."""
    p = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(p)
    values = {**vars(args), **overrides}
    out = [sys.executable, "-m", "parity", *(["-v"] if values.get("verbose") else []), "serve"]
    for a in p._actions:
        if not a.option_strings or a.dest == "workers":
            continue
        v = values.get(a.dest)
        if isinstance(a, argparse._StoreTrueAction):
            out += [a.option_strings[-1]] if v else []
        elif v is not None and v != "":
            out += [a.option_strings[-1], str(v)]
    return out


def _run_fleet(args: argparse.Namespace, cfg: ServerConfig) -> int:
    """The supervisor of `--workers N` (server/workers.py)."""
    import time

    from server.workers import reserve_port, run_fleet

    def reserve(port: int, flag: str):
        try:
            return reserve_port(cfg.host, port)
        except OSError as exc:
            raise OSError(f"cannot listen on {cfg.host}:{port} ({flag}; in use?): {exc.strerror or exc}") from None

    reserved = [reserve(cfg.port, "--port")]
    port = reserved[0].getsockname()[1]
    ops = None
    if cfg.ops_port is not None:
        reserved.append(reserve(cfg.ops_port, "--ops-port"))
        ops = reserved[-1].getsockname()[1]
    if cfg.store == "memory":
        print(f"parity serve: warning: {args.workers} workers on the memory store share nothing: each fills its own store from the "
              "event log, and IngestEvents, rollouts and LoadRelease reach only the worker that receives them (use --store redis://...)",
              file=sys.stderr)
    else:
        try:
            _declare_primary(cfg, int(time.time() * 1000))
        except Exception as exc:  # noqa: BLE001 - a store down at start: workers serve --release and follow the store once it is back
            print(f"parity serve: warning: could not record {cfg.release} as the fleet's primary in the store ({exc})", file=sys.stderr)
    base = cfg.metrics_port

    def argv_for(i: int) -> list[str]:
        return worker_argv(args, port=port, ops_port=ops, metrics_port=(base + i) if base else 0, reuse_port=True, worker_index=i)

    def announce(pids: list[int]) -> None:
        metrics = f"; metrics on ports {base}-{base + args.workers - 1}" if base else ""
        print(f"parity serve: {args.workers} workers on {cfg.host}:{port} (pids {', '.join(map(str, pids))}){metrics}", file=sys.stderr, flush=True)

    return run_fleet(argv_for, args.workers, reserved, kill_after_s=cfg.drain_notice_s + cfg.drain_grace_s + 30.0, announce=announce)


def _declare_primary(cfg: ServerConfig, now_ms: int) -> None:
    """The fleet's --release becomes the primary in the shared rollout state, so every worker (and
    one restarted later) serves it rather than what an earlier fleet left there."""
    from features.online import open_store
    from server.rollout import RolloutStore
    from server.state import release_ref

    ref = release_ref(str(cfg.release), cfg.releases_dir)
    store = open_store(cfg.store, namespace=cfg.namespace)
    try:
        rollouts = RolloutStore(store)
        if rollouts.load().primary != ref:
            rollouts.update(lambda cur: cur.serve(ref, now_ms))
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="parity serve", description="Serve a Parity release over gRPC.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    add_serve_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())


def _modes(text: str) -> str:
    """--modes: the syntax is checked here, the set names when the data dir is read."""
    import argparse

    from features.modes import parse_overrides

    if not text.strip():
        return ""  # argparse runs the default through here too
    try:
        parse_overrides(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
