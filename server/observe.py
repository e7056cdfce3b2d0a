"""What each answered (or failed) request tells the rest of the system, off its answer's path.

The service hands every request's outcome here once; this builds the served-log record (when
the request is sampled: every error and degraded answer is kept) and an `Observation` for
the listeners that watch arms (the canary guard, the drift window). Nothing here awaits or
blocks: the served log's writer takes records on a bounded queue and drops (counted) when
full, and listeners only count.

Candidates sampled for drift are drawn uniformly from the whole candidate list (their rows
are what the release's reference was built on); the returned items are logged too, for
skew checks and feedback joins. The draw is seeded by the request id, so a replay logs the
same rows.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from export.candidates import SOURCES
from monitor.served_log import ServedRecord
from server.pipeline import Ranked
from server.served_log import should_log

__all__ = ["Observation", "RequestObserver", "ServedLogSink", "sample_rows"]

log = logging.getLogger(__name__)


class ServedLogSink(Protocol):
    def offer(self, record: ServedRecord) -> bool: ...


@dataclass(frozen=True)
class Observation:
    """One request, as arm-watching listeners see it."""

    arm: str
    release_id: str
    method: str
    user_id: int
    request_id: str
    ts_ms: int
    status: str  # ok | degraded | error:<CODE>
    latency_ms: float
    missing_rate: float  # NaN when no features were decoded (an error before)
    scores: np.ndarray  # every candidate's score (empty on error)
    sampled_inputs: np.ndarray | None  # (m, F) ranker inputs of uniformly sampled candidates
    sampled_scores: np.ndarray  # (m,)
    columns: tuple[str, ...]


def _seed(request_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def sample_rows(n: int, m: int, request_id: str) -> np.ndarray:
    """m row indices drawn uniformly without replacement from n, seeded by the request id."""
    if n <= m:
        return np.arange(n)
    return np.sort(np.random.default_rng(_seed(request_id)).choice(n, size=m, replace=False))


class RequestObserver:
    def __init__(self, *, served_log: ServedLogSink | None = None, log_sample: float = 0.1, sampled_candidates: int = 8,
                 listeners: Sequence[Callable[[Observation], None]] = (), feedback=None) -> None:
        self.served_log = served_log
        self.feedback = feedback  # server.served_log.FeedbackLogWriter: ingested feedback beside the served log
        self.log_sample = log_sample
        self.sampled_candidates = sampled_candidates
        self.listeners = list(listeners)
        self.logged = 0
        self.dropped = 0

    def add_listener(self, fn: Callable[[Observation], None]) -> None:
        self.listeners.append(fn)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish every open part (at shutdown, after requests have drained)."""
        for w in (self.served_log, self.feedback):
            if w is not None and hasattr(w, "close"):
                try:
                    w.close(timeout_s)
                except Exception:  # noqa: BLE001 - a log that cannot finish must not fail shutdown
                    log.exception("served log close failed")

    def observe(self, *, arm: str, release_id: str, method: str, user_id: int, request_id: str, ts_ms: int, status: str,
                reason: str | None, latency_ms: float, ranked: Ranked | None, top: np.ndarray | None, missing_rate: float,
                columns: tuple[str, ...]) -> None:
        will_log = self.served_log is not None and should_log(request_id, self.log_sample, status)
        if not self.listeners and not will_log:
            return  # nobody reads the sample: drawing it cost ~18 us per request
        n = len(ranked.ids) if ranked is not None else 0
        sampled = sample_rows(n, self.sampled_candidates, request_id) if n else np.empty(0, dtype=np.int64)
        X = ranked.inputs if ranked is not None else None
        if self.listeners:
            obs = Observation(arm, release_id, method, user_id, request_id, ts_ms, status, latency_ms, missing_rate,
                              ranked.scores if ranked is not None else np.empty(0, np.float32),
                              X[sampled] if X is not None and len(sampled) else None,
                              ranked.scores[sampled] if ranked is not None else np.empty(0, np.float32), columns)
            for fn in self.listeners:
                try:
                    fn(obs)
                except Exception:  # noqa: BLE001 - a watcher's bug must never fail a request
                    log.exception("request listener failed")
        if not will_log:
            return
        if ranked is not None and n:
            shown = np.asarray(top if top is not None else np.empty(0, np.int64), dtype=np.int64)
            rows = np.union1d(shown, sampled)
            pos = np.full(len(rows), -1, dtype=np.int32)
            where = {int(r): i for i, r in enumerate(shown.tolist())}
            for j, r in enumerate(rows.tolist()):
                pos[j] = where.get(r, -1)
            order = np.lexsort((rows, np.where(pos < 0, np.iinfo(np.int32).max, pos)))
            rows, pos = rows[order], pos[order]
            rec = ServedRecord(request_id, ts_ms, user_id, release_id, arm, method, status, reason, latency_ms, n,
                               ranked.ids[rows], pos, ranked.scores[rows], [SOURCES[int(s)] for s in ranked.source[rows]],
                               np.isin(rows, sampled), X[rows] if X is not None else None, columns)
        else:
            e = np.empty(0, dtype=np.int64)
            rec = ServedRecord(request_id, ts_ms, user_id, release_id, arm, method, status, reason, latency_ms, 0,
                               e, e.astype(np.int32), e.astype(np.float32), [], e.astype(bool), None, columns)
        if self.served_log.offer(rec):
            self.logged += 1
        else:
            self.dropped += 1
