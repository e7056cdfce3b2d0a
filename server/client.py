"""A typed Python client for backends: one reused channel, deadlines on every call, retries
with jittered exponential backoff on the answers that mean "not done, try again": UNAVAILABLE
(a store outage, a draining server), RESOURCE_EXHAUSTED (shed by admission control; the
server's `grpc-retry-pushback-ms` is honoured) and CANCELLED when this client did not cancel
(gRPC's C core sheds calls that way). Never on a definite answer. Retries are throttled as
gRPC's retry policy does (a token bucket: 10 tokens, -1 per retryable failure, +0.1 per
success, retries only above half; only shedding answers spend tokens), so a fleet of clients
cannot multiply an overload.

    with ParityClient("127.0.0.1:50051", timeout_s=0.2) as c:
        rec = c.recommend("42", k=10)
        for item in rec.items: print(item.item_id, item.score, item.source)

Every method is safe to retry: Recommend, Rank, GetFeatures and GetStatus only read;
IngestEvents is deduplicated by event_id on the server; LoadRelease of the same folder twice
ends in the same state. Failures raise `ParityRpcError` with the status code and the
server's message (which names the bad field for INVALID_ARGUMENT).
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc

__all__ = ["ParityClient", "ParityRpcError", "ScoredItem", "Recommendation", "Ranking", "FeatureSetValues", "LiveEvent",
           "IngestSummary", "Status", "LoadedRelease"]

T = TypeVar("T")

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})
_SHED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})


def _pushback_s(exc: grpc.RpcError) -> float | None:
    """The server's `grpc-retry-pushback-ms` in seconds (negative: do not retry), if it sent one."""
    try:
        md = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - not every RpcError carries metadata
        return None
    for key, value in md:
        if key == "grpc-retry-pushback-ms":
            try:
                return int(value) / 1000.0
            except (TypeError, ValueError):
                return None
    return None


class RetryThrottle:
    """gRPC's retry throttling (gRFC A6): retries only while tokens > max/2."""

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        self.max_tokens, self.ratio, self.tokens = max_tokens, token_ratio, max_tokens
        self._lock = threading.Lock()

    def success(self) -> None:
        with self._lock:
            self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def failure(self) -> bool:
        """Count a retryable failure; True if a retry is allowed now."""
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1)
            return self.tokens > self.max_tokens / 2


class ParityRpcError(Exception):
    def __init__(self, method: str, code: grpc.StatusCode, details: str, attempts: int) -> None:
        super().__init__(f"{method}: {code.name}: {details}" + (f" (after {attempts} attempts)" if attempts > 1 else ""))
        self.method = method
        self.code = code
        self.details = details
        self.attempts = attempts


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    source: str
    unknown: bool = False  # Rank: not in the catalogue (score NaN)


@dataclass(frozen=True)
class Recommendation:
    items: list[ScoredItem]
    release_id: str
    degraded: bool
    request_id: str
    latency_ms: dict[str, float] = field(default_factory=dict)  # per stage, when asked for
    arm: str = "primary"  # the rollout arm that answered

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]


@dataclass(frozen=True)
class Ranking:
    items: list[ScoredItem]  # in request order
    release_id: str
    degraded: bool
    request_id: str
    arm: str = "primary"


@dataclass(frozen=True)
class FeatureSetValues:
    feature_set: str
    version: str
    found: bool
    feature_ts_ms: int
    staleness_ms: int
    values: dict[str, float]
    missing: frozenset[str]


@dataclass(frozen=True)
class LiveEvent:
    event_id: int | str
    ts_ms: int
    user_id: int | str
    item_id: int | str
    type: str  # impression, play, like, skip, rating
    value: float = 1.0
    request_id: str = ""  # the Recommend request that served the item (feedback joins)

    def to_proto(self) -> pb.Event:
        return pb.Event(event_id=str(self.event_id), ts_ms=int(self.ts_ms), user_id=str(self.user_id), item_id=str(self.item_id),
                        type=self.type, value=float(self.value), request_id=self.request_id)


@dataclass(frozen=True)
class IngestSummary:
    received: int
    accepted: int
    duplicates: int
    late: int
    invalid: int
    first_invalid: str | None = None  # why the first invalid event was refused
    limited: int = 0  # refused by the per-user contribution caps
    first_limited: str | None = None


@dataclass(frozen=True)
class Status:
    release_id: str
    store: str
    feature_set_versions: dict[str, str]
    requests_served: int
    uptime_s: float
    serving: bool
    now_ms: int
    clock: str
    catalogue_items: int
    feature_sets: dict[str, dict] = field(default_factory=dict)  # per set: mode, served, missing, staleness p50/p99 ms, bytes read
    values_repairs_pending: int = 0
    values_repairs_done: int = 0
    worker: int = 0  # 1..N under `parity serve --workers N`, 0 for a lone server
    pid: int = 0


@dataclass(frozen=True)
class LoadedRelease:
    release_id: str
    previous_release_id: str
    load_ms: float


class ParityClient:
    def __init__(self, target: str, *, timeout_s: float = 1.0, retries: int = 3, backoff_s: float = 0.05, admin_token: str | None = None,
                 ingest_token: str | None = None, tls: bool = False, root_certificates: bytes | None = None, server_name: str | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> None:
        """`tls` (or `root_certificates`) makes a TLS channel; `server_name` overrides the name checked in the certificate.
        `ingest_token` authorises IngestEvents (default: the admin token, which a server without an ingest token accepts)."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        opts = list(options)
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_certificates is not None:
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._admin = [("authorization", f"Bearer {admin_token}")] if admin_token else []
        tok = ingest_token or admin_token
        self._ingest_md = [("authorization", f"Bearer {tok}")] if tok else []
        self._throttle = RetryThrottle()
        self._rec = pb_grpc.RecommenderStub(self._channel)
        self._adm = pb_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- plumbing ------------------------------------------------------------------------
    def _call(self, method: str, fn: Callable[[float], T], timeout_s: float | None) -> T:
        """Call with the overall deadline; retry what is retryable with backoff while time is left."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise ParityRpcError(method, grpc.StatusCode.DEADLINE_EXCEEDED, "no time left for another attempt", attempt - 1)
                out = fn(left)
                self._throttle.success()
                return out
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in _RETRYABLE:
                    raise ParityRpcError(method, code, exc.details() or "", attempt) from None
                # Only shedding answers spend retry tokens: retrying a server that is down or draining
                # costs it nothing, retrying an overloaded one adds to its load.
                allowed = self._throttle.failure() if code in _SHED else True
                if attempt > self.retries or not allowed:
                    raise ParityRpcError(method, code, exc.details() or "", attempt) from None
                pause = self.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random())
                pushback = _pushback_s(exc)
                if pushback is not None:
                    if pushback < 0:  # the server says: do not retry
                        raise ParityRpcError(method, code, exc.details() or "", attempt) from None
                    pause = max(pause, pushback)
                if time.monotonic() + pause >= deadline:
                    raise ParityRpcError(method, code, exc.details() or "", attempt) from None
                time.sleep(pause)

    @staticmethod
    def _items(msgs) -> list[ScoredItem]:
        return [ScoredItem(m.item_id, float(m.score), m.source, m.unknown) for m in msgs]

    # -- Recommender -------------------------------------------------------------------------
    def recommend(self, user_id: int | str, k: int = 10, *, exclude: Iterable[int | str] = (), context: Mapping[str, float] | None = None,
                  include_latency: bool = False, request_id: str = "", timeout_s: float | None = None) -> Recommendation:
        req = pb.RecommendRequest(user_id=str(user_id), k=int(k), exclude_item_ids=[str(x) for x in exclude], context=dict(context or {}),
                                  request_id=request_id, include_latency=include_latency)
        r = self._call("Recommend", lambda t: self._rec.Recommend(req, timeout=t), timeout_s)
        return Recommendation(self._items(r.items), r.release_id, r.degraded, r.request_id, {s.stage: s.ms for s in r.latency}, r.arm)

    def rank(self, user_id: int | str, item_ids: Iterable[int | str], *, context: Mapping[str, float] | None = None,
             request_id: str = "", timeout_s: float | None = None) -> Ranking:
        req = pb.RankRequest(user_id=str(user_id), item_ids=[str(x) for x in item_ids], context=dict(context or {}), request_id=request_id)
        r = self._call("Rank", lambda t: self._rec.Rank(req, timeout=t), timeout_s)
        return Ranking(self._items(r.items), r.release_id, r.degraded, r.request_id, r.arm)

    def get_features(self, entity_type: str, entity_id: int | str, feature_sets: Sequence[str] = (), *, timeout_s: float | None = None) -> list[FeatureSetValues]:
        req = pb.GetFeaturesRequest(entity_type=entity_type, entity_id=str(entity_id), feature_sets=list(feature_sets))
        r = self._call("GetFeatures", lambda t: self._rec.GetFeatures(req, timeout=t), timeout_s)
        return [FeatureSetValues(s.feature_set, s.version, s.found, s.feature_ts_ms, s.staleness_ms, {v.name: v.value for v in s.values},
                                 frozenset(v.name for v in s.values if v.missing)) for s in r.sets]

    def ingest(self, events: Iterable[LiveEvent | pb.Event], *, timeout_s: float | None = None) -> IngestSummary:
        """Send events in one stream (retried whole on UNAVAILABLE: the server deduplicates)."""
        msgs = [e.to_proto() if isinstance(e, LiveEvent) else e for e in events]

        def once(t: float):
            resp, call = self._rec.IngestEvents.with_call(iter(msgs), timeout=t, metadata=self._ingest_md)
            return resp, dict(call.trailing_metadata() or ())

        r, md = self._call("IngestEvents", once, timeout_s or max(self.timeout_s, 10.0))
        return IngestSummary(r.received, r.accepted, r.duplicates, r.late, r.invalid, md.get("parity-first-invalid"), r.limited,
                             md.get("parity-first-limited"))

    # -- Admin ------------------------------------------------------------------------------
    def load_release(self, path: str, *, timeout_s: float = 120.0) -> LoadedRelease:
        req = pb.LoadReleaseRequest(path=str(path))
        r = self._call("LoadRelease", lambda t: self._adm.LoadRelease(req, timeout=t, metadata=self._admin), timeout_s)
        return LoadedRelease(r.release_id, r.previous_release_id, r.load_ms)

    def status(self, *, timeout_s: float | None = None) -> Status:
        r = self._call("GetStatus", lambda t: self._adm.GetStatus(pb.GetStatusRequest(), timeout=t, metadata=self._admin), timeout_s)
        sets = {k: {f.name: getattr(v, f.name) for f in v.DESCRIPTOR.fields} for k, v in r.feature_sets.items()}
        return Status(r.release_id, r.store, dict(r.feature_set_versions), r.requests_served, r.uptime_s, r.serving, r.now_ms, r.clock, r.catalogue_items,
                      sets, r.values_repairs_pending, r.values_repairs_done, r.worker, r.pid)

    def delete_user(self, user_id: int | str, reason: str, *, timeout_s: float = 300.0) -> dict:
        """Erase the user everywhere the server reaches; the counts and the audit id."""
        req = pb.DeleteUserRequest(user_id=str(user_id), reason=reason)
        r = self._call("DeleteUser", lambda t: self._adm.DeleteUser(req, timeout=t, metadata=self._admin), timeout_s)
        return {"online_keys_deleted": r.online_keys_deleted, "cache_entries_dropped": r.cache_entries_dropped,
                "served_log_rows_removed": r.served_log_rows_removed, "audit_id": r.audit_id}

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... (grpc.health.v1)."""
        r = self._call("Health.Check", lambda t: self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=t), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ParityClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
