"""The canary guard: per-arm counters over a sliding window, and the decision they support.

Why it is shaped like this:

- Pure: the clock is an argument (`now_ms`), so tests move time by hand and nothing sleeps.
- Every counter is an integer (a latency lands in a bucket of fixed log-spaced edges, a
  missing rate is summed in millionths, watch time in tenths of a second) so the counting
  can live in the shared online store (`OnlineStore.incr_many`) once several worker
  processes serve one rollout: `GuardCounters` is the small interface, `LocalGuardCounters`
  keeps them in this process, `StoreGuardCounters` in the store, under keys with a TTL.
- Two scopes. Health numbers (requests, errors, latency, missing features, predictions)
  are counted per time bucket and read over the last `window_s`, so an old incident ages
  out. Business numbers from joined feedback (impressions, plays, watch time) are counted
  since the rollout started, because the sequential test that judges them
  (monitor.sequential, an always-valid mSPRT) needs a growing sample to stay honest.
- p99 comes from the latency histogram (geometric interpolation inside the bucket, edges
  about 12 % apart), prediction drift is the PSI of an arm's live scores against its own
  release's reference histogram (the manifest's `reference.prediction`), and the canary is
  blamed for drift only by how much its PSI exceeds the primary's (traffic shifts move both).

Thresholds (`GuardThresholds`, the names `RolloutSpec.thresholds` accepts; range in brackets):

- p99_ratio [1, 100], default 1.5; p99_floor_ms [0, 60000], default 25: roll back when the
  canary's p99 > primary p99 x p99_ratio AND > p99_floor_ms (a 2 ms vs 1 ms p99 is no incident).
- error_margin [0, 1], default 0.01: canary error rate > primary's + margin.
- missing_margin [0, 1], default 0.05: canary mean feature-missing rate > primary's + margin.
- psi_margin [0, 100], default 0.2: canary prediction PSI > primary's PSI + margin.
- alpha (0, 0.5], default 0.05: the family-wise level of the two sequential business tests
  (CTR and watch time per request run at alpha / 2 each, Bonferroni, so a healthy canary is
  rolled back by either at most alpha of the time, under the tests' independence assumptions:
  see "Known limit" below).
- msprt_tau (0, 10], default 0.1: the mixture scale of that test, in pooled standard deviations.
- min_requests [1, 1e9], default 200: requests per arm in the window before health checks judge.
- min_feedback [1, 1e9], default 100: requests with joined feedback per arm before business tests judge.
- window_s [1, 86400], default 120; bucket_s [1, 3600], default 10 (the window is whole buckets).
- clean_period_s [0, 2592000], default 600: with auto_promote, promote once the canary ran this
  long, has min_requests and min_feedback, and nothing triggered a rollback.

Known limit (measured, tests/server/test_canary_guard.py and the h3 report): the business
tests treat impressions (CTR) and requests (watch time) as independent draws, but arms are
assigned per user, so the canary's sample is clustered by user. With closed-loop feedback
(features.closed_loop), 20 % canary, a decision every 50 requests over 5000 requests, 100
A/A runs each: 109 active users (~46 requests each) rolled back 10 healthy canaries (2 when
arms were drawn per request instead), 1482 users rolled back 1 (1 per request). A
user-clustered variance needs per-user sums in the counters; until then a small population
of heavy users needs a lower alpha.
"""
from __future__ import annotations

import abc
import json
import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from features.online.base import OnlineStore
from monitor.sequential import AlwaysValidPValue, two_means, two_proportions
from server.errors import InvalidArgument

__all__ = [
    "LATENCY_EDGES_MS",
    "MISSING_SCALE",
    "WATCH_SCALE",
    "ArmSnapshot",
    "CanaryGuard",
    "Decision",
    "GuardCounters",
    "GuardThresholds",
    "LocalGuardCounters",
    "PredictionReference",
    "StoreGuardCounters",
    "p_quantile_ms",
    "psi_from_counts",
]

GUARD_ARMS = ("primary", "canary")
# Fixed latency bucket edges (ms): 0.25 ms .. 30 s, 97 edges, each ~12.9 % above the last.
LATENCY_EDGES_MS = np.geomspace(0.25, 30_000.0, 97)
MISSING_SCALE = 1_000_000  # a per-request missing rate is counted in millionths
WATCH_SCALE = 10  # watch seconds are counted in tenths (sum of squares in hundredths)
_PSI_EPS = 1e-4  # as export.reference.psi

# Ranges per threshold: (low, high, low inclusive, integer)
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "p99_ratio": (1.0, 100.0, True, False),
    "p99_floor_ms": (0.0, 60_000.0, True, False),
    "error_margin": (0.0, 1.0, True, False),
    "missing_margin": (0.0, 1.0, True, False),
    "psi_margin": (0.0, 100.0, True, False),
    "alpha": (0.0, 0.5, False, False),
    "msprt_tau": (0.0, 10.0, False, False),
    "min_requests": (1, 1e9, True, True),
    "min_feedback": (1, 1e9, True, True),
    "window_s": (1.0, 86_400.0, True, False),
    "bucket_s": (1.0, 3_600.0, True, False),
    "clean_period_s": (0.0, 2_592_000.0, True, False),
}


@dataclass(frozen=True)
class GuardThresholds:
    """When the guard rolls a canary back or promotes it (see the module docstring for each)."""

    p99_ratio: float = 1.5
    p99_floor_ms: float = 25.0
    error_margin: float = 0.01
    missing_margin: float = 0.05
    psi_margin: float = 0.2
    alpha: float = 0.05
    msprt_tau: float = 0.1
    min_requests: int = 200
    min_feedback: int = 100
    window_s: float = 120.0
    bucket_s: float = 10.0
    clean_period_s: float = 600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            lo, hi, lo_incl, integer = _RANGES[f.name]
            where = f"thresholds.{f.name}"
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InvalidArgument(where, f"must be a finite number, got {v!r}")
            if v > hi or v < lo or (v == lo and not lo_incl):
                raise InvalidArgument(where, f"must be in {'[' if lo_incl else '('}{lo:g}, {hi:g}], got {v!r}")
            if integer:
                if v != int(v):
                    raise InvalidArgument(where, f"must be a whole number, got {v!r}")
                object.__setattr__(self, f.name, int(v))
            else:
                object.__setattr__(self, f.name, float(v))
        if self.window_s < self.bucket_s:
            raise InvalidArgument("thresholds.window_s", f"must be >= bucket_s ({self.bucket_s:g}), got {self.window_s:g}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, float] | None) -> GuardThresholds:
        """Defaults with `overrides` applied; an unknown name is an error that lists the known ones."""
        overrides = dict(overrides or {})
        allowed = cls.names()
        for name in overrides:
            if name not in allowed:
                raise InvalidArgument(f"thresholds.{name}", f"unknown threshold; known: {', '.join(allowed)}")
        return cls(**overrides)

    @property
    def bucket_ms(self) -> int:
        return max(1, round(self.bucket_s * 1000))

    @property
    def window_buckets(self) -> int:
        return max(1, math.ceil(self.window_s * 1000 / self.bucket_ms))


@dataclass(frozen=True)
class PredictionReference:
    """An arm's release's reference histogram of predictions (manifest reference.prediction)."""

    edges: tuple[float, ...]
    shares: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        object.__setattr__(self, "shares", tuple(float(s) for s in self.shares))
        if self.shares and len(self.shares) != len(self.edges) + 1:
            raise ValueError(f"a prediction reference needs len(edges) + 1 shares, got {len(self.edges)} edges and {len(self.shares)} shares")
        if any(b < a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("prediction reference edges must be ascending")

    @classmethod
    def from_manifest(cls, reference: Mapping[str, Any] | None) -> PredictionReference:
        """From a manifest's `reference` object (its `prediction` entry); empty when absent (PSI 0)."""
        pred = (reference or {}).get("prediction") or {}
        return cls(tuple(pred.get("edges", ())), tuple(pred.get("shares", ())))

    @property
    def bins(self) -> int:
        return len(self.shares)

    def bin_counts(self, predictions: Iterable[float]) -> np.ndarray:
        """Counts per reference bin of the finite predictions (as export.reference.psi bins them)."""
        v = np.asarray(list(predictions) if not isinstance(predictions, np.ndarray) else predictions, dtype=np.float64)
        v = v[np.isfinite(v)]
        if not self.bins or not len(v):
            return np.zeros(self.bins, dtype=np.int64)
        return np.bincount(np.searchsorted(np.asarray(self.edges), v, side="right"), minlength=self.bins).astype(np.int64)


def psi_from_counts(reference: PredictionReference, counts: Sequence[int] | np.ndarray, eps: float = _PSI_EPS) -> float:
    """PSI of a live histogram (counts on the reference's bins) against the reference shares;
    the same number export.reference.psi gives for the values those counts came from."""
    c = np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    if not reference.bins or total <= 0:
        return 0.0
    ref = np.maximum(np.asarray(reference.shares), eps)
    obs = np.maximum(c / total, eps)
    return float(np.sum((obs - ref) * np.log(obs / ref)))


def p_quantile_ms(hist: Sequence[int] | np.ndarray, q: float = 0.99) -> float:
    """The q-quantile of a latency histogram on LATENCY_EDGES_MS (bucket i holds
    [edge[i-1], edge[i]), bucket 0 below edge[0], the last at or above edge[-1]);
    interpolated geometrically inside its bucket. 0 for an empty histogram."""
    h = np.asarray(hist, dtype=np.float64)
    n = h.sum()
    if n <= 0:
        return 0.0
    target = q * n
    cum = np.cumsum(h)
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(h) - 1)
    edges = LATENCY_EDGES_MS
    if i == 0:
        return float(edges[0])
    if i >= len(edges):
        return float(edges[-1])
    lo, hi = edges[i - 1], edges[i]
    before = cum[i - 1]
    frac = (target - before) / h[i] if h[i] > 0 else 1.0
    return float(lo * (hi / lo) ** min(max(frac, 0.0), 1.0))


def _lat_bucket(latency_ms: float) -> int:
    return int(np.searchsorted(LATENCY_EDGES_MS, latency_ms, side="right"))


# -- counters ---------------------------------------------------------------------------------
WINDOW, TOTAL = "w", "t"


class GuardCounters(abc.ABC):
    """Integer tallies per (arm, scope) where scope is a time bucket (an int) or TOTAL.

    `add` may buffer; `flush` makes buffered increments visible to `read` (in-process: no-op).
    Counter names: requests, errors, missing_e6, lat_<i>, pred_<i>, impressions, plays,
    fb_requests, watch_ds, watch_ds2 (see CanaryGuard)."""

    @abc.abstractmethod
    def add(self, arm: str, scope: int | str, amounts: Mapping[str, int]) -> None: ...

    @abc.abstractmethod
    def read(self, arm: str, scopes: Sequence[int | str], names: Sequence[str]) -> dict[str, int]:
        """The named counters summed over the scopes (absent ones count 0)."""

    def flush(self) -> None:
        return None


class LocalGuardCounters(GuardCounters):
    """In this process (one worker, or tests). Buckets older than `keep_buckets` behind the
    newest one are dropped as new ones arrive, so memory stays bounded."""

    def __init__(self, keep_buckets: int = 64) -> None:
        self._c: dict[tuple[str, int | str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._newest = -1
        self._keep = keep_buckets
        self._lock = threading.Lock()

    def add(self, arm: str, scope: int | str, amounts: Mapping[str, int]) -> None:
        with self._lock:
            d = self._c[(arm, scope)]
            for k, v in amounts.items():
                if v:
                    d[k] += int(v)
            if isinstance(scope, int) and scope > self._newest:
                self._newest = scope
                for key in [k for k in self._c if isinstance(k[1], int) and k[1] < scope - self._keep]:
                    del self._c[key]

    def read(self, arm: str, scopes: Sequence[int | str], names: Sequence[str]) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(names, 0)
            for s in scopes:
                d = self._c.get((arm, s))
                if d:
                    for n in names:
                        out[n] += d.get(n, 0)
            return out


class StoreGuardCounters(GuardCounters):
    """In the shared online store, so every worker's requests count toward one window.

    Names are `{prefix}:{arm}:{scope}:{counter}` (put the rollout version in the prefix: a
    new rollout starts from zero). Window buckets expire `bucket_ttl_ms` after creation,
    totals after `total_ttl_ms` (the longest a rollout is expected to run). `add` buffers in
    this process; `flush` sends everything in one incr_many (one round trip), and `read`
    is one incr_many by 0 (the store's counters have no plain read; adding 0 is one).
    """

    def __init__(self, store: OnlineStore, prefix: str, *, bucket_ttl_ms: int, total_ttl_ms: int = 7 * 86_400_000) -> None:
        if not prefix or any(c.isspace() or c in "{}" for c in prefix):
            raise ValueError(f"prefix {prefix!r} must be non-empty without spaces or braces")
        if bucket_ttl_ms <= 0 or total_ttl_ms <= 0:
            raise ValueError(f"TTLs must be > 0 ms, got {bucket_ttl_ms} and {total_ttl_ms}")
        self.store = store
        self.prefix = prefix
        self.bucket_ttl_ms = int(bucket_ttl_ms)
        self.total_ttl_ms = int(total_ttl_ms)
        self._buf: dict[tuple[str, int | str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._lock = threading.Lock()

    def _name(self, arm: str, scope: int | str, counter: str) -> str:
        return f"{self.prefix}:{arm}:{scope}:{counter}"

    def _ttl(self, scope: int | str) -> int:
        return self.total_ttl_ms if scope == TOTAL else self.bucket_ttl_ms

    def add(self, arm: str, scope: int | str, amounts: Mapping[str, int]) -> None:
        with self._lock:
            d = self._buf[(arm, scope)]
            for k, v in amounts.items():
                if v:
                    d[k] += int(v)

    def flush(self) -> None:
        """Send the buffered increments (one incr_many per TTL class). On a store failure
        the increments are kept and sent with the next flush."""
        with self._lock:
            buf, self._buf = self._buf, defaultdict(lambda: defaultdict(int))
        by_ttl: dict[int, tuple[list[str], list[int]]] = {}
        for (arm, scope), d in buf.items():
            names, amounts = by_ttl.setdefault(self._ttl(scope), ([], []))
            for k, v in d.items():
                names.append(self._name(arm, scope, k))
                amounts.append(v)
        sent: list[int] = []
        try:
            for ttl, (names, amounts) in by_ttl.items():
                if names:
                    self.store.incr_many(names, amounts, ttl)
                sent.append(ttl)
        except Exception:
            with self._lock:  # put back what was not sent
                for (arm, scope), d in buf.items():
                    if self._ttl(scope) in sent:
                        continue
                    for k, v in d.items():
                        self._buf[(arm, scope)][k] += v
            raise

    def read(self, arm: str, scopes: Sequence[int | str], names: Sequence[str]) -> dict[str, int]:
        out = dict.fromkeys(names, 0)
        for ttl in sorted({self._ttl(s) for s in scopes}):
            keys = [(s, n) for s in scopes if self._ttl(s) == ttl for n in names]
            vals = self.store.incr_many([self._name(arm, s, n) for s, n in keys], [0] * len(keys), ttl)
            for (_, n), v in zip(keys, vals):
                out[n] += int(v)
        return out


# -- the guard --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What the guard decided at `now_ms`, why, and the numbers it looked at (for the record)."""

    action: Literal["none", "rollback", "promote"]
    reason: str
    numbers: dict
    now_ms: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=float)


@dataclass(frozen=True)
class ArmSnapshot:
    """One arm's numbers: the proto's ArmStats fields (window health, business since start)."""

    arm: str
    release_id: str
    requests: int
    errors: int
    p99_ms: float
    missing_rate: float
    prediction_psi: float
    ctr: float
    watch_s_per_request: float
    impressions: int = 0
    plays: int = 0
    feedback_requests: int = 0
    watch_ds: int = 0  # sum of per-request watch time, tenths of a second (since the rollout started)
    watch_ds2: int = 0  # sum of its squares

    def as_arm_stats(self) -> dict[str, Any]:
        """Keyword arguments for parity.v1.ArmStats."""
        return {k: getattr(self, k) for k in ("arm", "release_id", "requests", "errors", "p99_ms", "missing_rate", "prediction_psi",
                                               "ctr", "watch_s_per_request")}


_FB_NAMES = ("impressions", "plays", "fb_requests", "watch_ds", "watch_ds2")


class CanaryGuard:
    """Counts what each arm served and decides rollback / promote / nothing.

    Feed it from the request path (`record_request`, once per answered or failed request of
    the primary or canary arm) and from the feedback join (`record_feedback`, once per
    request whose impressions/plays arrived), and ask `decide(now_ms)` every few seconds.
    One guard per rollout version: a new rollout needs fresh counters and p-values.
    """

    def __init__(self, thresholds: GuardThresholds, references: Mapping[str, PredictionReference], *, started_ms: int,
                 counters: GuardCounters | None = None, auto_promote: bool = False,
                 release_ids: Mapping[str, str] | None = None) -> None:
        for arm in GUARD_ARMS:
            if arm not in references:
                raise ValueError(f"references needs an entry for the {arm} arm")
        self.t = thresholds
        self.refs = dict(references)
        self.started_ms = int(started_ms)
        self.counters = counters if counters is not None else LocalGuardCounters(keep_buckets=thresholds.window_buckets + 2)
        self.auto_promote = auto_promote
        self.release_ids = dict(release_ids or {})
        self._p = {"ctr": AlwaysValidPValue(), "watch": AlwaysValidPValue()}
        self._lat_names = tuple(f"lat_{i}" for i in range(len(LATENCY_EDGES_MS) + 1))
        self._pred_names = {arm: tuple(f"pred_{i}" for i in range(self.refs[arm].bins)) for arm in GUARD_ARMS}

    # -- feeding ---------------------------------------------------------------------------
    def _bucket(self, now_ms: int) -> int:
        return int(now_ms) // self.t.bucket_ms

    @staticmethod
    def _arm(arm: str) -> str:
        if arm not in GUARD_ARMS:
            raise ValueError(f"arm must be one of {GUARD_ARMS}, got {arm!r}")
        return arm

    def record_request(self, arm: str, now_ms: int, *, latency_ms: float, error: bool = False, missing_rate: float = 0.0,
                       predictions: Sequence[float] | np.ndarray = ()) -> None:
        """One request of `arm`: its end-to-end latency, whether it failed, the share of the
        ranker's feature values that were missing (0..1) and the scores it returned."""
        arm = self._arm(arm)
        amounts: dict[str, int] = {"requests": 1}
        if error:
            amounts["errors"] = 1
        m = float(missing_rate) if math.isfinite(missing_rate) else 1.0
        amounts["missing_e6"] = round(min(max(m, 0.0), 1.0) * MISSING_SCALE)
        lat = float(latency_ms) if math.isfinite(latency_ms) else float(LATENCY_EDGES_MS[-1])
        amounts[f"lat_{_lat_bucket(lat)}"] = 1
        counts = self.refs[arm].bin_counts(predictions)
        for i in np.flatnonzero(counts):
            amounts[f"pred_{int(i)}"] = int(counts[i])
        self.counters.add(arm, self._bucket(now_ms), amounts)

    def record_feedback(self, arm: str, *, impressions: int, plays: int, watch_s: float) -> None:
        """Feedback joined to one request of `arm` (all of its events, aggregated by the caller:
        the watch-time test needs per-request sums; a request split over calls still counts
        its mean right but inflates n). Plays above impressions count as impressions."""
        arm = self._arm(arm)
        if impressions < 0 or plays < 0 or not math.isfinite(watch_s) or watch_s < 0:
            raise ValueError(f"feedback counts must be >= 0 and finite, got {impressions}, {plays}, {watch_s}")
        w = round(watch_s * WATCH_SCALE)
        self.counters.add(arm, TOTAL, {"impressions": int(max(impressions, plays)), "plays": int(plays),
                                       "fb_requests": 1, "watch_ds": w, "watch_ds2": w * w})

    # -- reading ---------------------------------------------------------------------------
    def _window_scopes(self, now_ms: int) -> list[int]:
        b = self._bucket(now_ms)
        return list(range(b - self.t.window_buckets + 1, b + 1))

    def snapshot(self, now_ms: int) -> dict[str, ArmSnapshot]:
        """Both arms' numbers now (flushes buffered counters first)."""
        self.counters.flush()
        scopes = self._window_scopes(now_ms)
        out = {}
        for arm in GUARD_ARMS:
            names = ("requests", "errors", "missing_e6") + self._lat_names + self._pred_names[arm]
            w = self.counters.read(arm, scopes, names)
            fb = self.counters.read(arm, [TOTAL], _FB_NAMES)
            n = w["requests"]
            hist = [w[k] for k in self._lat_names]
            pred = [w[k] for k in self._pred_names[arm]]
            out[arm] = ArmSnapshot(
                arm=arm, release_id=self.release_ids.get(arm, ""), requests=n, errors=w["errors"], p99_ms=p_quantile_ms(hist, 0.99),
                missing_rate=(w["missing_e6"] / MISSING_SCALE / n) if n else 0.0, prediction_psi=psi_from_counts(self.refs[arm], pred),
                ctr=(fb["plays"] / fb["impressions"]) if fb["impressions"] else 0.0,
                watch_s_per_request=(fb["watch_ds"] / WATCH_SCALE / fb["fb_requests"]) if fb["fb_requests"] else 0.0,
                impressions=fb["impressions"], plays=fb["plays"], feedback_requests=fb["fb_requests"], watch_ds=fb["watch_ds"],
                watch_ds2=fb["watch_ds2"])
        return out

    def decide(self, now_ms: int) -> Decision:
        """Rollback if any check fails (health checks once both arms have min_requests in the
        window, business tests once both have min_feedback), promote if auto_promote and the
        clean period passed with enough samples, else none. The first failing check is the
        reason; `numbers` holds everything that was looked at."""
        snap = self.snapshot(now_ms)
        c, p = snap["canary"], snap["primary"]
        t = self.t
        numbers: dict[str, Any] = {"window_s": t.window_s, "since_start_s": (now_ms - self.started_ms) / 1000.0}
        for arm in (p, c):
            numbers[arm.arm] = {k: v for k, v in asdict(arm).items() if k != "arm"}
        reasons: list[str] = []
        health = c.requests >= t.min_requests and p.requests >= t.min_requests
        numbers["health_judged"] = health
        if health:
            err_c, err_p = c.errors / c.requests, p.errors / p.requests
            if c.p99_ms > p.p99_ms * t.p99_ratio and c.p99_ms > t.p99_floor_ms:
                reasons.append(f"latency: canary p99 {c.p99_ms:.1f} ms > primary p99 {p.p99_ms:.1f} ms x {t.p99_ratio:g} "
                               f"and > {t.p99_floor_ms:g} ms")
            if err_c > err_p + t.error_margin:
                reasons.append(f"errors: canary error rate {err_c:.4f} > primary {err_p:.4f} + {t.error_margin:g}")
            if c.missing_rate > p.missing_rate + t.missing_margin:
                reasons.append(f"missing features: canary {c.missing_rate:.4f} > primary {p.missing_rate:.4f} + {t.missing_margin:g}")
            if c.prediction_psi > p.prediction_psi + t.psi_margin:
                reasons.append(f"prediction drift: canary PSI {c.prediction_psi:.3f} > primary PSI {p.prediction_psi:.3f} + {t.psi_margin:g}")
        business = c.feedback_requests >= t.min_feedback and p.feedback_requests >= t.min_feedback
        numbers["business_judged"] = business
        if business:
            ctr = two_proportions(c.plays, c.impressions, p.plays, p.impressions, tau=t.msprt_tau)
            watch = two_means(c.feedback_requests, c.watch_ds / WATCH_SCALE, c.watch_ds2 / WATCH_SCALE**2,
                              p.feedback_requests, p.watch_ds / WATCH_SCALE, p.watch_ds2 / WATCH_SCALE**2, tau=t.msprt_tau)
            p_ctr, p_watch = self._p["ctr"].update(ctr), self._p["watch"].update(watch)
            numbers["ctr_test"] = {**ctr.as_dict(), "always_valid_p": p_ctr}
            numbers["watch_test"] = {**watch.as_dict(), "always_valid_p": p_watch}
            level = t.alpha / 2  # two tests, one family-wise alpha (Bonferroni)
            numbers["business_level"] = level
            if p_ctr <= level:
                reasons.append(f"CTR: canary {c.ctr:.4f} worse than primary {p.ctr:.4f} (always-valid p {p_ctr:.4g} <= {level:g})")
            if p_watch <= level:
                reasons.append(f"watch time: canary {c.watch_s_per_request:.2f} s/request worse than primary "
                               f"{p.watch_s_per_request:.2f} (always-valid p {p_watch:.4g} <= {level:g})")
        if reasons:
            numbers["all_reasons"] = reasons
            return Decision("rollback", reasons[0], numbers, int(now_ms))
        if self.auto_promote and health and business and now_ms - self.started_ms >= t.clean_period_s * 1000:
            return Decision("promote", f"clean for {(now_ms - self.started_ms) / 1000:.0f} s with {c.requests} canary requests "
                            f"in the window and {c.feedback_requests} with feedback", numbers, int(now_ms))
        return Decision("none", "healthy" if health else "collecting samples", numbers, int(now_ms))

    def arm_stats(self, now_ms: int) -> list[ArmSnapshot]:
        """For GetRollout's ArmStats (primary first)."""
        snap = self.snapshot(now_ms)
        return [snap["primary"], snap["canary"]]
