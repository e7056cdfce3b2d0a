"""Materialisation: offline (the log) → online (the store), full or incremental.

The state written for an entity is its state as of `until` (all events with ts < until),
computed by the batch engine. The watermark `until` is stored per feature-set version, so
an incremental run recomputes only entities with events in [watermark, until), and a
second run with the same `until` writes the same bytes (idempotent).

Hand-off to streaming: the ids of the log's events in [until - mark_window, until) are marked
as applied (the streaming ingestor's dedupe markers), and the horizon until - mark_window is
stored beside the watermark. A redelivered log event inside the window is then a duplicate,
a live event the log never held is applied, and an event older than the horizon is refused
as late by the ingestor: none is double-counted, none is counted as accepted and dropped.
The window defaults to the ingestor's allowed lateness (one hour). Materialise every set of
a dataset together (as the CLI and the server do): markers stand for all of them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np

from features.definitions import FeatureSet
from features.engines import LOCAL, Engine
from features.eventlog import EventLog
from features.events import MS_PER_DAY, MS_PER_HOUR, EventBatch
from features.lookup import record_keys
from features.modes import ServingMode, SetMode, load_mode, save_mode
from features.online.base import OnlineStore, Write
from features.served_values import VALUES_SUFFIX, state_records, writes_of
from features.state import StateLayout

__all__ = ["switch_mode", "materialize", "MaterializeReport", "watermark_key", "stored_watermark", "retired_key", "is_retired"]

_CHUNK = 2_000  # records per store commit: a few MB, well inside socket timeouts
_MARK_CHUNK = 20_000  # dedupe markers per store commit
DEFAULT_MARK_WINDOW_MS = MS_PER_HOUR  # = the streaming ingestor's default allowed lateness
DEFAULT_MARK_TTL_MS = 7 * MS_PER_DAY  # = the streaming ingestor's default dedupe TTL


@dataclass(frozen=True)
class MaterializeReport:
    feature_set: str
    version: str
    mode: str  # "full" | "incremental"
    from_ts: int  # -1 for full
    until_ts: int
    entities_written: int
    events_read: int


def watermark_key(fs: FeatureSet) -> str:
    return f"materialized:{fs.name}:{fs.version}"


def retired_key(fs: FeatureSet) -> str:
    return f"retired:{fs.name}:{fs.version}"


def is_retired(store: OnlineStore, fs: FeatureSet) -> bool:
    return store.get_meta(retired_key(fs)) is not None


def stored_watermark(store: OnlineStore, fs: FeatureSet) -> int | None:
    raw = store.get_meta(watermark_key(fs))
    return int(json.loads(raw)["until_ts"]) if raw else None


def _codes_with_events(fs: FeatureSet, events: EventBatch) -> np.ndarray:
    m = fs.event_mask(events)
    return np.unique(fs.entity.codes(events.take(np.flatnonzero(m)))[0])


def materialize(
    log: EventLog,
    store: OnlineStore,
    sets: Sequence[FeatureSet],
    *,
    until_ts: int | None = None,
    full: bool = False,
    mark_window_ms: int = DEFAULT_MARK_WINDOW_MS,
    mark_ttl_ms: int = DEFAULT_MARK_TTL_MS,
    engine: Engine | None = None,
) -> list[MaterializeReport]:
    """Retired feature-set versions are skipped (reported with mode "retired"). `engine`
    (features.engines; default: this process) computes the records: on Ray, each partition's
    on its actor; this process always writes them (the same bytes either way)."""
    if not 0 <= mark_window_ms < mark_ttl_ms:
        raise ValueError(f"mark_window_ms must be in [0, mark_ttl_ms), got {mark_window_ms} (ttl {mark_ttl_ms})")
    if until_ts is None:
        mx = log.max_ts()
        until_ts = (mx + 1) if mx is not None else 0
    history: EventBatch | None = None
    reports = []
    for fs in sets:
        if is_retired(store, fs):
            reports.append(MaterializeReport(fs.name, fs.version, "retired", -1, -1, 0, 0))
            continue
        w = stored_watermark(store, fs)
        mode = "full" if (full or w is None) else "incremental"
        if mode == "incremental" and w is not None and w >= until_ts:
            reports.append(MaterializeReport(fs.name, fs.version, mode, w, w, 0, 0))
            continue
        if history is None:
            history = log.read(end_ts=until_ts, must_exist=True)
            _mark_recent(store, history, until_ts - mark_window_ms, mark_ttl_ms)  # before any state: see the module docstring
        if mode == "full":
            codes = _codes_with_events(fs, history)
            from_ts = -1
            events = history
        else:
            recent = history.take(np.flatnonzero(history.ts >= w))
            codes = _codes_with_events(fs, recent)
            from_ts = w
            ecodes = fs.entity.codes(history)[0]
            events = history.take(np.flatnonzero(np.isin(ecodes, codes)))
        lay = StateLayout(fs)
        on_read = load_mode(store, fs).mode is ServingMode.ON_READ
        set_engine = (engine or LOCAL).batch_engine(lay, events)
        written = 0
        meta = {watermark_key(fs): json.dumps({"until_ts": int(until_ts), "marked_from": int(until_ts - mark_window_ms),
                                               "at_ms": int(time.time() * 1000), "mode": mode})}
        pending: list[Write] | None = None
        try:
            for alive, state_recs, values_recs in set_engine.map_chunks(partial(_records, lay, on_read, until_ts), codes, _CHUNK):
                if pending is not None:
                    store.commit(pending)
                pending = writes_of(lay, record_keys(fs, alive), state_recs, values_recs)
                written += len(pending)
        finally:
            if hasattr(set_engine, "close"):  # a Ray set engine frees its partitions
                set_engine.close()
        store.commit(pending, meta=meta)  # the watermark moves with the last chunk
        reports.append(MaterializeReport(fs.name, fs.version, mode, from_ts, int(until_ts), written, len(events)))
    return reports


def _records(lay: StateLayout, on_read: bool, until_ts: int, engine, codes: np.ndarray) -> tuple[np.ndarray, list[bytes], list[bytes] | None]:
    """What materialisation stores for `codes` as of `until_ts`: (entities alive, their state
    records, their served-values records or None for an on_read set). Runs where the engine
    is: in this process, or on the Ray actor holding the codes' partition."""
    states = engine.states_asof(codes, np.full(len(codes), until_ts, dtype=np.int64))
    alive = states["feature_ts"] >= until_ts - lay.feature_set.ttl_ms  # expired state: nothing to serve
    if on_read:  # a state reads as an on_read record's base; readers compute
        return codes[alive], lay.encode(states[alive]), None
    return codes[alive], *state_records(lay, states[alive])  # values as of each newest event: the bytes depend on the state only


def _mark_recent(store: OnlineStore, history: EventBatch, since_ts: int, ttl_ms: int) -> int:
    """Mark the ids of events at or after `since_ts` as applied; returns how many."""
    ids = np.unique(history.event_id[history.ts >= since_ts]).tolist()
    for a in range(0, len(ids), _MARK_CHUNK):
        store.commit((), dedupe_ids=ids[a : a + _MARK_CHUNK], dedupe_ttl_ms=ttl_ms)
    return len(ids)


def switch_mode(log: EventLog, store: OnlineStore, fs: FeatureSet, mode: SetMode) -> str:
    """Serve `fs` in `mode` from now on, for every worker and ingestor (the mode lives in the
    store), leaving the store readable in it: to on_read, the served-values records go (a
    state record reads as an on_read record's base); from on_read, the set is materialised in
    full (its records hold raw events, which a streaming reader cannot use). Returns what was done."""
    old = load_mode(store, fs)
    save_mode(store, fs, mode)
    if mode.mode is ServingMode.ON_READ:
        n = store.delete_matching(fs.name, version=fs.version + VALUES_SUFFIX)
        return f"{old.spec} -> {mode.spec}: {n} served-values records deleted"
    if old.mode is ServingMode.ON_READ:
        r = materialize(log, store, [fs], full=True)[0]
        return f"{old.spec} -> {mode.spec}: materialised in full, {r.entities_written} entities"
    return f"{old.spec} -> {mode.spec}: records kept"
