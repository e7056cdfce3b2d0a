"""The gRPC server process: grpc.aio with the Recommender and Admin services, standard health
(grpc.health.v1) and reflection (so grpc_health_probe and grpcurl work), Prometheus metrics,
TLS when a certificate and key are given, and a graceful drain on SIGTERM / SIGINT:

  health → NOT_SERVING (still answering for `drain_notice_s`, so load balancers move away)
  → stop accepting RPCs → wait up to `drain_grace_s` for RPCs in flight → exit 0.

Run it as `parity serve ...` or `python -m server.app ...` (same options).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from parity.argtypes import integer, number
from server.admin import AdminServicer
from server.bootstrap import build_service
from server.clock import CLOCK_MODES
from server.config import MATERIALIZE_MODES, RETRIEVAL_MODES, ServerConfig
from server.errors import ServingError
from server.service import RecommenderService
from server.servicer import Handler, RecommenderServicer

__all__ = ["ParityServer", "BackgroundServer", "serve", "main", "add_serve_arguments", "config_from_args", "SERVICE_NAMES"]

log = logging.getLogger(__name__)

SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["Recommender"].full_name, pb.DESCRIPTOR.services_by_name["Admin"].full_name)


class ParityServer:
    """One grpc.aio server around a RecommenderService. Create, then `await start()` in a loop."""

    def __init__(self, cfg: ServerConfig, service: RecommenderService) -> None:
        self.cfg = cfg
        self.service = service
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        cfg = self.cfg
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 16 << 20)],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        handler = Handler(self.service.metrics)
        pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(self.service, handler), server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(self.service, handler, cfg.admin_token), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_cert is not None:
                creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a port in use this way
            raise OSError(f"cannot listen on {address} (in use?): {exc}") from None
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        if cfg.metrics_port:
            try:
                self.metrics_port = self.service.metrics.serve(cfg.metrics_port, cfg.metrics_host)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port} (--metrics-port): {exc}") from None
        await self.service.start()
        await server.start()
        self._server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s:%d (%s)%s", cfg.host, self.port, "TLS" if cfg.tls_cert else "plaintext",
                 f", metrics on :{self.metrics_port}" if self.metrics_port else "")
        return self.port

    def request_stop(self) -> None:
        """Begin the drain (idempotent); safe to call from a signal handler on the loop."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.stop())

    async def stop(self) -> None:
        if self._server is None:
            self._stopped.set()
            return
        log.info("draining: health NOT_SERVING, %.1f s notice, then up to %.1f s for requests in flight", self.cfg.drain_notice_s, self.cfg.drain_grace_s)
        self.service.serving = False
        await self.health.enter_graceful_shutdown()
        if self.cfg.drain_notice_s:
            await asyncio.sleep(self.cfg.drain_notice_s)
        await self._server.stop(self.cfg.drain_grace_s)
        await self.service.close()
        self.service.metrics.close()
        self._server = None
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(cfg: ServerConfig, *, on_ready: Callable[[ParityServer], None] | None = None, service: RecommenderService | None = None) -> int:
    """Build, start and run until SIGTERM/SIGINT (or `request_stop`), then drain. Returns 0."""
    service = service or build_service(cfg)
    srv = ParityServer(service.cfg, service)
    await srv.start()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, srv.request_stop)
    if on_ready is not None:
        on_ready(srv)
    await srv.wait_stopped()
    return 0


class BackgroundServer:
    """A server on its own event loop in a daemon thread (tests, notebooks, the demo).

    with BackgroundServer(cfg) as s: RecommenderClient(f"127.0.0.1:{s.port}") ...
    """

    def __init__(self, cfg: ServerConfig, service: RecommenderService | None = None) -> None:
        self.cfg = cfg
        self._service = service
        self.server: ParityServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="parity-server", daemon=True)

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port

    @property
    def service(self) -> RecommenderService:
        assert self.server is not None
        return self.server.service

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(serve(self.cfg, on_ready=self._on_ready, service=self._service))
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def _on_ready(self, srv: ParityServer) -> None:
        self.server = srv
        self._ready.set()

    def start(self, timeout_s: float = 120.0) -> "BackgroundServer":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"server did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def run(self, coro, timeout_s: float = 60.0):
        """Run a coroutine on the server's loop from another thread and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.server is not None and self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.request_stop)
        self._thread.join(timeout_s)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- command line ------------------------------------------------------------------------------
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release", required=True, help="release folder to serve (see `parity releases list`)")
    p.add_argument("--events", required=True, help="data dir (or its events/ folder): feature definitions, item catalogue, event log")
    p.add_argument("--port", type=integer("--port", 0), default=50051, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--store", default="memory", help="online store: memory or redis://HOST:PORT/DB (default memory, filled from --events)")
    p.add_argument("--namespace", default="parity", help="key namespace in the store (default parity)")
    p.add_argument("--metrics-port", type=integer("--metrics-port", 0), default=9100, help="Prometheus /metrics port (default 9100; 0: off)")
    p.add_argument("--admin-token", default=None, help="bearer token for the Admin service (default: env PARITY_ADMIN_TOKEN; unset: Admin refused)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain; with --tls-key the server speaks TLS only")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--clock", choices=CLOCK_MODES, default="auto",
                   help="event time to read features as of: wall, data (start at the log's end), auto (data when the log ended > 1 day ago)")
    p.add_argument("--materialize", choices=MATERIALIZE_MODES, default="auto",
                   help="fill the store from the event log at start-up: auto (memory store, or a store never materialised), always, never")
    p.add_argument("--drain-notice", type=number("--drain-notice", what="a number of seconds"), default=0.0, help="on SIGTERM, seconds of NOT_SERVING before refusing RPCs (default 0)")
    p.add_argument("--drain-grace", type=number("--drain-grace", what="a number of seconds"), default=10.0, help="seconds to wait for RPCs in flight when stopping (default 10)")
    p.add_argument("--ranker", default="student_int8",
                   help="ranker of the release: student_int8 (default), student_fp32 or teacher_fp32 (ONNX Runtime)")
    p.add_argument("--retrieval", choices=RETRIEVAL_MODES, default="ann", help="candidate retrieval: ann (the release's ScaNN index, default) or exact (numpy)")
    p.add_argument("--no-caches", action="store_true", help="turn off the response cache, the user-feature cache and the shared item frame (baseline)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    token = args.admin_token if args.admin_token is not None else os.environ.get("PARITY_ADMIN_TOKEN") or None
    return ServerConfig(
        release=Path(args.release), data_dir=Path(args.events), host=args.host, port=args.port, store=args.store, namespace=args.namespace,
        metrics_port=args.metrics_port or None, admin_token=token, tls_cert=args.tls_cert, tls_key=args.tls_key, clock=args.clock,
        materialize=args.materialize, drain_notice_s=args.drain_notice, drain_grace_s=args.drain_grace,
        ranker=args.ranker, retrieval=args.retrieval,
        **({"response_cache_ttl_s": 0.0, "feature_cache_ttl_s": 0.0, "item_frame_cache": False} if args.no_caches else {}),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Start-up errors (a missing data dir, a refused release, a bad flag) print one line and return 2."""
    try:
        cfg = config_from_args(args)
        for f in (cfg.tls_cert, cfg.tls_key):
            if f is not None and not Path(f).is_file():
                raise FileNotFoundError(f"TLS file {f} does not exist")
        return asyncio.run(serve(cfg))
    except (ServingError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"parity serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.app", description="Serve a Parity release over gRPC.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    add_serve_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
