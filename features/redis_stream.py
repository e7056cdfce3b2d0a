"""A Redis Streams consumer that feeds the streaming ingestor.

Consumer-group semantics give at-least-once delivery: a message stays pending until it is
acknowledged, and we acknowledge only after the ingestor's atomic commit. On restart the
consumer first re-reads its own pending messages, then claims messages left pending by
dead consumers (XAUTOCLAIM), then reads new ones. Redelivered events are dropped by the
ingestor's event-id dedupe, so kill -9 at any point loses nothing and counts nothing twice.

Poison-proof: no message can stop the stream. Each one ends either applied (or counted as a
duplicate or late by the ingestor) or in the dead-letter stream with its reason:
- fields are read by features.event_rules, the same rules as gRPC IngestEvents: malformed
  (unparseable, missing, not ASCII), out of range (type=300, ids >= 2^63, topic >=
  n_topics, a ts far in the future) or implausible (a play of 1e7 s) messages are refused
  there, never raised on; a message deleted from the stream while pending is dead-lettered
  as deleted;
- with a ContributionLimiter, events over a user's cap are dead-lettered as rate limited;
- if the ingestor still raises on a batch for a data reason (ValueError and kin), the batch
  is bisected until the offending events are isolated and dead-lettered as poison. (A
  fault outside the data that makes every event fail would dead-letter them all, loudly
  logged; they keep their fields and can be re-published. Crash-looping instead would
  let two consecutive poison messages stop the stream.)
The dead letters and the XACK of the whole batch go in ONE MULTI/EXEC after the ingestor's
commit, so a poison message is acknowledged in the same step as the good ones (a crash
before it redelivers the batch: the good events are then duplicates and the dead letters may
repeat, at-least-once like everything else here). What is copied into a dead letter is
capped (fields, bytes per field), so a huge message cannot make a huge dead letter.
A store outage (StoreUnavailable, TransactionConflict, the stream's Redis unreachable)
acknowledges nothing: the consumer backs off and re-reads its pending messages.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np
import redis
from redis.cluster import RedisCluster

from features.contribution import ContributionLimiter
from features.event_rules import IMPLAUSIBLE, MALFORMED, OUT_OF_RANGE, RATE_LIMITED, EventRules, Rejection
from features.events import EVENT_SCHEMA, EventBatch
from features.online.base import StoreUnavailable, TransactionConflict
from features.online.redis_store import node_refused
from features.streaming import IngestResult, StreamingIngestor

__all__ = ["RedisStreamConsumer", "RedisDeadLetters", "publish_events", "ConsumerStats", "event_fields", "dead_reason"]

log = logging.getLogger(__name__)
_FIELDS = EVENT_SCHEMA.names

# Errors that mean "try again later": nothing is acknowledged.
_OUTAGES = (StoreUnavailable, TransactionConflict, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# Errors the ingestor raises on bad data (an event the rules let through but it cannot fold).
_DATA_ERRORS = (ValueError, TypeError, IndexError, KeyError, OverflowError, ArithmeticError)

_DEAD_MAX_FIELDS = 32  # fields of a message copied into its dead letter
_DEAD_MAX_BYTES = 1024  # bytes per copied field name or value
_DEAD_RESERVED = frozenset({b"reason", b"source_id"})


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


def dead_reason(r: Rejection) -> str:
    """A rejection as the dead-letter reason: its kind in words first ("out of range: type: ...")."""
    prefix = r.kind.replace("_", " ") + ": "
    return r.reason if r.reason.startswith(prefix) else prefix + r.reason


def _as_bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    return str(x).encode("utf-8", "backslashreplace")


def _capped(b: bytes) -> bytes:
    if len(b) <= _DEAD_MAX_BYTES:
        return b
    return b[:_DEAD_MAX_BYTES] + b"...[%d bytes in all]" % len(b)


class RedisDeadLetters:
    """Dead letters as entries of a Redis stream, with the reason beside the event."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client, self.stream = client, stream

    def put(self, events: EventBatch, reason: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for f in event_fields(events):
            pipe.xadd(self.stream, {**f, "reason": reason})
        pipe.execute()

    @staticmethod
    def raw_entry(fields: Mapping | None, reason: str, source_id: Any = None) -> dict[bytes, bytes]:
        """A refused message's dead letter: at most 32 of its fields, each capped at 1 KiB,
        then `source_id` (its id in the stream) and `reason`."""
        entry: dict[bytes, bytes] = {}
        for k, v in list((fields or {}).items())[:_DEAD_MAX_FIELDS]:
            key = _capped(_as_bytes(k))
            if key not in _DEAD_RESERVED:
                entry[key] = _capped(_as_bytes(v))
        if source_id is not None:
            entry[b"source_id"] = _as_bytes(source_id)
        entry[b"reason"] = _capped(reason.encode("utf-8", "backslashreplace"))
        return entry

    def put_raw(self, fields: Mapping | None, reason: str, source_id: Any = None) -> None:
        self.client.xadd(self.stream, self.raw_entry(fields, reason, source_id))


@dataclass
class ConsumerStats:
    """What a consumer did; every message is counted once in `messages` and once in an outcome
    (accepted, duplicates, late, or one of the dead-letter reasons)."""

    batches: int = 0
    messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    malformed: int = 0  # unparseable, missing fields, not ASCII
    out_of_range: int = 0  # parsed but outside the field's domain (type=300, id >= 2^63, ...)
    implausible: int = 0  # a value no honest client sends (a play longer than the item allows, ...)
    rate_limited: int = 0  # over a user's contribution cap
    poison: int = 0  # the ingestor raised on them (isolated by bisection)
    deleted: int = 0  # deleted from the stream while pending
    outages: int = 0  # times the store or the stream was unavailable (the batch was retried)

    @property
    def dead_lettered(self) -> int:
        return self.malformed + self.out_of_range + self.implausible + self.rate_limited + self.poison + self.deleted

    def to_json(self) -> dict[str, int]:
        return asdict(self)


class RedisStreamConsumer:
    """Consumes one stream in a consumer group into a StreamingIngestor (see the module docstring).

    `rules` validate each message (default: dataset-agnostic EventRules(); the CLI builds
    them from the data dir); `limiter` caps each user's contribution (default: none; the CLI
    turns it on); `clock` is the wall clock in seconds for the rules' future bound.

    `client` may be a RedisCluster: the stream is one key, so it lives on one master; to
    spread ingest over a cluster run one stream (and one consumer) per master, each stream
    named with a hash tag that lands on its master (the dead letters, `{stream}:dead`, share
    the tag, so their MULTI/EXEC with the XACK stays in one slot).
    """

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
        rules: EventRules | None = None,
        limiter: ContributionLimiter | None = None,
        clock: Callable[[], float] = time.time,
        retry_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the stream client must use decode_responses=False: message fields may be any bytes")
        if not (0 < retry_s[0] <= retry_s[1]):
            raise ValueError(f"retry_s must be (first, max) back-off seconds with 0 < first <= max, got {retry_s!r}")
        self.client, self.stream, self.group, self.consumer = client, stream, group, consumer
        self.ingestor = ingestor
        self.batch_size, self.block_ms, self.claim_idle_ms = batch_size, block_ms, claim_idle_ms
        self.dead = RedisDeadLetters(client, dead_letter_stream or f"{stream}:dead")
        ingestor.dead_letters = self.dead
        self.rules = rules if rules is not None else EventRules()
        self.limiter = limiter
        self.clock = clock
        self.retry_s = retry_s
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

    # -- one batch ----------------------------------------------------------------------------

    def _handle(self, messages: list) -> None:
        """Validate, limit, ingest, then dead-letter and acknowledge in one step.

        Raises only on outages (and on a fault that is not in the data); then nothing is
        acknowledged and the messages stay pending for a retry."""
        if not messages:
            return
        live = [(mid, f) for mid, f in messages if f]
        gone = [mid for mid, f in messages if not f]
        parsed = self.rules.parse_stream([f for _, f in live], int(self.clock() * 1000))
        dead: list[tuple[Any, Mapping | None, str]] = [(live[r.index][0], live[r.index][1], dead_reason(r)) for r in parsed.rejected]
        counts = {MALFORMED: 0, OUT_OF_RANGE: 0, IMPLAUSIBLE: 0, RATE_LIMITED: 0}
        for r in parsed.rejected:
            counts[r.kind] += 1
        events, where = parsed.events, parsed.index  # where: position in `live` of each event
        if self.limiter is not None and len(events):
            adm = self.limiter.filter(events)
            for r in adm.refused:
                j = int(where[r.index])
                dead.append((live[j][0], live[j][1], dead_reason(r)))
                counts[r.kind] += 1
            events, where = adm.admitted, where[adm.index]
        results, poison = self._apply(events)
        for k, why in poison:
            j = int(where[k])
            dead.append((live[j][0], live[j][1], why))
        for mid in gone:
            dead.append((mid, None, "deleted: the message was deleted from the stream before it was processed"))
        pipe = self.client.pipeline(transaction=True)  # the dead letters and the ack, together
        for mid, fields, reason in dead:
            pipe.xadd(self.dead.stream, RedisDeadLetters.raw_entry(fields, reason, mid))
        pipe.xack(self.stream, self.group, *[mid for mid, _ in messages])
        pipe.execute()
        s = self.stats
        s.batches += 1
        s.messages += len(messages)
        s.accepted += sum(r.accepted for r in results)
        s.duplicates += sum(r.duplicates for r in results)
        s.late += sum(r.late for r in results)
        s.malformed += counts[MALFORMED]
        s.out_of_range += counts[OUT_OF_RANGE]
        s.implausible += counts[IMPLAUSIBLE]
        s.rate_limited += counts[RATE_LIMITED]
        s.poison += len(poison)
        s.deleted += len(gone)
        if dead:
            log.warning("stream %s: %d of %d messages dead-lettered to %s (first: %s)", self.stream, len(dead),
                        len(messages), self.dead.stream, dead[0][2])

    def _apply(self, events: EventBatch, offset: int = 0) -> tuple[list[IngestResult], list[tuple[int, str]]]:
        """Ingest; if the ingestor raises on the data, bisect to isolate the events it refuses.

        Returns the results of the parts that went in and [(position, reason)] of the poison.
        Each part is one atomic ingest, so a part that raised applied nothing."""
        n = len(events)
        if n == 0:
            return [], []
        try:
            return [self.ingestor.ingest(events)], []
        except _OUTAGES:
            raise
        except _DATA_ERRORS as exc:
            if n == 1:
                log.error("stream %s: the ingestor refused event %s: %s: %s", self.stream, int(events.event_id[0]), type(exc).__name__, exc)
                return [], [(offset, f"poison: the ingestor refused it: {type(exc).__name__}: {str(exc)[:120]}")]
        half = n // 2
        r1, p1 = self._apply(events.take(np.arange(half)), offset)
        r2, p2 = self._apply(events.take(np.arange(half, n)), offset + half)
        return r1 + r2, p1 + p2

    # -- reading ------------------------------------------------------------------------------

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
            nxt, msgs, *rest = self.client.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, start_id=start, count=self.batch_size
            )
            # Redis 6.2 returns messages deleted while pending with None fields (still
            # pending); Redis >= 7 lists their ids apart (already out of the pending list).
            # Either way they are dead-lettered as deleted (acking a non-pending id is a no-op).
            gone = [(mid, None) for mid in (rest[0] if rest and rest[0] else [])]
            self._handle(list(msgs) + gone)
            start = nxt.decode() if isinstance(nxt, bytes) else nxt
            if start == "0-0":
                return

    def run(self, *, max_messages: int | None = None, idle_exit_s: float | None = None) -> ConsumerStats:
        """Consume until stopped, `max_messages` handled, or idle for `idle_exit_s`.

        An outage (the store or the stream unavailable) is retried with back-off until it
        ends or the consumer is stopped; the messages it interrupted stay pending and are
        re-read first."""
        self.ensure_group()
        recover = True
        delay = self.retry_s[0]
        idle_since = time.monotonic()
        while not self._stop.is_set():
            try:
                if recover:
                    self._pending_own()
                    self._claim_dead()
                    recover = False
                    idle_since = time.monotonic()
                if max_messages is not None and self.stats.messages >= max_messages:
                    break
                resp = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=self.batch_size, block=self.block_ms)
                msgs = resp[0][1] if resp else []
                if msgs:
                    self._handle(msgs)
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                    break
                delay = self.retry_s[0]
            except Exception as exc:
                # A node's "not here, not now" (MOVED/ASK mid-failover, TRYAGAIN, CLUSTERDOWN,
                # READONLY) on the stream's own commands is an outage too: the ack transaction
                # did not run, so the batch stays pending and is re-read; crashing the consumer
                # would stop the stream until someone restarted it.
                if not (isinstance(exc, _OUTAGES) or node_refused(exc)):
                    raise
                self.stats.outages += 1
                recover = True
                if isinstance(self.client, RedisCluster):
                    # redis-py 8.1 finds XREADGROUP's stream (a movable key) by COMMAND GETKEYS on
                    # the client's default node and, when that node is the master that died, never
                    # replaces it: the consumer would fail forever after a failover. Move it to
                    # another primary (the slot table itself is refreshed by the failed command).
                    self.client.replace_default_node()
                log.warning("stream %s: unavailable (%s: %s); nothing acknowledged, retrying in %.1f s",
                            self.stream, type(exc).__name__, exc, delay)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.retry_s[1])
        return self.stats
