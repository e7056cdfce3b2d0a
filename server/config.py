"""Server configuration: one frozen dataclass, checked once at start-up.

Every knob has a default that suits the tiny and small releases on a 2-core machine; the
CLI (`parity serve`) sets the few that operators change (paths, ports, store, token, TLS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from server.clock import CLOCK_MODES

__all__ = ["ServerConfig", "MATERIALIZE_MODES", "RETRIEVAL_MODES", "COMPUTE_MODES"]

MATERIALIZE_MODES = ("auto", "always", "never")
RETRIEVAL_MODES = ("ann", "exact")
COMPUTE_MODES = ("inline", "thread")


@dataclass(frozen=True)
class ServerConfig:
    release: Path  # the release folder served at start-up
    data_dir: Path  # the data dir: dataset.json (feature sets), items.parquet (catalogue), events/
    host: str = "0.0.0.0"
    port: int = 50051  # 0: pick a free port (tests)
    store: str = "memory"  # memory | redis://HOST:PORT/DB
    namespace: str = "parity"
    metrics_port: int | None = 9100  # None or 0: no metrics endpoint
    metrics_host: str = "0.0.0.0"
    admin_token: str | None = None  # None: every Admin RPC is refused
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # Request limits (INVALID_ARGUMENT beyond them).
    max_k: int = 200
    max_rank_items: int = 1000
    max_exclude: int = 1000
    max_context: int = 64
    max_id_chars: int = 64

    # Models. The defaults are the product; the benchmarks' baseline server swaps in the torch
    # teacher (a plugin ranker), exact retrieval and no caches to measure what each buys.
    ranker: str = "student_int8"  # a ranker of the release (teacher_fp32, student_fp32, student_int8) or a registered plugin
    retrieval: str = "ann"  # ann: the release's ScaNN index; exact: numpy dot product over every item

    # Candidates and post-processing.
    retrieve_k: int = 200  # ANN candidates kept after filtering (the offline eval uses 200)
    n_popular: int = 50  # popularity candidates (cold start)
    n_fresh: int = 20  # most recently published items
    fresh_window_ms: int = 2 * 86_400_000
    n_content: int = 20  # new items (not in the release) by their content embedding
    per_creator_cap: int = 3  # at most this many items of one creator in a response (0: off)
    pair_prefetch_limit: int = 256  # read a pair set for every value of its key column when there are at most this many
    seen_cap: int = 1000  # items remembered per user as seen

    # Requests read features as of the server clock rounded down to this many ms, so concurrent
    # requests share one whole-catalogue item frame; live events show after at most one tick.
    as_of_tick_ms: int = 100

    # Caches.
    response_cache_ttl_s: float = 1.0
    feature_cache_ttl_s: float = 5.0
    stale_feature_users: int = 10_000  # last-good user records kept for store outages (~5-12 KB each)
    item_frame_cache: bool = True  # False: item features computed per request for the candidates only

    # The online store on the request path.
    store_timeout_s: float = 0.1  # socket timeout of the request path's store client
    store_budget_s: float = 0.15  # the longest a request waits for the store before falling back
    breaker_open_s: float = 1.0  # after a store failure, skip the store this long (degraded)
    item_refresh_s: float = 5.0  # how often the item feature table checks the store for changes

    # Lifecycle and resources.
    drain_notice_s: float = 0.0  # on SIGTERM: report NOT_SERVING this long, still answering, before refusing new RPCs
    drain_grace_s: float = 10.0  # then wait this long for RPCs in flight
    clock: str = "auto"
    materialize: str = "auto"  # auto: when the store is memory or has no watermark for a served set
    request_compute: str = "inline"  # a request's decode/retrieve/rank: on the event loop (inline) or the cpu pool (thread)
    cpu_threads: int = 2  # executor for release loads and item-table rebuilds (and request work when request_compute=thread)
    io_threads: int = 8  # executor for store round trips
    ort_threads: int = 1  # intra-op threads per ONNX Runtime session
    max_concurrent_rpcs: int | None = 512  # beyond: RESOURCE_EXHAUSTED (load shedding)
    default_deadline_s: float = 2.0  # budget of a request that carries no deadline
    max_event_future_ms: int = 5 * 60_000  # live events further ahead of the server clock are invalid
    allowed_lateness_ms: int = 3_600_000
    ingest_chunk: int = 1000  # events per streaming-ingest commit

    extra: dict = field(default_factory=dict, compare=False)  # free-form, for forward compatibility

    def __post_init__(self) -> None:
        object.__setattr__(self, "release", Path(self.release))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.tls_cert is not None:
            object.__setattr__(self, "tls_cert", Path(self.tls_cert))
        if self.tls_key is not None:
            object.__setattr__(self, "tls_key", Path(self.tls_key))
        self.validate()

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("admin token must not be empty")
        if self.clock not in CLOCK_MODES:
            raise ValueError(f"clock must be one of {CLOCK_MODES}, got {self.clock!r}")
        if self.request_compute not in COMPUTE_MODES:
            raise ValueError(f"request_compute must be one of {COMPUTE_MODES}, got {self.request_compute!r}")
        if self.retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, got {self.retrieval!r}")
        if not isinstance(self.ranker, str) or not self.ranker.strip():
            raise ValueError(f"ranker must name a ranker, got {self.ranker!r}")
        if not isinstance(self.item_frame_cache, bool):
            raise ValueError(f"item_frame_cache must be a bool, got {self.item_frame_cache!r}")
        if self.materialize not in MATERIALIZE_MODES:
            raise ValueError(f"materialize must be one of {MATERIALIZE_MODES}, got {self.materialize!r}")
        positive_ints = ("max_k", "max_rank_items", "max_exclude", "max_context", "max_id_chars", "retrieve_k",
                         "cpu_threads", "io_threads", "ort_threads", "ingest_chunk", "seen_cap")
        for name in positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("as_of_tick_ms", "n_popular", "n_fresh", "n_content", "per_creator_cap", "pair_prefetch_limit", "fresh_window_ms",
                     "stale_feature_users", "max_event_future_ms", "allowed_lateness_ms"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("response_cache_ttl_s", "feature_cache_ttl_s", "breaker_open_s", "drain_notice_s", "drain_grace_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("store_timeout_s", "store_budget_s", "item_refresh_s", "default_deadline_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")

    def with_(self, **changes) -> "ServerConfig":
        return replace(self, **changes)

    def describe(self) -> dict:
        """The configuration as logged at start-up (the admin token never appears)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "admin_token":
                v = "set" if v else "unset"
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out
