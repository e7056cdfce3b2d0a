"""A tiny gRPC upstream for the proxy's tests and the hybrid harness's self-check (no release,
no model): every unary method echoes the request bytes, except

  /parity.v1.Recommender/Recommend   a RecommendResponse with k items "0".."k-1" (request_id echoed)
  /echo.Echo/Fail                    aborts with the code named by the request (e.g. b"NOT_FOUND"),
                                     details "failed on purpose" and trailing metadata echo-fail: yes
  /echo.Echo/Sleep                   sleeps float(request) seconds, then echoes

It records what each call carried (`seen`: method, metadata, time remaining when it arrived).

    with EchoUpstream() as up: DelayProxy(up.target, plan) ...
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import grpc

__all__ = ["EchoUpstream", "Seen", "RECOMMEND"]

RECOMMEND = "/parity.v1.Recommender/Recommend"


@dataclass(frozen=True)
class Seen:
    method: str
    metadata: tuple[tuple[str, str | bytes], ...]
    time_remaining: float | None


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, up: "EchoUpstream") -> None:
        self._up = up

    def service(self, details):
        method = details.method
        up = self._up

        async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            up._record(Seen(method, tuple((m.key, m.value) for m in context.invocation_metadata() or ()), context.time_remaining()))
            if method == RECOMMEND:
                from parity_api.v1 import recommender_pb2 as pb

                req = pb.RecommendRequest.FromString(request)
                items = [pb.ScoredItem(item_id=str(i), score=1.0 / (i + 1)) for i in range(req.k or 10)]
                return pb.RecommendResponse(items=items, release_id="echo", request_id=req.request_id).SerializeToString()
            if method == "/echo.Echo/Fail":
                await context.abort(grpc.StatusCode[request.decode()], "failed on purpose", (("echo-fail", "yes"),))
            if method == "/echo.Echo/Sleep":
                await asyncio.sleep(float(request))
            return request

        return grpc.unary_unary_rpc_method_handler(behaviour)


class EchoUpstream:
    """The echo server on its own loop in a daemon thread; `.target`, `.seen` (a list)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, record: bool = True) -> None:
        self.host, self.port, self.record = host, port, record
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="echo-upstream", daemon=True)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def _record(self, s: Seen) -> None:
        if self.record:
            with self._lock:
                self.seen.append(s)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((_Handler(self),))
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        if not self.port:
            raise OSError(f"cannot listen on {self.host}")
        await server.start()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(0)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    def start(self, timeout_s: float = 30.0) -> "EchoUpstream":
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"echo upstream did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass
        self._thread.join(timeout_s)

    def __enter__(self) -> "EchoUpstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
