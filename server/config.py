"""Server configuration: one frozen dataclass, checked once at start-up.

Every knob has a default that suits the tiny and small releases on a 2-core machine; the
CLI (`parity serve`) sets the few that operators change (paths, ports, store, token, TLS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

from export.candidates import CandidatePolicy
from server.clock import CLOCK_MODES

__all__ = ["ServerConfig", "MATERIALIZE_MODES", "RETRIEVAL_MODES", "COMPUTE_MODES"]

MATERIALIZE_MODES = ("auto", "always", "never")
RETRIEVAL_MODES = ("ann", "exact")
COMPUTE_MODES = ("inline", "thread")


@dataclass(frozen=True)
class ServerConfig:
    release: Path  # the release folder served at start-up
    data_dir: Path  # the data dir: dataset.json (feature sets), items.parquet (catalogue), events/
    host: str = "127.0.0.1"  # loopback unless asked: --host 0.0.0.0 exposes the server
    port: int = 50051  # 0: pick a free port (tests)
    store: str = "memory"  # memory | redis://HOST:PORT/DB
    namespace: str = "parity"
    metrics_port: int | None = 9100  # None or 0: no metrics endpoint
    metrics_host: str | None = None  # None: the same address as `host`
    ops_port: int | None = None  # a second port with health and Admin only, never shed by request floods (0: pick one)
    reuse_port: bool = False  # bind with SO_REUSEPORT: one of `parity serve --workers N` on a shared port (server/workers.py)
    worker_index: int | None = None  # which worker of a fleet this process is (None: a lone server)
    admin_token: str | None = None  # None: every Admin RPC is refused
    ingest_token: str | None = None  # IngestEvents bearer token; None: the admin token; neither: ingest refused
    releases_root: Path | None = None  # LoadRelease only loads folders under it; None: the parent of `release`
    tls_cert: Path | None = None
    tls_key: Path | None = None
    served_log: Path | None = None  # the served log's folder (monitor/served_log.py); None: nothing logged
    log_sample: float = 0.1  # share of OK answers logged (errors and degraded answers always are)
    log_rotate_s: float = 300.0  # a served-log part is finished after this long or ...
    log_rotate_mb: float = 64.0  # ... this many MB, whichever comes first
    drift_window_s: float = 21600.0  # the live drift gauges' sliding window (event time; 6 h, as calibrated)
    rollout_poll_s: float = 1.0  # how often a worker reads the shared rollout state
    guard_interval_s: float = 2.0  # how often the canary guard decides
    shadow_queue: int = 1000  # shadow requests waiting for an idle moment (full: dropped, counted)
    shadow_cpu_share: float = 0.2  # at most this share of each second runs shadow requests (past it: dropped, counted)
    drift_interval_s: float = 60.0  # how often the drift window is folded and tested (0: no live drift watch)

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
    # Candidates (export.candidates.CandidatePolicy: the offline eval reads the same defaults).
    retrieve_k: int = CandidatePolicy.retrieve_k  # ANN candidates kept after filtering
    n_popular: int = CandidatePolicy.n_popular  # the release's popular items (cold start)
    n_fresh: int = CandidatePolicy.n_fresh  # most recently published items
    fresh_window_ms: int = CandidatePolicy.fresh_window_ms
    n_content: int = CandidatePolicy.n_content  # new items (not in the release) by their content embedding
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
    store_check_s: float = 1.0  # how often the store's sentinel is read (a store that lost its data is refilled)

    # Lifecycle and resources.
    drain_notice_s: float = 0.0  # on SIGTERM: report NOT_SERVING this long, still answering, before refusing new RPCs
    drain_grace_s: float = 10.0  # then wait this long for RPCs in flight
    clock: str = "auto"
    materialize: str = "auto"  # auto: when the store is memory or has no watermark for a served set
    modes: str = ""  # serving-mode overrides saved to the store at start, e.g. "user_activity=on_read,user_creator=materialized:15m"
    request_compute: str = "inline"  # a request's decode/retrieve/rank: on the event loop (inline) or the cpu pool (thread)
    cpu_threads: int = 2  # executor for release loads and item-table rebuilds (and request work when request_compute=thread)
    io_threads: int = 8  # executor for store round trips
    ort_threads: int = 1  # intra-op threads per ONNX Runtime session
    # Admission (server/admission.py). Recommend and Rank share the "serve" lane, GetFeatures
    # has its own, IngestEvents streams and Admin theirs; health checks are never limited.
    serve_max_running: int = 0  # requests in service at once; 0: auto (1 on the memory store, whose work never waits; on Redis
    # 2 x io_threads, so requests waiting on a slow store (up to store_budget_s) do not hold up the rest)
    serve_max_queue: int = 64
    serve_max_wait_s: float = 0.02  # the longest a request waits for a slot before it is refused
    features_max_running: int = 4
    features_max_queue: int = 32
    features_max_wait_s: float = 0.05
    admin_max_running: int = 2
    admin_max_queue: int = 8
    admin_max_wait_s: float = 30.0
    # gRPC's C core holds calls Python has not picked up yet; past the soft limit it drops
    # them at random, past the hard limit always (the client sees CANCELLED). Cheap shedding
    # that keeps goodput up far past capacity (server/admission.py). The limits count calls,
    # not time: the soft one must cover bursts of concurrent clients (Locust's 30 users lost
    # 48 % of their calls with 4,8 and none with 24,48), the hard one bounds the wait at
    # overload to ~48 requests' work (bench/RESULTS.md has both sides of this trade).
    core_pending_soft: int = 24
    core_pending_hard: int = 48
    max_deadline_s: float = 1.0  # every request's deadline is capped to this (Recommend, Rank, GetFeatures)
    default_deadline_s: float = 1.0  # budget of a request that carries no deadline (capped too)
    max_streams_per_connection: int = 100  # HTTP/2 concurrent streams on one connection
    max_ingest_streams: int = 256  # IngestEvents streams open at once, all clients
    max_ingest_streams_per_peer: int = 64  # ... from one client address (a host of producers)
    ingest_idle_timeout_s: float = 10.0  # a stream that sends nothing this long is ended
    max_events_per_stream: int = 1_000_000
    max_event_future_ms: int = 5 * 60_000  # live events further ahead of the server clock are invalid
    allowed_lateness_ms: int = 3_600_000
    ingest_chunk: int = 500  # events per streaming-ingest commit (one at a time on the ingest thread)
    # Per-user contribution caps at the ingest edge (features/contribution.py; 0: off): one user's
    # events per (item, event type) and in all per window of event time, beyond which they are refused.
    ingest_max_per_item: int = 20
    ingest_max_per_user: int = 2000
    ingest_rate_window_ms: int = 3_600_000

    extra: dict = field(default_factory=dict, compare=False)  # free-form, for forward compatibility

    def __post_init__(self) -> None:
        object.__setattr__(self, "release", Path(self.release))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.tls_cert is not None:
            object.__setattr__(self, "tls_cert", Path(self.tls_cert))
        if self.tls_key is not None:
            object.__setattr__(self, "tls_key", Path(self.tls_key))
        if self.releases_root is not None:
            object.__setattr__(self, "releases_root", Path(self.releases_root))
        if self.served_log is not None:
            object.__setattr__(self, "served_log", Path(self.served_log))
        self.validate()

    def validate(self) -> None:
        if not (isinstance(self.log_sample, (int, float)) and 0.0 <= self.log_sample <= 1.0):
            raise ValueError(f"log_sample must be a share in [0, 1], got {self.log_sample!r}")
        if not (isinstance(self.drift_interval_s, (int, float)) and math.isfinite(self.drift_interval_s) and self.drift_interval_s >= 0):
            raise ValueError(f"drift_interval_s must be a finite number >= 0, got {self.drift_interval_s!r}")
        for name in ("log_rotate_s", "log_rotate_mb", "drift_window_s", "rollout_poll_s", "guard_interval_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("admin token must not be empty")
        if self.ingest_token is not None and not self.ingest_token.strip():
            raise ValueError("ingest token must not be empty")
        if self.ops_port is not None and not 0 <= self.ops_port <= 65535:
            raise ValueError(f"ops_port must be in [0, 65535], got {self.ops_port}")
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
                         "cpu_threads", "io_threads", "ort_threads", "ingest_chunk", "seen_cap", "ingest_rate_window_ms", "features_max_running",
                         "admin_max_running", "max_streams_per_connection", "max_ingest_streams", "max_ingest_streams_per_peer",
                         "max_events_per_stream")
        for name in positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("as_of_tick_ms", "n_popular", "n_fresh", "n_content", "per_creator_cap", "pair_prefetch_limit", "fresh_window_ms",
                     "stale_feature_users", "max_event_future_ms", "allowed_lateness_ms", "serve_max_queue", "serve_max_running", "features_max_queue",
                     "admin_max_queue", "core_pending_soft", "core_pending_hard", "ingest_max_per_item", "ingest_max_per_user"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.core_pending_hard < self.core_pending_soft:
            raise ValueError(f"core_pending_hard ({self.core_pending_hard}) must be >= core_pending_soft ({self.core_pending_soft})")
        for name in ("response_cache_ttl_s", "feature_cache_ttl_s", "breaker_open_s", "drain_notice_s", "drain_grace_s", "serve_max_wait_s",
                     "features_max_wait_s", "admin_max_wait_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("store_timeout_s", "store_budget_s", "item_refresh_s", "store_check_s", "default_deadline_s", "max_deadline_s", "ingest_idle_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")

    @cached_property
    def candidates(self) -> CandidatePolicy:
        """The candidate quotas as the shared candidate function reads them."""
        return CandidatePolicy(retrieve_k=self.retrieve_k, n_content=self.n_content, n_fresh=self.n_fresh,
                               fresh_window_ms=self.fresh_window_ms, n_popular=self.n_popular)

    @property
    def serve_concurrency(self) -> int:
        if self.serve_max_running:
            return self.serve_max_running
        return 1 if self.store == "memory" else 2 * self.io_threads

    @property
    def metrics_bind(self) -> str:
        return self.metrics_host if self.metrics_host is not None else self.host

    @property
    def releases_dir(self) -> Path:
        """The one folder LoadRelease may load from."""
        return self.releases_root if self.releases_root is not None else self.release.parent

    @property
    def ingest_bearer(self) -> str | None:
        """The bearer token IngestEvents requires: its own when set (producers then never hold the
        admin token), else the admin token; None: ingest is refused."""
        return self.ingest_token or self.admin_token

    def with_(self, **changes) -> "ServerConfig":
        return replace(self, **changes)

    def describe(self) -> dict:
        """The configuration as logged at start-up (the admin token never appears)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("admin_token", "ingest_token"):
                v = "set" if v else "unset"
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out
