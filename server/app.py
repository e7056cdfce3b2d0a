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
import time
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from parity_api.v1 import recommender_pb2 as pb
from parity.argtypes import integer, number
from server.admin import AdminServicer
from server.admission import Admission, LaneLimits
from server.bootstrap import build_service
from server.clock import CLOCK_MODES
from server.config import MATERIALIZE_MODES, RETRIEVAL_MODES, ServerConfig
from server.errors import ServingError
from server.metrics import channelz_server_ids
from server.service import RecommenderService
from server.servicer import Handler, RecommenderServicer
from server.wire import add_servicer

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
        self.ops_port: int | None = None
        self.metrics_port: int | None = None
        self.admission: Admission | None = None
        self.recommender: RecommenderServicer | None = None
        self._server: grpc.aio.Server | None = None
        self._ops: grpc.aio.Server | None = None
        self._stopping: asyncio.Task | None = None
        self._stopped = asyncio.Event()

    def _admission(self) -> Admission:
        c = self.cfg
        m = self.service.metrics
        lanes = {
            "serve": LaneLimits(c.serve_concurrency, c.serve_max_queue, c.serve_max_wait_s),
            "features": LaneLimits(c.features_max_running, c.features_max_queue, c.features_max_wait_s),
            "admin": LaneLimits(c.admin_max_running, c.admin_max_queue, c.admin_max_wait_s, initial_service_s=0.0),
        }
        adm = Admission(lanes, on_outcome=m.on_admission, on_wait=m.on_queue_wait)
        m.watch_lanes(adm.lanes)
        return adm

    def _grpc_server(self, *, shed: bool) -> grpc.aio.Server:
        cfg = self.cfg
        options = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 16 << 20),
                   ("grpc.max_concurrent_streams", cfg.max_streams_per_connection)]
        if shed:  # C-core sheds calls Python has not picked up yet (server/admission.py)
            options += [("grpc.server.max_pending_requests", cfg.core_pending_soft),
                        ("grpc.server.max_pending_requests_hard_limit", cfg.core_pending_hard)]
        return grpc.aio.server(options=options)

    def _listen(self, server: grpc.aio.Server, port: int, what: str) -> int:
        cfg = self.cfg
        address = f"{cfg.host}:{port}"
        try:
            if cfg.tls_cert is not None:
                creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                bound = server.add_secure_port(address, creds)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a port in use this way
            raise OSError(f"cannot listen on {address} ({what}; in use?): {exc}") from None
        if not bound:
            raise OSError(f"cannot listen on {address} ({what})")
        return bound

    async def start(self) -> int:
        cfg = self.cfg
        self.admission = self._admission()
        handler = Handler(self.service.metrics, self.admission, max_deadline_s=cfg.max_deadline_s, default_deadline_s=cfg.default_deadline_s)
        self.recommender = RecommenderServicer(self.service, handler)
        admin = AdminServicer(self.service, handler, cfg.admin_token)
        before = channelz_server_ids()
        server = self._grpc_server(shed=True)
        self._channelz_ids = {"main": i for i in channelz_server_ids() - before}
        add_servicer(server, pb, "Recommender", self.recommender)
        add_servicer(server, pb, "Admin", admin)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = self._listen(server, cfg.port, "--port")
        ops = None
        if cfg.ops_port is not None:
            # Health and Admin on a port of their own: a flood of requests on the main port fills
            # the main server's pending queue, never this one's.
            before = channelz_server_ids()
            ops = self._grpc_server(shed=False)
            self._channelz_ids.update({"ops": i for i in channelz_server_ids() - before})
            add_servicer(ops, pb, "Admin", admin)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, ops)
            self.ops_port = self._listen(ops, cfg.ops_port, "--ops-port")
        if cfg.metrics_port:
            try:
                self.metrics_port = self.service.metrics.serve(cfg.metrics_port, cfg.metrics_bind)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {cfg.metrics_bind}:{cfg.metrics_port} (--metrics-port): {exc}") from None
        self.service.metrics.ingest_streams.set_function(lambda: sum(self.recommender.streams.open.values()))
        self.service.metrics.watch_grpc_calls(self._channelz_ids)
        await self.service.start()
        await server.start()
        if ops is not None:
            await ops.start()
        self._server, self._ops = server, ops
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("listening on %s:%d (%s)%s%s", cfg.host, self.port, "TLS" if cfg.tls_cert else "plaintext",
                 f", health and Admin also on :{self.ops_port}" if ops is not None else "",
                 f", metrics on {cfg.metrics_bind}:{self.metrics_port}" if self.metrics_port else "")
        return self.port

    def request_stop(self) -> None:
        """Begin the drain (idempotent); safe to call from a signal handler on the loop."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.stop())

    async def stop(self) -> None:
        """Drain: NOT_SERVING (still answering for `drain_notice_s`), then refuse new requests
        with UNAVAILABLE (retryable) while what was admitted finishes, up to `drain_grace_s`."""
        if self._server is None:
            self._stopped.set()
            return
        cfg = self.cfg
        log.info("draining: health NOT_SERVING, %.1f s notice, then up to %.1f s for requests admitted", cfg.drain_notice_s, cfg.drain_grace_s)
        await self.health.enter_graceful_shutdown()
        if cfg.drain_notice_s:
            await asyncio.sleep(cfg.drain_notice_s)
        t = time.monotonic()
        self.service.serving = False
        self.service.draining = True
        assert self.admission is not None
        self.admission.drain()
        idle = await self.admission.wait_idle(cfg.drain_grace_s)
        if not idle:
            log.warning("drain: requests still running after %.1f s; stopping anyway", cfg.drain_grace_s)
        left = max(0.0, cfg.drain_grace_s - (time.monotonic() - t))
        await self._server.stop(left)  # ingest streams still open get this long to finish
        if self._ops is not None:
            await self._ops.stop(0)
        await self.service.close()
        self.service.metrics.close()
        self._server = self._ops = None
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
    p.add_argument("--no-caches", action="store_true", help="turn off the response cache, the user-feature cache and the shared item frame (baseline)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    token = args.admin_token if args.admin_token is not None else os.environ.get("PARITY_ADMIN_TOKEN") or None
    ingest = args.ingest_token if args.ingest_token is not None else os.environ.get("PARITY_INGEST_TOKEN") or None
    return ServerConfig(
        release=Path(args.release), data_dir=Path(args.events), host=args.host, port=args.port, store=args.store, namespace=args.namespace,
        metrics_port=args.metrics_port or None, metrics_host=args.metrics_host, ops_port=args.ops_port, ingest_token=ingest,
        releases_root=Path(args.releases_root) if args.releases_root else None, admin_token=token, tls_cert=args.tls_cert, tls_key=args.tls_key, clock=args.clock,
        materialize=args.materialize, drain_notice_s=args.drain_notice, drain_grace_s=args.drain_grace,
        ranker=args.ranker, retrieval=args.retrieval, serve_max_running=args.serve_concurrency, **_core_pending(args.core_pending),
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
