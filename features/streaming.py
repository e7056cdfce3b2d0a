"""Streaming ingest: fold events into online states, exactly once in effect.

Delivery is at-least-once (a consumer may crash after writing and before acknowledging),
so every commit writes the new states, the applied event ids (dedupe markers) and the
watermark in ONE atomic store transaction: a redelivered event is either fully applied
already (and skipped as a duplicate) or not at all.

Every event ends in exactly one outcome, reported to the caller: applied (`accepted`), a
duplicate of one applied before, or late (to the dead-letter sink with its reason). Nothing
is counted as accepted without being applied.

Lateness: the watermark is the newest event time ingested. An event older than the
watermark minus the allowed lateness would land in tiles that reads may already have
passed; it is late. So is an event older than the materialised horizon: a materialisation
up to `until` folds in the log's events before `until` and marks the ids of those in its last
`mark_window` as applied (features/materialize.py), so a redelivered log event inside the
window is a duplicate, a new event inside it is applied, and anything older cannot be told
apart from what the batch path already counted and is refused as late (append it to the
event log and re-materialise to count it).

Several ingestors (server replicas, consumers) may write one store at once: each batch is
one optimistic store transaction (read states, markers and the watermark; decide; write
only if none of them changed meanwhile, else retry), so no update is lost and no event is
applied twice. On Redis Cluster the transaction commits per slot group (one entity id's
records and its markers), each group checked and written atomically, the watermark and
stats last (features/online/redis_cluster.py): every entity still gets each event exactly
once, also after a crash between groups, since the transaction names which key each event
changes (`touches`) and a redelivered event is applied only where its group marker is
missing. What a cluster does not give: one instant at which all entities of a batch change
together (a reader may see the user updated and the item not yet), and the stats' counts
are per completed commit as everywhere.
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
from features.online.base import Commit, OnlineStore, Snapshot, Write
from features.online.memory import check_meta_name
from features.modes import ServingMode, mode_from_meta, mode_key
from features.on_read import OnReadLayout, is_on_read_record
from features.served_values import state_writes
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
        check_meta_name(f"stream:{name}")  # here, not at the first batch (where it would refuse every event as poison)
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

    @staticmethod
    def _horizon(raw: str | None) -> int:
        """Events before this are folded into the materialised state and not marked (-1: none)."""
        if not raw:
            return -1
        d = json.loads(raw)
        return int(d.get("marked_from", d["until_ts"]))

    def ingest(self, events: EventBatch) -> IngestResult:
        with self._lock:
            return self._ingest(events)

    def _ingest(self, events: EventBatch) -> IngestResult:
        received = len(events)
        if received == 0:
            st = self.stats()
            return IngestResult(0, 0, 0, 0, st.watermark, 0)
        batch = events.deduplicated()
        in_batch_dups = received - len(batch)
        # Every record this batch could touch, known before reading anything.
        # `touches`: which key each event changes, (event, key) pairs, a contiguous run per set
        plan = []
        keys: list = []
        t_ev: list = []
        t_key: list = []
        for lay in self.layouts:
            fs = lay.feature_set
            m = fs.event_mask(batch)
            codes = fs.entity.codes(batch)[0]
            uniq = np.unique(codes[m])
            ev = np.flatnonzero(m)
            plan.append((lay, m, codes, uniq, len(keys), len(t_ev)))
            t_ev += ev.tolist()
            t_key += (len(keys) + np.searchsorted(uniq, codes[ev])).tolist()
            keys += record_keys(fs, uniq)
        mat_names = [f"materialized:{lay.feature_set.name}:{lay.feature_set.version}" for lay in self.layouts]
        mode_names = [mode_key(lay.feature_set) for lay in self.layouts]
        meta_names = [self._meta_key(), *mat_names, *mode_names]
        ids = batch.event_id.tolist()
        outcome: dict = {}

        def decide(snap: Snapshot) -> Commit:
            raw = snap.meta[self._meta_key()]
            d = json.loads(raw) if raw else {}
            wm0 = int(d.get("watermark", -1))
            # each set's serving mode, read in this transaction: a mode change meanwhile makes it retry
            modes = [mode_from_meta(snap.meta[n], key=n) for n in mode_names]
            # a set materialised on a cadence is left to its runs: its watermark says nothing about the others' events
            horizon = max([self._horizon(snap.meta[n]) for n, m in zip(mat_names, modes) if m.mode is not ServingMode.MATERIALIZED] + [-1])
            seen = np.asarray(snap.seen, dtype=bool)
            # Per (event, key): already applied there. On one store that is the event's `seen`;
            # on a cluster a commit cut short by a crash leaves an event applied to some slot
            # groups only (partial): it was judged in time then, so it is finished now, never
            # refused as late, and applied exactly where it is missing.
            pair_seen = np.asarray(snap.seen_pairs, dtype=bool)
            partial = np.zeros(len(batch), dtype=bool)
            partial[np.asarray(t_ev, dtype=np.int64)[pair_seen]] = True
            partial &= ~seen
            fresh_idx = np.flatnonzero(~seen)
            fresh = batch.take(fresh_idx)
            # The watermark advances event by event in arrival order, within a batch too.
            before = np.maximum.accumulate(np.concatenate([[wm0], fresh.ts]))[:-1]
            behind = (before >= 0) & (fresh.ts < before - self.allowed_lateness_ms) & ~partial[fresh_idx]
            old = ~behind & (fresh.ts < horizon) & ~partial[fresh_idx]
            late = int(behind.sum() + old.sum())
            # At-least-once to the dead letters: a retried transaction may repeat them.
            if behind.any():
                self.dead_letters.put(fresh.take(np.flatnonzero(behind)), f"late: more than {self.allowed_lateness_ms} ms behind the watermark")
            if old.any():
                self.dead_letters.put(fresh.take(np.flatnonzero(old)),
                                      f"late: before the materialised horizon {horizon} (events before it come from the event log; "
                                      "append it to the log and re-materialise to count it)")
            ok_idx = fresh_idx[~(behind | old)]
            applied = np.zeros(len(batch), dtype=bool)
            applied[ok_idx] = True
            writes: list[Write] = []
            for (lay, m, codes, uniq, k0, p0), mode in zip(plan, modes):
                fs = lay.feature_set
                ev = np.flatnonzero(m)
                sel = ev[applied[ev] & ~pair_seen[p0 : p0 + len(ev)]]
                if len(sel) == 0 or mode.mode is ServingMode.MATERIALIZED:
                    continue  # materialised sets read the event log on their cadence
                sub = batch.take(sel)
                rows = np.searchsorted(uniq, codes[sel])
                touched = np.unique(rows)
                old = [snap.values[k0 + r] for r in touched.tolist()]
                touched_keys = [keys[k0 + r] for r in touched.tolist()]
                at = np.searchsorted(touched, rows).astype(np.int64)
                if mode.mode is ServingMode.ON_READ:  # keep the raw events; readers compute (features/on_read.py)
                    recs = OnReadLayout.for_mode(fs, mode).append_many(old, at, sub)
                    writes += [Write(k, v, fs.ttl_ms) for k, v in zip(touched_keys, recs)]
                    continue
                if any(is_on_read_record(r) for r in old):  # switched back from on_read: its events fold into a state
                    states, _ = OnReadLayout.cached(fs).states(old)
                else:
                    states, _ = lay.decode(old)
                apply_events(lay, states, at, sub)
                writes += state_writes(lay, touched_keys, states)
            accepted = int(applied.sum())
            wm = max(wm0, int(batch.ts[applied].max())) if accepted else wm0
            dups = in_batch_dups + int(seen.sum())
            stats = {"watermark": wm, "accepted": int(d.get("accepted", 0)) + accepted,
                     "duplicates": int(d.get("duplicates", 0)) + dups, "late": int(d.get("late", 0)) + late}
            outcome.update(accepted=accepted, dups=dups, late=late, wm=wm, written=len(writes))
            # Late events are marked too: a redelivery must not dead-letter them twice.
            marked = [ids[i] for i in np.flatnonzero(~seen).tolist()]
            return Commit(writes, marked, self.dedupe_ttl_ms, {self._meta_key(): json.dumps(stats)})

        self.store.transact(keys, ids, meta_names, decide, touches=(t_ev, t_key))
        o = outcome
        return IngestResult(received, o["accepted"], o["dups"], o["late"], o["wm"], o["written"])
