"""A Redis Streams consumer that feeds the streaming ingestor.

Consumer-group semantics give at-least-once delivery: a message stays pending until it is
acknowledged, and we acknowledge only after the ingestor's atomic commit. On restart the
consumer first re-reads its own pending messages, then claims messages left pending by
dead consumers (XAUTOCLAIM), then reads new ones. Redelivered events are dropped by the
ingestor's event-id dedupe, so kill -9 at any point loses nothing and counts nothing twice.
Malformed messages and events past the allowed lateness go to a dead-letter stream.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import redis

from features.events import EVENT_SCHEMA, EventBatch
from features.streaming import StreamingIngestor

__all__ = ["RedisStreamConsumer", "RedisDeadLetters", "publish_events", "ConsumerStats", "event_fields", "parse_messages"]

log = logging.getLogger(__name__)
_FIELDS = EVENT_SCHEMA.names


def event_fields(events: EventBatch) -> list[dict[str, str]]:
    cols = {name: getattr(events, name).tolist() for name in _FIELDS}
    return [{name: repr(cols[name][i]) if name == "value" else str(cols[name][i]) for name in _FIELDS} for i in range(len(events))]


def publish_events(client: redis.Redis, stream: str, events: EventBatch, chunk: int = 1000) -> int:
    """XADD every event (pipelined); returns the number published."""
    fields = event_fields(events)
    for a in range(0, len(fields), chunk):
        pipe = client.pipeline(transaction=False)
        for f in fields[a : a + chunk]:
            pipe.xadd(stream, f)
        pipe.execute()
    return len(fields)


def parse_messages(messages: Sequence[tuple[Any, dict]]) -> tuple[EventBatch, list[tuple[Any, dict, str]]]:
    """(valid events, [(message id, fields, reason)] for malformed messages)."""
    rows, bad = [], []
    for mid, raw in messages:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
        try:
            missing = [n for n in _FIELDS if n not in f]
            if missing:
                raise ValueError(f"missing fields {missing}")
            row = {n: (float(f[n]) if n == "value" else int(f[n])) for n in _FIELDS}
            if not np.isfinite(row["value"]) or row["ts"] < 0:
                raise ValueError("value must be finite and ts >= 0")
            rows.append(row)
        except ValueError as exc:
            bad.append((mid, f, str(exc)))
    return (EventBatch.from_rows(rows) if rows else EventBatch.empty()), bad


class RedisDeadLetters:
    """Dead letters as entries of a Redis stream, with the reason beside the event."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client, self.stream = client, stream

    def put(self, events: EventBatch, reason: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for f in event_fields(events):
            pipe.xadd(self.stream, {**f, "reason": reason})
        pipe.execute()

    def put_raw(self, fields: dict, reason: str) -> None:
        self.client.xadd(self.stream, {**{str(k): str(v) for k, v in fields.items()}, "reason": reason})


@dataclass
class ConsumerStats:
    batches: int = 0
    messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    malformed: int = 0


class RedisStreamConsumer:
    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        ingestor: StreamingIngestor,
        *,
        group: str = "parity-features",
        consumer: str = "consumer-1",
        batch_size: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        dead_letter_stream: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.ingestor = ingestor
        self.batch_size, self.block_ms, self.claim_idle_ms = batch_size, block_ms, claim_idle_ms
        self.dead = RedisDeadLetters(client, dead_letter_stream or f"{stream}:dead")
        ingestor.dead_letters = self.dead
        self.stats = ConsumerStats()
        self._stop = threading.Event()

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def stop(self) -> None:
        self._stop.set()

    def _handle(self, messages: list) -> None:
        if not messages:
            return
        events, bad = parse_messages(messages)
        for mid, fields, reason in bad:
            self.dead.put_raw(fields, f"malformed: {reason}")
        res = self.ingestor.ingest(events)
        self.client.xack(self.stream, self.group, *[mid for mid, _ in messages])  # only after the commit
        s = self.stats
        s.batches += 1
        s.messages += len(messages)
        s.accepted += res.accepted
        s.duplicates += res.duplicates
        s.late += res.late
        s.malformed += len(bad)

    def _pending_own(self) -> None:
        while not self._stop.is_set():
            resp = self.client.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=self.batch_size)
            msgs = resp[0][1] if resp else []
            if not msgs:
                return
            self._handle(msgs)

    def _claim_dead(self) -> None:
        start = "0-0"
        while not self._stop.is_set():
            nxt, msgs, *_ = self.client.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, start_id=start, count=self.batch_size
            )
            self._handle([m for m in msgs if m[1] is not None])
            start = nxt.decode() if isinstance(nxt, bytes) else nxt
            if start == "0-0":
                return

    def run(self, *, max_messages: int | None = None, idle_exit_s: float | None = None) -> ConsumerStats:
        """Consume until stopped, `max_messages` handled, or idle for `idle_exit_s`."""
        self.ensure_group()
        self._pending_own()
        self._claim_dead()
        idle_since = time.monotonic()
        while not self._stop.is_set():
            if max_messages is not None and self.stats.messages >= max_messages:
                break
            resp = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.batch_size, block=self.block_ms)
            msgs = resp[0][1] if resp else []
            if msgs:
                self._handle(msgs)
                idle_since = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                break
        return self.stats
