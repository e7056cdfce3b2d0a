"""Streaming ingest: fold events into online states, exactly once in effect.

Delivery is at-least-once (a consumer may crash after writing and before acknowledging),
so every commit writes the new states, the applied event ids (dedupe markers) and the
watermark in ONE atomic store transaction: a redelivered event is either fully applied
already (and skipped as a duplicate) or not at all.

Lateness: the watermark is the newest event time ingested. An event older than the
watermark minus the allowed lateness would land in tiles that reads may already have
passed; it goes to the dead-letter sink with a counter, never silently dropped.

One ingestor writes a given namespace at a time (states are read, updated and written
back); scale out by partitioning entities across namespaces or consumers.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from features.definitions import FeatureSet
from features.events import MS_PER_DAY, MS_PER_HOUR, EventBatch
from features.lookup import record_keys
from features.online.base import OnlineStore, Write
from features.state import StateLayout, apply_events

__all__ = ["StreamingIngestor", "IngestResult", "DeadLetterSink", "MemoryDeadLetters", "IngestStats"]


class DeadLetterSink(Protocol):
    def put(self, events: EventBatch, reason: str) -> None: ...


@dataclass
class MemoryDeadLetters:
    """Keeps dead letters in process (tests, the embedded default)."""

    batches: list[tuple[EventBatch, str]] = field(default_factory=list)

    def put(self, events: EventBatch, reason: str) -> None:
        self.batches.append((events, reason))

    @property
    def count(self) -> int:
        return sum(len(b) for b, _ in self.batches)


@dataclass(frozen=True)
class IngestResult:
    received: int
    accepted: int
    duplicates: int
    late: int
    watermark: int  # newest event time ingested so far (-1: none)
    entities_written: int


@dataclass(frozen=True)
class IngestStats:
    watermark: int
    accepted: int
    duplicates: int
    late: int
    materialized_before: dict[str, int]


class StreamingIngestor:
    def __init__(
        self,
        store: OnlineStore,
        sets: Sequence[FeatureSet],
        *,
        name: str = "ingest",
        allowed_lateness_ms: int = MS_PER_HOUR,
        dedupe_ttl_ms: int = 7 * MS_PER_DAY,
        dead_letters: DeadLetterSink | None = None,
    ) -> None:
        if allowed_lateness_ms < 0:
            raise ValueError(f"allowed_lateness_ms must be >= 0, got {allowed_lateness_ms}")
        if dedupe_ttl_ms <= allowed_lateness_ms:
            raise ValueError("dedupe_ttl_ms must exceed allowed_lateness_ms, or a redelivered late-but-allowed event could count twice")
        self.store = store
        self.layouts = [StateLayout(fs) for fs in sets]
        self.name = name
        self.allowed_lateness_ms = allowed_lateness_ms
        self.dedupe_ttl_ms = dedupe_ttl_ms
        self.dead_letters = dead_letters if dead_letters is not None else MemoryDeadLetters()
        self._lock = threading.Lock()

    # -- metadata kept in the store, so a restarted ingestor resumes where it was --------
    def _meta_key(self) -> str:
        return f"stream:{self.name}"

    def stats(self) -> IngestStats:
        raw = self.store.get_meta(self._meta_key())
        d = json.loads(raw) if raw else {}
        return IngestStats(
            watermark=int(d.get("watermark", -1)),
            accepted=int(d.get("accepted", 0)),
            duplicates=int(d.get("duplicates", 0)),
            late=int(d.get("late", 0)),
            materialized_before={lay.feature_set.name: self._materialized_before(lay.feature_set) for lay in self.layouts},
        )

    def _materialized_before(self, fs: FeatureSet) -> int:
        v = self.store.get_meta(f"materialized:{fs.name}:{fs.version}")
        return int(json.loads(v)["until_ts"]) if v else -1

    def ingest(self, events: EventBatch) -> IngestResult:
        with self._lock:
            return self._ingest(events)

    def _ingest(self, events: EventBatch) -> IngestResult:
        received = len(events)
        st = self.stats()
        if received == 0:
            return IngestResult(0, 0, 0, 0, st.watermark, 0)
        batch = events.deduplicated()
        dup = received - len(batch)
        seen = np.asarray(self.store.seen(batch.event_id.tolist()), dtype=bool)
        dup += int(seen.sum())
        batch = batch.take(np.flatnonzero(~seen))
        # The watermark advances event by event in arrival order, within a batch too.
        before = np.maximum.accumulate(np.concatenate([[st.watermark], batch.ts]))[:-1]
        late_mask = (before >= 0) & (batch.ts < before - self.allowed_lateness_ms)
        late = int(late_mask.sum())
        late_ids = batch.event_id[late_mask]
        if late:
            self.dead_letters.put(batch.take(np.flatnonzero(late_mask)), f"late: more than {self.allowed_lateness_ms} ms behind the watermark")
        batch = batch.take(np.flatnonzero(~late_mask))
        writes: list[Write] = []
        for lay in self.layouts:
            fs = lay.feature_set
            m = fs.event_mask(batch)
            # Events already folded in by a materialisation up to `until` are not re-applied.
            m &= batch.ts >= st.materialized_before[fs.name]
            if not m.any():
                continue
            sub = batch.take(np.flatnonzero(m))
            codes = fs.entity.codes(sub)[0]
            uniq, rows = np.unique(codes, return_inverse=True)
            keys = record_keys(fs, uniq)
            states, _ = lay.decode(self.store.get_many(keys))
            apply_events(lay, states, rows.astype(np.int64), sub)
            writes += [Write(k, v, fs.ttl_ms) for k, v in zip(keys, lay.encode(states))]
        watermark = max(st.watermark, int(batch.ts.max())) if len(batch) else st.watermark
        meta = {
            self._meta_key(): json.dumps(
                {"watermark": watermark, "accepted": st.accepted + len(batch), "duplicates": st.duplicates + dup, "late": st.late + late}
            )
        }
        # Late events are marked too: a redelivery must not count them again.
        applied = np.concatenate([batch.event_id, late_ids]).tolist()
        self.store.commit(writes, dedupe_ids=applied, dedupe_ttl_ms=self.dedupe_ttl_ms, meta=meta)
        return IngestResult(received, len(batch), dup, late, watermark, len(writes))
