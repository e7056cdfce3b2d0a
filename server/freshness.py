"""What the server served, per feature set: its serving mode, how stale the values were, and
what reading them cost.

Freshness is a per-set choice (streaming, materialised on a cadence, computed on read), and
the choice is only as good as what it delivers: staleness here is request time minus the
feature timestamp of each value served (a found record; missing ones are counted apart), and
bytes are what the request path read from the store for that set (cache hits read none).
Figures are kept over a bounded window of recent observations per set, so the status RPC can
say p50/p99 without a histogram's bucket rounding; Prometheus gets the same as histograms.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from server.metrics import Metrics

__all__ = ["FreshnessBook", "SetFreshness"]


@dataclass
class SetFreshness:
    mode: str
    keep: int = 4096
    staleness_ms: deque = field(default_factory=deque)
    served: int = 0  # values served from a found record
    missing: int = 0  # values served as missing (no record, or past the TTL)
    bytes_read: int = 0
    records_read: int = 0

    def summary(self) -> dict:
        s = np.maximum(np.asarray(self.staleness_ms, dtype=np.float64), 0.0)
        q = np.percentile(s, [50, 99]) if len(s) else [float("nan")] * 2
        return {"mode": self.mode, "served": self.served, "missing": self.missing, "staleness_p50_ms": float(q[0]),
                "staleness_p99_ms": float(q[1]), "bytes_read": self.bytes_read, "records_read": self.records_read,
                "bytes_per_record": (self.bytes_read / self.records_read) if self.records_read else 0.0}


class FreshnessBook:
    """Per-set figures; `mode_of(name)` says how each set is kept online."""

    def __init__(self, metrics: Metrics, mode_of: Callable[[str], str], keep: int = 4096) -> None:
        self.metrics = metrics
        self._mode_of = mode_of
        self.keep = keep
        self.sets: dict[str, SetFreshness] = {}

    def _set(self, name: str) -> SetFreshness:
        s = self.sets.get(name)
        mode = self._mode_of(name)
        if s is None:
            s = self.sets[name] = SetFreshness(mode, self.keep, deque(maxlen=self.keep))
            self.metrics.serving_mode.labels(name, mode).set(1)
        elif s.mode != mode:  # the mode changed while serving: figures start again under the new one
            self.metrics.serving_mode.labels(name, s.mode).set(0)
            s = self.sets[name] = SetFreshness(mode, self.keep, deque(maxlen=self.keep))
            self.metrics.serving_mode.labels(name, mode).set(1)
        return s

    def served(self, name: str, now_ms: int, feature_ts: np.ndarray) -> None:
        s = self._set(name)
        fts = np.asarray(feature_ts, dtype=np.int64)
        found = fts[fts >= 0]
        s.served += len(found)
        s.missing += len(fts) - len(found)
        if len(found):  # per request: cheap (no sort); the percentiles are taken when asked
            s.staleness_ms.extend((now_ms - found[-s.keep:]).tolist())
            self.metrics.served_staleness.labels(name).observe(max(0, now_ms - int(found.max())) / 1000.0)

    def read(self, by_set: Mapping[str, tuple[int, int]]) -> None:
        """Bytes and records the request path read from the store, per set."""
        for name, (records, nbytes) in by_set.items():
            s = self._set(name)
            s.records_read += records
            s.bytes_read += nbytes
            self.metrics.store_bytes.labels(name).inc(nbytes)

    def summary(self) -> dict[str, dict]:
        return {name: s.summary() for name, s in sorted(self.sets.items())}
