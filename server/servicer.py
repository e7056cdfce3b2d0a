"""Thin gRPC handlers: proto in → admission → validate → RecommenderService → proto out.

Every unary handler goes through `Handler.call`, which counts the RPC, times it, caps its
deadline (`max_deadline_s`; a request without a deadline gets `default_deadline_s`), takes a
slot in the method's admission lane (server/admission.py: refused at once with
RESOURCE_EXHAUSTED and a retry pushback when it could not finish in time) and maps
exceptions: `server.errors` to their codes with their messages (capped in length: a client's
16 KB field never comes back whole), anything else to INTERNAL with an incident id (the
traceback goes to the log). A request never brings the server down.

IngestEvents streams are limited differently (their own lane): a bearer token, at most
`max_ingest_streams` open at once and `max_ingest_streams_per_peer` per client address,
each ended when it sends nothing for `ingest_idle_timeout_s`, so idle streams can neither
lock out other clients nor hold resources forever.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter
from typing import AsyncIterator, Awaitable, Callable

import grpc

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server.admission import Admission, Draining, Overloaded
from server.auth import check_bearer
from server.errors import DeadlineExceeded, InvalidArgument, ServingError
from server.metrics import Metrics
from server.service import RecommenderService
from server.validation import validate_get_features, validate_rank, validate_recommend
from server.wire import BadBytes

__all__ = ["Handler", "RecommenderServicer", "ascii_metadata", "MAX_MESSAGE_CHARS", "StreamLimits"]

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 512  # the longest error message sent back


def ascii_metadata(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Metadata values must be printable ASCII."""
    return text[:limit].encode("ascii", "backslashreplace").decode("ascii").replace("\n", " ")


def capped_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pushback(context: grpc.aio.ServicerContext, seconds: float) -> None:
    """gRPC's retry pushback: how long a client should wait before retrying (ms, trailing)."""
    context.set_trailing_metadata((("grpc-retry-pushback-ms", str(max(1, int(seconds * 1000)))),))


class Handler:
    """Shared wrapper: deadline cap, admission, metrics, error mapping."""

    def __init__(self, metrics: Metrics, admission: Admission, *, max_deadline_s: float, default_deadline_s: float) -> None:
        self.metrics = metrics
        self.admission = admission
        self.max_deadline_s = max_deadline_s
        self.default_deadline_s = min(default_deadline_s, max_deadline_s)

    def deadline(self, context: grpc.aio.ServicerContext, t0: float, capped: bool) -> float:
        """Absolute deadline: the client's, capped at `max_deadline_s`; without a client deadline,
        the default (capped methods) or none at all (uncapped ones: a release load takes seconds)."""
        remaining = context.time_remaining()
        if not capped:
            return math.inf if remaining is None else t0 + max(remaining, 0.0)
        budget = self.default_deadline_s if remaining is None else remaining
        return t0 + max(min(budget, self.max_deadline_s), 0.0)

    async def call(self, rpc: str, context: grpc.aio.ServicerContext, work: Callable[[float], Awaitable], *, lane: str | None,
                   capped: bool = True, guard: Callable[[], None] | None = None):
        """`work(budget_s)` runs in a slot of `lane` (None: no slot; IngestEvents streams have
        limits of their own) within the deadline. `guard()` (authentication) runs first, so a
        refused caller never holds a slot."""
        t0 = time.perf_counter()
        self.metrics.inflight.inc()
        code, message = grpc.StatusCode.OK, ""
        try:
            if guard is not None:
                guard()
            deadline = self.deadline(context, t0, capped)
            async with (self.admission[lane].slot(deadline) if lane is not None else contextlib.nullcontext()):
                budget = deadline - time.perf_counter()
                try:
                    async with asyncio.timeout(max(budget, 0.0) if math.isfinite(budget) else None):  # a timer, not a task (cheaper than wait_for)
                        return await work(budget)
                except TimeoutError:
                    raise DeadlineExceeded(f"{rpc} did not finish within its deadline ({(deadline - t0) * 1000:.0f} ms"
                                           f"{', capped by the server' if capped else ''}); work abandoned") from None
        except (Overloaded, Draining) as exc:
            code, message = grpc.StatusCode[exc.code], str(exc)
            _pushback(context, exc.retry_after_s)
        except ServingError as exc:
            code, message = grpc.StatusCode[exc.code], capped_text(str(exc))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the client went away or its deadline passed
            raise
        except Exception as exc:  # noqa: BLE001 - the catch-all that keeps the server up
            incident = uuid.uuid4().hex[:12]
            log.exception("%s failed (incident %s)", rpc, incident)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {rpc} ({type(exc).__name__}); incident {incident} is in the server log"
        finally:
            self.metrics.inflight.dec()
            self.metrics.request_done(rpc, code.name, time.perf_counter() - t0)
        await context.abort(code, message)


def _check_parsed(request) -> None:
    if isinstance(request, BadBytes):
        raise InvalidArgument("request", request.describe())


class StreamLimits:
    """Open IngestEvents streams, in total and per client address (not per connection: a
    client opening many connections is still one address)."""

    def __init__(self, total: int, per_peer: int, on_outcome: Callable[[str, str], None] = lambda lane, outcome: None) -> None:
        self.total, self.per_peer = total, per_peer
        self.open: Counter[str] = Counter()
        self._on_outcome = on_outcome

    def _refuse(self, outcome: str, message: str) -> Overloaded:
        self._on_outcome("ingest", outcome)
        return Overloaded(message, 1.0, outcome)

    @staticmethod
    def address(peer: str) -> str:
        """'ipv4:127.0.0.1:5555' -> 'ipv4:127.0.0.1'; 'ipv6:[::1]:5555' -> 'ipv6:[::1]'; unix sockets as they are."""
        if peer.startswith(("ipv4:", "ipv6:")):
            return peer.rsplit(":", 1)[0]
        return peer

    def enter(self, peer: str) -> str:
        addr = self.address(peer)
        if sum(self.open.values()) >= self.total:
            raise self._refuse("streams_total", f"IngestEvents: {self.total} streams are open already (all clients); close idle streams or retry later")
        if self.open[addr] >= self.per_peer:
            raise self._refuse("streams_per_peer", f"IngestEvents: {self.per_peer} streams from your address are open already; send on one of them")
        self.open[addr] += 1
        self._on_outcome("ingest", "admitted")
        return addr

    def leave(self, addr: str) -> None:
        self.open[addr] -= 1
        if self.open[addr] <= 0:
            del self.open[addr]


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, service: RecommenderService, handler: Handler) -> None:
        self.service = service
        self.h = handler
        cfg = service.cfg
        self.streams = StreamLimits(cfg.max_ingest_streams, cfg.max_ingest_streams_per_peer, service.metrics.on_admission)

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        async def work(budget):
            _check_parsed(request)
            q = validate_recommend(request, self.service.cfg)
            out = await self.service.recommend(q, budget)
            return pb.RecommendResponse(
                items=[pb.ScoredItem(item_id=str(i), score=s, source=src) for i, s, src in out.items],
                release_id=out.release_id, degraded=out.degraded, request_id=out.request_id, arm=out.arm,
                latency=[pb.StageLatency(stage=n, ms=ms) for n, ms in out.latency],
            )

        return await self.h.call("Recommend", context, work, lane="serve")

    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        async def work(budget):
            _check_parsed(request)
            q = validate_rank(request, self.service.cfg)
            out = await self.service.rank(q, budget)
            return pb.RankResponse(items=[pb.ScoredItem(item_id=str(i), score=s, source=src, unknown=unk) for i, s, src, unk in out.items],
                                   release_id=out.release_id, degraded=out.degraded, request_id=out.request_id, arm=out.arm)

        return await self.h.call("Rank", context, work, lane="serve")

    async def GetFeatures(self, request: pb.GetFeaturesRequest, context: grpc.aio.ServicerContext) -> pb.GetFeaturesResponse:
        async def work(budget):
            _check_parsed(request)
            s = self.service
            q = validate_get_features(request, s.sets_by_entity.keys(), s.sets_by_entity, s.cfg)
            sets = await s.get_features(q, budget)
            return pb.GetFeaturesResponse(sets=[
                pb.FeatureSetValues(feature_set=r.feature_set, version=r.version, found=r.found, feature_ts_ms=r.feature_ts_ms,
                                    staleness_ms=r.staleness_ms, values=[pb.FeatureValue(name=n, value=v, missing=m) for n, v, m in r.values])
                for r in sets])

        return await self.h.call("GetFeatures", context, work, lane="features")

    async def IngestEvents(self, request_iterator: AsyncIterator[pb.Event], context: grpc.aio.ServicerContext) -> pb.IngestSummary:
        cfg = self.service.cfg

        def auth() -> None:
            check_bearer(context.invocation_metadata(), cfg.ingest_bearer, what="IngestEvents",
                         disabled="ingest is disabled on this server: start it with --ingest-token or --admin-token")

        async def work(budget):
            if self.service.draining:
                self.service.metrics.on_admission("ingest", "draining")
                raise Draining()
            addr = self.streams.enter(context.peer())
            try:
                out = await self.service.ingest(self._chunks(request_iterator, cfg.ingest_chunk, cfg.ingest_idle_timeout_s, cfg.max_events_per_stream))
            finally:
                self.streams.leave(addr)
            md = [(k, ascii_metadata(v)) for k, v in (("parity-first-invalid", out.first_error), ("parity-first-limited", out.first_limited)) if v]
            if md:
                context.set_trailing_metadata(tuple(md))
            return pb.IngestSummary(received=out.received, accepted=out.accepted, duplicates=out.duplicates, late=out.late, invalid=out.invalid,
                                    limited=out.limited)

        # No lane and no cap: a stream lasts as long as its client sends (ended when idle); the client's own deadline holds.
        return await self.h.call("IngestEvents", context, work, lane=None, capped=False, guard=auth)

    @staticmethod
    async def _chunks(request_iterator: AsyncIterator, chunk: int, idle_s: float, max_events: int):
        """Messages in chunks of at most `chunk`; ends the stream (DEADLINE_EXCEEDED) when the
        client sends nothing for `idle_s`, and (RESOURCE_EXHAUSTED) past `max_events`.
        Chunks already handed on stay committed; a client that resends them is deduplicated."""
        it = request_iterator.__aiter__()
        buf: list = []
        seen = 0
        idle = _IdleWatch(idle_s)
        try:
            while True:
                try:
                    ev = await idle.wait(it.__anext__())
                except StopAsyncIteration:
                    break
                seen += 1
                if seen > max_events:
                    raise Overloaded(f"IngestEvents: a stream carries at most {max_events} events; open a new one", 0.0, "stream_too_long")
                buf.append(ev)
                if len(buf) >= chunk:
                    yield buf
                    buf = []
        except IdleStream:
            raise DeadlineExceeded(f"IngestEvents: the stream sent nothing for {idle_s:g} s and was ended; {seen} events were "
                                   "received before it (resend any that were not acknowledged: delivery is deduplicated)") from None
        finally:
            idle.close()
        if buf:
            yield buf


class IdleStream(Exception):
    """The client sent nothing for the idle timeout."""


class _IdleWatch:
    """Ends a wait for the client's next message after `idle_s`, with one timer per stream
    (asyncio.wait_for per message would cost a task per event)."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.since: float | None = None  # when the current wait began; None: not waiting
        self.fired = False
        self._timer = self.loop.call_later(idle_s, self._check)

    def _check(self) -> None:
        if self.since is not None and self.loop.time() - self.since >= self.idle_s and self.task is not None:
            self.fired = True
            self.task.cancel()
            return
        left = self.idle_s if self.since is None else self.idle_s - (self.loop.time() - self.since)
        self._timer = self.loop.call_later(max(left, 0.001), self._check)

    async def wait(self, awaitable):
        self.since = self.loop.time()
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.fired and self.task is not None:
                self.task.uncancel()
                raise IdleStream() from None
            raise
        finally:
            self.since = None

    def close(self) -> None:
        self._timer.cancel()
