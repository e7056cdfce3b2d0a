"""Hybrid mode: ask the server within a deadline, answer from the device when it is slow,
unreachable, errs or says `degraded`.

A transport is any callable `(user_id: str, k: int, context: {str: float}, exclude: [int],
timeout_s: float) -> ServerAnswer` that raises on failure. `GrpcTransport` is the one for
Parity's gRPC API; it imports grpc and the generated stubs (`parity_api.v1`, the `hybrid`
extra) only when first used, so the SDK imports without them. The deadline is kept by the
SDK too (the call runs in a worker thread), so a transport that ignores `timeout_s` cannot
hold an answer past it.
"""
from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from mobile_sdk.errors import NoBundle, SDKError
from mobile_sdk.session import engaged_items

if TYPE_CHECKING:
    from mobile_sdk.client import Client, Ranking


@dataclass(frozen=True)
class ServerAnswer:
    items: list[tuple[int, float]]
    degraded: bool
    release_id: str = ""


class TransportError(SDKError):
    """The server call failed; `reason` is short (deadline, unavailable, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Transport = Callable[[str, int, Mapping[str, float], Sequence[int], float], ServerAnswer]


class GrpcTransport:
    """Recommend over Parity's gRPC API (proto/parity_api/v1/recommender.proto). One channel, opened lazily."""

    def __init__(self, target: str, *, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.target = target
        self.metadata = tuple(metadata)
        self._lock = threading.Lock()
        self._channel = None
        self._stub = None
        self._pb2 = None

    def _connect(self):
        with self._lock:
            if self._stub is None:
                try:
                    import grpc
                    from parity_api.v1 import recommender_pb2, recommender_pb2_grpc
                except ImportError as exc:
                    raise TransportError(f"hybrid mode needs grpcio, protobuf and the parity_api stubs "
                                         f"(pip install 'parity-mobile-sdk[hybrid]'): {exc}") from None
                self._channel = grpc.insecure_channel(self.target)
                self._stub = recommender_pb2_grpc.RecommenderStub(self._channel)
                self._pb2 = recommender_pb2
            return self._stub, self._pb2

    def __call__(self, user_id: str, k: int, context: Mapping[str, float], exclude: Sequence[int],
                 timeout_s: float) -> ServerAnswer:
        import grpc

        stub, pb2 = self._connect()
        req = pb2.RecommendRequest(user_id=str(user_id), k=k, context=dict(context),
                                   exclude_item_ids=[str(i) for i in exclude])
        try:
            resp = stub.Recommend(req, timeout=timeout_s, metadata=self.metadata or None)
        except grpc.RpcError as exc:
            code = exc.code()
            name = "deadline" if code == grpc.StatusCode.DEADLINE_EXCEEDED else f"grpc {code.name if code else '?'}"
            raise TransportError(f"{name}: {exc.details()}") from None
        try:
            items = [(int(it.item_id), float(it.score)) for it in resp.items]
        except ValueError:
            raise TransportError("the server answered an item id that is not a decimal integer") from None
        return ServerAnswer(items, bool(resp.degraded), resp.release_id)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None


def _pool(client: "Client") -> concurrent.futures.ThreadPoolExecutor:
    if client._hybrid_pool is None:
        client._hybrid_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="parity-sdk-hybrid")
    return client._hybrid_pool


def recommend(client: "Client", user_id: int | str, k: int, deadline_s: float,
              context: Mapping[str, float] | None) -> "Ranking":
    from mobile_sdk.client import SOURCE_SERVER, Ranking

    if not isinstance(deadline_s, (int, float)) or not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
    t0 = time.perf_counter()
    context = dict(context or {})
    server_ctx = {key: float(v) for key, v in context.items() if key != "now_ms" and math.isfinite(float(v))}
    exclude = sorted(engaged_items(client.engaged_events()))
    answer: ServerAnswer | None = None
    future = None
    if client.transport is not None:
        future = _pool(client).submit(client.transport, str(user_id), k, server_ctx, exclude, float(deadline_s))
    # Wait for the server until a margin before the deadline (a few device ranks long), then rank
    # on the device while still waiting: a fast server costs no device CPU, and a slow one
    # leaves the fallback ready when the deadline passes (the tail is the deadline, not
    # deadline + rank).
    margin = min(deadline_s / 2, max(0.005, 3.0 * client.rank_seconds_ewma))
    reason = "no server transport configured" if future is None else None
    if future is not None:
        try:
            answer = future.result(timeout=max(0.0, deadline_s - margin))
            reason = "degraded" if answer.degraded else None
        except concurrent.futures.TimeoutError:
            reason = "deadline"
        except TransportError as exc:
            reason = exc.reason
        except Exception as exc:  # noqa: BLE001 - any transport failure means: answer from the device
            reason = f"{type(exc).__name__}: {exc}"
    if reason is None:
        return Ranking(answer.items[:k], source=SOURCE_SERVER, bundle_version=client.version,
                       release_id=answer.release_id, elapsed_ms=(time.perf_counter() - t0) * 1e3)
    try:
        local: Ranking | None = client.rank(user_id, context=context, k=k)
        no_bundle: NoBundle | None = None
    except NoBundle as exc:
        local, no_bundle = None, exc
    if reason == "deadline":  # the server may still make it within the margin
        try:
            answer = future.result(timeout=max(0.0, deadline_s - (time.perf_counter() - t0)))
            reason = "degraded" if answer.degraded else None
        except concurrent.futures.TimeoutError:
            future.cancel()
        except TransportError as exc:
            reason = exc.reason
        except Exception as exc:  # noqa: BLE001
            reason = f"{type(exc).__name__}: {exc}"
    if reason is None:
        return Ranking(answer.items[:k], source=SOURCE_SERVER, bundle_version=client.version,
                       release_id=answer.release_id, elapsed_ms=(time.perf_counter() - t0) * 1e3)
    if local is None:
        if answer is None:
            raise no_bundle
        # degraded, and the device has nothing: the server's degraded answer beats none
        return Ranking(answer.items[:k], source=SOURCE_SERVER, fallback_reason="degraded, and no bundle on the device",
                       release_id=answer.release_id, elapsed_ms=(time.perf_counter() - t0) * 1e3)
    ranking = local
    ranking.fallback_reason = reason
    ranking.elapsed_ms = (time.perf_counter() - t0) * 1e3
    return ranking
