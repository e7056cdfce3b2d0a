"""Thin gRPC handlers: proto in → validate → RecommenderService → proto out; errors → status codes.

Every handler goes through `Handler.call`, which counts the RPC, times it, honours the
client's deadline (work past it is cancelled and DEADLINE_EXCEEDED returned) and maps
exceptions: `server.errors` to their codes with their messages, anything else to INTERNAL
with the request id (the traceback goes to the log). A request never brings the server down.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable

import grpc

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server.errors import DeadlineExceeded, ServingError
from server.metrics import Metrics
from server.service import RecommenderService
from server.validation import validate_get_features, validate_rank, validate_recommend

__all__ = ["Handler", "RecommenderServicer", "ascii_metadata"]

log = logging.getLogger(__name__)


def ascii_metadata(text: str, limit: int = 512) -> str:
    """Metadata values must be printable ASCII."""
    return text[:limit].encode("ascii", "backslashreplace").decode("ascii").replace("\n", " ")


class Handler:
    """Shared wrapper: metrics, deadline, error mapping."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def call(self, rpc: str, context: grpc.aio.ServicerContext, work: Callable[[float | None], Awaitable]):
        t0 = time.perf_counter()
        self.metrics.inflight.inc()
        code, message = grpc.StatusCode.OK, ""
        try:
            remaining = context.time_remaining()
            if remaining is None:
                return await work(None)
            try:
                return await asyncio.wait_for(work(remaining), timeout=max(remaining, 0.0))
            except TimeoutError:
                raise DeadlineExceeded(f"{rpc} did not finish within the client's deadline ({remaining * 1000:.0f} ms); work abandoned") from None
        except ServingError as exc:
            code, message = grpc.StatusCode[exc.code], str(exc)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the client went away or its deadline passed
            raise
        except Exception as exc:  # noqa: BLE001 - the catch-all that keeps the server up
            incident = uuid.uuid4().hex[:12]
            log.exception("%s failed (incident %s)", rpc, incident)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {rpc} ({type(exc).__name__}); incident {incident} is in the server log"
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(rpc, code.name).inc()
            self.metrics.latency.labels(rpc).observe(time.perf_counter() - t0)
        await context.abort(code, message)


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, service: RecommenderService, handler: Handler) -> None:
        self.service = service
        self.h = handler

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        async def work(budget):
            q = validate_recommend(request, self.service.cfg)
            out = await self.service.recommend(q, budget)
            return pb.RecommendResponse(
                items=[pb.ScoredItem(item_id=str(i), score=s, source=src) for i, s, src in out.items],
                release_id=out.release_id, degraded=out.degraded, request_id=out.request_id,
                latency=[pb.StageLatency(stage=n, ms=ms) for n, ms in out.latency],
            )

        return await self.h.call("Recommend", context, work)

    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        async def work(budget):
            q = validate_rank(request, self.service.cfg)
            out = await self.service.rank(q, budget)
            return pb.RankResponse(items=[pb.ScoredItem(item_id=str(i), score=s, source=src) for i, s, src in out.items],
                                   release_id=out.release_id, degraded=out.degraded, request_id=out.request_id)

        return await self.h.call("Rank", context, work)

    async def GetFeatures(self, request: pb.GetFeaturesRequest, context: grpc.aio.ServicerContext) -> pb.GetFeaturesResponse:
        async def work(budget):
            s = self.service
            q = validate_get_features(request, s.sets_by_entity.keys(), s.sets_by_entity, s.cfg)
            sets = await s.get_features(q)
            return pb.GetFeaturesResponse(sets=[
                pb.FeatureSetValues(feature_set=r.feature_set, version=r.version, found=r.found, feature_ts_ms=r.feature_ts_ms,
                                    staleness_ms=r.staleness_ms, values=[pb.FeatureValue(name=n, value=v, missing=m) for n, v, m in r.values])
                for r in sets])

        return await self.h.call("GetFeatures", context, work)

    async def IngestEvents(self, request_iterator: AsyncIterator[pb.Event], context: grpc.aio.ServicerContext) -> pb.IngestSummary:
        chunk = self.service.cfg.ingest_chunk

        async def chunks():
            buf = []
            async for ev in request_iterator:
                buf.append(ev)
                if len(buf) >= chunk:
                    yield buf
                    buf = []
            if buf:
                yield buf

        async def work(budget):
            out = await self.service.ingest(chunks())
            if out.first_error:
                context.set_trailing_metadata((("parity-first-invalid", ascii_metadata(out.first_error)),))
            return pb.IngestSummary(received=out.received, accepted=out.accepted, duplicates=out.duplicates, late=out.late, invalid=out.invalid)

        return await self.h.call("IngestEvents", context, work)
