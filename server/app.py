"""The gRPC server process: grpc.aio with the Recommender and Admin services, standard health
(grpc.health.v1) and reflection (so grpc_health_probe and grpcurl work), Prometheus metrics,
TLS when a certificate and key are given, and a graceful drain on SIGTERM / SIGINT:

  health → NOT_SERVING (still answering for `drain_notice_s`, so load balancers move away)
  → stop accepting RPCs → wait up to `drain_grace_s` for RPCs in flight → exit 0.

Run it as `parity serve ...` (its options are parsed in parity/cli_serve.py).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from parity_api.v1 import recommender_pb2 as pb
from server.admin import AdminServicer
from server.admission import Admission, LaneLimits
from server.bootstrap import build_service
from server.config import ServerConfig
from server.metrics import channelz_server_ids
from server.service import RecommenderService
from server.servicer import Handler, RecommenderServicer
from server.wire import add_servicer

__all__ = ["ParityServer", "BackgroundServer", "serve", "SERVICE_NAMES"]

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
        options = [("grpc.so_reuseport", 1 if cfg.reuse_port else 0), ("grpc.max_receive_message_length", 16 << 20),
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
            try:
                self.loop.call_soon_threadsafe(self.server.request_stop)
            except RuntimeError:  # its loop closed meanwhile: the server stopped by itself (drained), the thread is ending
                pass
        self._thread.join(timeout_s)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
