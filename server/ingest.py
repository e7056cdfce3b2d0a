"""Live events through IngestEvents: checked, capped, applied exactly once, every one accounted for.

Why a module of its own: the request path must not wait on ingest, so each chunk is parsed,
checked (features.event_rules, the same rules the Redis Stream consumer applies), capped per
user (features.contribution) and committed atomically (features.streaming) on one ingest
thread, one chunk at a time however many streams are open, with the event loop free between
chunks. Measured before: a 100k-event ingest on the request path's I/O threads made 11 % of
concurrent Recommends degraded. Every event ends as accepted (applied), duplicate, late,
invalid or limited, each refusal with its reason; late and limited ones go to the dead letters.

Feedback (events naming their request, and every impression, play, like and skip) is handed
to an optional `on_feedback(events, request_ids)` after its chunk is committed, on the ingest
thread, for the feedback log beside the served log (server.served_log.FeedbackLogWriter): it
must not block. It gets the events the streaming ingestor was given (valid and within the
contribution caps); a resent duplicate reaches it again, so the feedback readers dedupe by
event_id, and an event too late for the features is still feedback on what was served.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional, Sequence

import numpy as np

from features.contribution import ContributionLimiter, ContributionLimits
from features.datasets import DatasetInfo
from features.definitions import FeatureSet
from features.event_rules import EventRules
from features.events import EventBatch
from features.online.base import OnlineStore, StoreUnavailable
from features.streaming import StreamingIngestor
from monitor.feedback import feedback_mask
from server.clock import Clock
from server.config import ServerConfig
from server.errors import Unavailable
from server.items import INGEST_NAME
from server.metrics import Metrics
from server.seen import append_seen
from server.state import ServingState
from server.validation import parse_events
from server.wire import BadBytes

__all__ = ["LiveIngest", "IngestOutcome", "CountingDeadLetters", "FeedbackSink"]

log = logging.getLogger(__name__)

FeedbackSink = Callable[[EventBatch, Sequence[Optional[str]]], object]  # (events, request id per event or None)


@dataclass(frozen=True)
class IngestOutcome:
    """What became of a stream's (or a chunk's) events: each counted exactly once."""

    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    invalid: int = 0
    first_error: str | None = None
    limited: int = 0
    first_limited: str | None = None

    def __add__(self, o: "IngestOutcome") -> "IngestOutcome":
        return IngestOutcome(self.received + o.received, self.accepted + o.accepted, self.duplicates + o.duplicates, self.late + o.late,
                             self.invalid + o.invalid, self.first_error or o.first_error, self.limited + o.limited,
                             self.first_limited or o.first_limited)


_METRIC_OUTCOMES = (("accepted", "accepted"), ("duplicate", "duplicates"), ("late", "late"), ("invalid", "invalid"), ("limited", "limited"))


class CountingDeadLetters:
    """Dead letters kept in a bounded list and counted (the streaming ingestor's sink)."""

    def __init__(self, keep: int = 100) -> None:
        self.count = 0
        self.batches: list[tuple[EventBatch, str]] = []
        self._keep = keep

    def put(self, events: EventBatch, reason: str) -> None:
        self.count += len(events)
        self.batches.append((events, reason))
        del self.batches[: -self._keep]


class LiveIngest:
    def __init__(self, cfg: ServerConfig, *, info: DatasetInfo, sets: Sequence[FeatureSet], write_store: OnlineStore, state: ServingState,
                 clock: Clock, metrics: Metrics, invalidate: Callable[[np.ndarray], Awaitable[None]],
                 on_feedback: FeedbackSink | None = None) -> None:
        self.on_feedback = on_feedback  # settable later: the feedback log is wired when the served log is
        self.cfg, self.info, self.write_store, self.state, self.clock, self.metrics = cfg, info, write_store, state, clock, metrics
        self._invalidate = invalidate
        self.dead_letters = CountingDeadLetters()
        self.ingestor = StreamingIngestor(write_store, sets, name=INGEST_NAME, allowed_lateness_ms=cfg.allowed_lateness_ms,
                                          dead_letters=self.dead_letters)
        self._base_rules = EventRules.from_dataset(info, None, max_future_ms=cfg.max_event_future_ms, max_id_chars=cfg.max_id_chars)
        self._rules, self._rules_catalog = self._base_rules, None
        self.limiter = (ContributionLimiter(write_store, ContributionLimits(cfg.ingest_max_per_item, cfg.ingest_max_per_user, cfg.ingest_rate_window_ms))
                        if cfg.ingest_max_per_item and cfg.ingest_max_per_user else None)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="parity-ingest")

    def close(self) -> None:
        self.pool.shutdown(wait=True)  # a commit in progress finishes: it is atomic, but let it land

    async def ingest(self, chunks: AsyncIterator[Sequence]) -> IngestOutcome:
        """Live events through the feature store's streaming ingestor, chunk by chunk.

        Each chunk is parsed, checked (features.event_rules, the rules the Redis Stream consumer
        applies), capped per user (features.contribution) and committed atomically on the ingest
        thread (one thread: chunks of every stream queue there one at a time); the loop yields
        between chunks, so a large ingest never starves requests. Every event is accounted for:
        accepted (applied), duplicate, late, invalid or limited, each refusal with its reason."""
        total = IngestOutcome()
        loop = asyncio.get_running_loop()
        async for chunk in chunks:
            try:
                r, users = await loop.run_in_executor(self.pool, self._ingest_chunk, chunk, self.clock.now_ms(), total.received)
            except StoreUnavailable as exc:
                self.metrics.store_errors.labels("ingest", "unavailable").inc()
                log.warning("IngestEvents: online store unavailable: %s", exc)  # the store's address stays in the log
                raise Unavailable(f"live events not stored: the online store is unavailable ({total.received} events of this "
                                  "stream were handled before); resend (delivery is deduplicated by event_id)") from None
            total += r
            for label, key in _METRIC_OUTCOMES:
                if getattr(r, key):
                    self.metrics.ingest.labels(label).inc(getattr(r, key))
            if len(users):
                await self._invalidate(users)
            await asyncio.sleep(0)  # let requests run between chunks
        return total

    def _event_rules(self) -> EventRules:
        """The served dataset's rules with the current catalogue (item durations, topics, creators)."""
        cat = self.state.current.items.catalog
        if self._rules_catalog is not cat:
            self._rules = self._base_rules.with_catalog(cat) if len(cat) else self._base_rules
            self._rules_catalog = cat
        return self._rules

    def _ingest_chunk(self, chunk: Sequence, now_ms: int, offset: int) -> tuple[IngestOutcome, np.ndarray]:
        """On the ingest thread: parse and check, cap, apply (exactly once in effect), then the
        seen record. Returns the chunk's outcome and the users whose records changed. `offset`:
        the stream position of the chunk's first message, so a reason names the right event."""
        keep = [i for i, ev in enumerate(chunk) if not isinstance(ev, BadBytes)]
        first_error = next((f"event {offset + i}: {ev.describe()}" for i, ev in enumerate(chunk) if isinstance(ev, BadBytes)), None)
        parsed = parse_events([chunk[i] for i in keep], now_ms, self.cfg, self._event_rules(),
                              positions=[offset + i for i in keep])
        batch = parsed.batch
        limited, first_limited = 0, None
        if self.limiter is not None and len(batch):
            adm = self.limiter.filter(batch)
            if adm.refused:
                limited, first_limited = len(adm.refused), adm.refused[0].reason
                by_reason: dict[str, list[int]] = {}
                for rej in adm.refused:
                    by_reason.setdefault(rej.reason, []).append(rej.index)
                for reason, idx in by_reason.items():
                    self.dead_letters.put(batch.take(np.asarray(idx)), reason)
            batch = adm.admitted
            request_ids = tuple(parsed.request_ids[i] for i in adm.index.tolist()) if parsed.request_ids else ()
        else:
            request_ids = parsed.request_ids
        out = IngestOutcome(received=len(chunk), invalid=len(chunk) - len(keep) + parsed.invalid, first_error=first_error or parsed.first_error,
                            limited=limited, first_limited=first_limited)
        if len(batch) == 0:
            return out, np.empty(0, np.int64)
        res = self.ingestor.ingest(batch)
        append_seen(self.write_store, batch, self.info.kind, self.cfg.seen_cap)
        if self.on_feedback is not None:
            self._feedback(batch, request_ids)
        return out + IngestOutcome(accepted=res.accepted, duplicates=res.duplicates, late=res.late), np.unique(batch.user_id)

    def _feedback(self, batch: EventBatch, request_ids: Sequence[str | None]) -> None:
        """The chunk's feedback events to `on_feedback`; its failure never fails an ingest that
        has already been committed (it is logged; the feedback writer counts its own drops)."""
        rids = request_ids if len(request_ids) == len(batch) else (None,) * len(batch)
        keep = feedback_mask(batch, rids)
        if not keep.any():
            return
        idx = np.flatnonzero(keep)
        sub = batch if len(idx) == len(batch) else batch.take(idx)
        try:
            self.on_feedback(sub, tuple(rids[i] for i in idx.tolist()))
        except Exception:  # the events are applied; losing their feedback row must not turn into a resend
            log.exception("IngestEvents: the feedback sink failed for %d events", len(sub))
