"""A loopback gRPC proxy that injects faults, for benchmarks and tests (`bench/hybrid.py`).

Every unary-unary method is forwarded to one upstream target as raw bytes (no message types:
the request and response bytes pass through untouched), with the client's remaining deadline
and its metadata. Before forwarding, a seeded fault plan decides per call:

  dropped   (`drop_share`, default 5 %)   never answered: held until the client's deadline
                                          expires (or the client cancels, or the proxy stops)
  delayed   (`delay_share`, default 20 %) forwarded after a uniform `delay_ms` (80-200 ms) wait
  forwarded (the rest)                    forwarded at once

    with DelayProxy("127.0.0.1:50051", FaultPlan(delay_share=0.2, drop_share=0.05, seed=1)) as p:
        channel = grpc.insecure_channel(p.target)   # "127.0.0.1:PORT"
        ...
        print(p.counts)   # {'calls': ..., 'forwarded': ..., 'delayed': ..., 'dropped': ..., 'upstream_error': ...}

Counts: forwarded + delayed + dropped == calls (the plan's decision, one per call). upstream_error
counts the forwarded or delayed calls whose upstream answered with an error status (its code,
details and trailing metadata are passed back to the client unchanged) or had not answered when
the client's deadline passed; it is not a fourth share.
Decisions are drawn from one RNG seeded by `plan.seed`, in the order calls reach the proxy, so
the first N calls of two runs with the same plan get the same outcomes (`plan.outcomes(N)`).
Which request gets which outcome depends on arrival order when calls are concurrent.

Streaming methods are refused with UNIMPLEMENTED: the proxy cannot see the method type on the
wire, so it refuses the streaming methods of the services it knows (Parity's, health, reflection)
and treats every other method as unary. A held (dropped) call is a coroutine asleep on the proxy's
loop, never a blocked thread; gRPC cancels it when the client's deadline passes, and `held` counts
those still waiting (0 again once their deadlines are over).

    python -m bench.delay_proxy --upstream 127.0.0.1:50051 --port 50052 [--delay-share 0.2 --drop-share 0.05 --delay-ms 80,200 --seed 0]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import grpc

__all__ = ["FaultPlan", "DelayProxy", "OUTCOMES", "streaming_methods", "main"]

log = logging.getLogger(__name__)

FORWARDED, DELAYED, DROPPED, UPSTREAM_ERROR = "forwarded", "delayed", "dropped", "upstream_error"
OUTCOMES = (FORWARDED, DELAYED, DROPPED)
# Metadata the proxy's own channel sets (or gRPC reserves); everything else is passed on.
_NOT_FORWARDED = ("user-agent",)
_CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20))


@dataclass(frozen=True)
class FaultPlan:
    """What share of calls to delay and to drop. Reproducible: one RNG seeded by `seed`."""

    delay_share: float = 0.20
    drop_share: float = 0.05
    delay_ms: tuple[float, float] = (80.0, 200.0)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("delay_share", "drop_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.delay_share + self.drop_share > 1.0 + 1e-12:
            raise ValueError(f"delay_share + drop_share must be <= 1, got {self.delay_share} + {self.drop_share}")
        lo, hi = self.delay_ms
        if not 0.0 <= lo <= hi:
            raise ValueError(f"delay_ms must be (lo, hi) with 0 <= lo <= hi, got {self.delay_ms}")

    def rng(self) -> random.Random:
        return random.Random(self.seed)

    def decide(self, rng: random.Random) -> tuple[str, float]:
        """(outcome, delay in seconds) for the next call. Always two draws, whatever the outcome,
        so the sequence of outcomes does not depend on the delays drawn."""
        u, v = rng.random(), rng.random()
        if u < self.drop_share:
            return DROPPED, 0.0
        if u < self.drop_share + self.delay_share:
            lo, hi = self.delay_ms
            return DELAYED, (lo + (hi - lo) * v) / 1000.0
        return FORWARDED, 0.0

    def outcomes(self, n: int) -> list[tuple[str, float]]:
        """The decisions for the first n calls a proxy with this plan will see."""
        rng = self.rng()
        return [self.decide(rng) for _ in range(n)]


def streaming_methods() -> frozenset[str]:
    """'/package.Service/Method' of every streaming method in the services this proxy knows."""
    modules = []
    try:
        from parity_api.v1 import recommender_pb2

        modules.append(recommender_pb2)
    except ImportError:  # pragma: no cover - stubs not generated (`make setup`)
        pass
    try:
        from grpc_health.v1 import health_pb2

        modules.append(health_pb2)
    except ImportError:  # pragma: no cover
        pass
    try:
        from grpc_reflection.v1alpha import reflection_pb2

        modules.append(reflection_pb2)
    except ImportError:  # pragma: no cover
        pass
    out = set()
    for mod in modules:
        for service in mod.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                if m.client_streaming or m.server_streaming:
                    out.add(f"/{service.full_name}/{m.name}")
    return frozenset(out)


class _Forwarder(grpc.GenericRpcHandler):
    """The generic handler: a raw-bytes unary-unary behaviour for every method it accepts."""

    def __init__(self, proxy: "DelayProxy") -> None:
        self._proxy = proxy
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method in self._proxy.refused_methods:
            return None  # gRPC answers UNIMPLEMENTED
        handler = self._handlers.get(method)
        if handler is None:
            handle = self._proxy._handle

            async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return await handle(method, request, context)

            # no (de)serializers: the behaviour gets and returns the bytes on the wire
            handler = self._handlers[method] = grpc.unary_unary_rpc_method_handler(behaviour)
        return handler


class DelayProxy:
    """The proxy on its own event loop in a daemon thread (as server.app.BackgroundServer).

    `DelayProxy(upstream, plan, port=0)`; `start()`/`stop()` or `with`. `.target` is
    "127.0.0.1:PORT"; `.counts` a snapshot of the counters; `.held` the dropped calls still held.
    """

    def __init__(self, upstream: str, plan: FaultPlan | None = None, port: int = 0, *, host: str = "127.0.0.1",
                 refuse: Iterable[str] | None = None, connect_timeout_s: float | None = None) -> None:
        self.upstream = upstream
        self.plan = plan if plan is not None else FaultPlan()
        self.host = host
        self.port = port
        self.refused_methods = frozenset(refuse) if refuse is not None else streaming_methods()
        self.connect_timeout_s = connect_timeout_s
        self._rng = self.plan.rng()
        self._lock = threading.Lock()
        self._counts = {"calls": 0, FORWARDED: 0, DELAYED: 0, DROPPED: 0, UPSTREAM_ERROR: 0}
        self._held = 0
        self._callables: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._channel: grpc.aio.Channel | None = None
        self._server: grpc.aio.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- what callers read ------------------------------------------------------------------
    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def reset(self, plan: FaultPlan | None = None) -> None:
        """Start over: a new plan (or the same), its RNG re-seeded, counters at zero (held calls
        stay held). Lets a benchmark warm up through the proxy without spending fault decisions,
        and give each of its legs the same sequence of faults."""
        with self._lock:
            if plan is not None:
                self.plan = plan
            self._rng = self.plan.rng()
            self._counts = dict.fromkeys(self._counts, 0)

    # -- the call path (on the proxy's loop) --------------------------------------------------
    def _count(self, key: str, held: int = 0) -> None:
        with self._lock:
            self._counts[key] += 1
            if key in OUTCOMES:
                self._counts["calls"] += 1
            self._held += held

    async def _handle(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with self._lock:  # reset() may swap plan and RNG from another thread
            outcome, delay_s = self.plan.decide(self._rng)
        if outcome == DROPPED:
            self._count(DROPPED, held=1)
            try:
                await self._hold(context)
            finally:
                with self._lock:
                    self._held -= 1
            return b""  # not reached: the hold ends by cancellation or abort
        self._count(outcome)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        metadata = tuple((m.key, m.value) for m in context.invocation_metadata() or ()
                         if m.key not in _NOT_FORWARDED and not m.key.startswith((":", "grpc-")))
        remaining = context.time_remaining()
        call = self._callable(method)(request, timeout=remaining, metadata=metadata)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            self._count(UPSTREAM_ERROR)
            await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
            raise  # not reached: abort raises
        except asyncio.CancelledError:
            call.cancel()  # the client went away: do not leave the upstream call running
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:  # its deadline passed while upstream worked
                self._count(UPSTREAM_ERROR)
            raise
        trailing = await call.trailing_metadata()
        if trailing:
            context.set_trailing_metadata(tuple(trailing))
        return response

    async def _hold(self, context: grpc.aio.ServicerContext) -> None:
        """Never answer: sleep past the client's deadline (gRPC cancels this coroutine when it
        passes); with no deadline, until the client cancels or the proxy stops."""
        remaining = context.time_remaining()
        if remaining is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(remaining + 0.05)
            # the deadline has passed but gRPC has not cancelled us yet: answer as it would
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "dropped by the fault plan")

    def _callable(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        mc = self._callables.get(method)
        if mc is None:
            assert self._channel is not None
            mc = self._channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            self._callables[method] = mc
        return mc

    # -- lifecycle ------------------------------------------------------------------------------
    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._channel = grpc.aio.insecure_channel(self.upstream, options=list(_CHANNEL_OPTIONS))
        if self.connect_timeout_s is not None:
            try:
                await asyncio.wait_for(self._channel.channel_ready(), self.connect_timeout_s)
            except asyncio.TimeoutError:
                await self._channel.close()
                raise OSError(f"upstream {self.upstream} not reachable within {self.connect_timeout_s} s") from None
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *_CHANNEL_OPTIONS])
        server.add_generic_rpc_handlers((_Forwarder(self),))
        address = f"{self.host}:{self.port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address} (in use?): {exc}") from None
        if not bound:
            raise OSError(f"cannot listen on {address}")
        self.port = bound
        await server.start()
        self._server = server
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(0)  # held and in-flight calls are cancelled (clients see CANCELLED)
            await self._channel.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def start(self, timeout_s: float = 30.0) -> "DelayProxy":
        if self._thread is not None:
            raise RuntimeError("DelayProxy already started")
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"proxy did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # loop already closed
                pass
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"proxy did not stop within {timeout_s} s")

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- command line ------------------------------------------------------------------------------
def _delay_ms(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--delay-ms must be LO,HI in milliseconds, e.g. 80,200; got {text!r}") from None
    return lo, hi


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.delay_proxy", description="Forward gRPC calls to an upstream, delaying and dropping a seeded share of them.")
    p.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    p.add_argument("--port", type=int, default=0, help="port to listen on, on 127.0.0.1 (default 0: a free one, printed)")
    p.add_argument("--delay-share", type=float, default=FaultPlan.delay_share, help="share of calls delayed (default 0.20)")
    p.add_argument("--drop-share", type=float, default=FaultPlan.drop_share, help="share of calls never answered (default 0.05)")
    p.add_argument("--delay-ms", type=_delay_ms, default=FaultPlan.delay_ms, help="uniform delay range LO,HI in ms (default 80,200)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the plan (default 0)")
    args = p.parse_args(argv)
    try:
        plan = FaultPlan(delay_share=args.delay_share, drop_share=args.drop_share, delay_ms=args.delay_ms, seed=args.seed)
        proxy = DelayProxy(args.upstream, plan, port=args.port).start()
    except (ValueError, OSError) as exc:
        print(f"delay_proxy: error: {exc}", file=sys.stderr)
        return 2
    print(f"delay_proxy: {proxy.target} -> {args.upstream} ({plan})", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    proxy.stop()
    print(f"delay_proxy: {proxy.counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
