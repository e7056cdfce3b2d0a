"""Proof of offline/online parity.

Replays an event log through the streaming path into a fresh online store and, at probe
times, compares what the online store serves with what the batch point-in-time join
computes for the same entities and times. Half the probe times are exactly event
timestamps, which checks that a value "as of t" never includes an event at t.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from features.batch import BatchEngine
from features.definitions import FeatureSet
from features.events import MS_PER_DAY, EventBatch
from features.lookup import FeatureLookup
from features.online.base import OnlineStore
from features.lookup import record_keys
from features.modes import ModePlan, ServingMode, save_mode
from features.served_values import state_writes
from features.state import StateLayout, read_features
from features.streaming import StreamingIngestor

__all__ = ["verify_parity", "VerifyReport", "SetReport", "values_match"]

RTOL = 1e-9
ATOL = 1e-9
_MAX_BATCH = 50_000


def values_match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) <= ATOL + RTOL * np.maximum(np.abs(a), np.abs(b))


@dataclass
class SetReport:
    feature_set: str
    version: str
    entities: int
    checked: int = 0
    mismatches: int = 0
    max_abs_diff: float = 0.0
    examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    mismatches: int
    max_abs_diff: float
    probes: int
    events: int
    sets: list[SetReport]

    def summary(self) -> dict:
        return {"checked": self.checked, "mismatches": self.mismatches, "max_abs_diff": self.max_abs_diff}


def _probe_times(events: EventBatch, n: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = int(events.ts.min()), int(events.ts.max()) + MS_PER_DAY
    uniform = rng.integers(lo, hi, size=n - n // 2)
    exact = rng.choice(events.ts, size=n // 2) if n // 2 else np.empty(0, np.int64)
    return np.unique(np.concatenate([uniform, exact, [hi]]).astype(np.int64))


def verify_parity(
    events: EventBatch,
    sets: Sequence[FeatureSet],
    store: OnlineStore,
    *,
    probes: int = 10,
    seed: int = 0,
    max_examples: int = 5,
    modes: ModePlan | None = None,
) -> VerifyReport:
    """`store` must be empty (a fresh namespace): the replay starts from nothing.

    `modes` (default: all streaming) says how each set is served; they are saved to the store
    so the ingestor and the reads follow them. Streaming and on_read sets must read exactly the
    batch value as of each probe time; a materialized set is written at each probe by what a
    cadence run writes (the batch state as of the last cadence boundary) and must read exactly
    the batch path as of that run, read at the probe time."""
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if len(events) == 0:
        return VerifyReport(0, 0, 0.0, 0, 0, [])
    rng = np.random.default_rng(seed)
    events = events.sorted()
    times = _probe_times(events, probes, rng)
    engines = {fs.name: BatchEngine(StateLayout(fs), events) for fs in sets}
    reports = {fs.name: SetReport(fs.name, fs.version, len(engines[fs.name].entities)) for fs in sets}
    # An in-order replay is never late, so zero lateness also proves no event is dead-lettered.
    modes = modes if modes is not None else ModePlan({})
    for fs in sets:
        save_mode(store, fs, modes.of(fs.name))
    ingestor = StreamingIngestor(store, sets, name=f"verify-{uuid.uuid4().hex[:8]}", allowed_lateness_ms=0, dedupe_ttl_ms=MS_PER_DAY)
    lookup = FeatureLookup(store, sets, modes=modes)
    pos = 0
    for t in times:
        end = int(np.searchsorted(events.ts, t, side="left"))
        for a in range(pos, end, _MAX_BATCH):
            ingestor.ingest(events.take(np.arange(a, min(end, a + _MAX_BATCH))))
        pos = end
        for fs in sets:
            eng, rep = engines[fs.name], reports[fs.name]
            codes = eng.entities
            if len(codes) == 0:
                continue
            m = modes.of(fs.name)
            if m.mode is ServingMode.MATERIALIZED:  # the cadence run before t wrote the state as of its boundary
                run = (int(t) // m.every_ms) * m.every_ms
                states = eng.states_asof(codes, np.full(len(codes), run, dtype=np.int64))
                alive = states["feature_ts"] >= run - fs.ttl_ms
                store.commit(state_writes(eng.layout, record_keys(fs, codes[alive]), states[alive]))
                batch = read_features(eng.layout, np.where(alive, states, eng.layout.empty(len(codes))), int(t))
            else:
                batch = eng.features_asof(codes, np.full(len(codes), t, dtype=np.int64))
            online = lookup.read(fs.name, codes, int(t)).frame
            ok = values_match(online.values, batch.values) & (online.missing == batch.missing)
            ok &= (online.feature_ts == batch.feature_ts)[:, None]
            diff = np.abs(online.values - batch.values)
            rep.checked += ok.size
            rep.mismatches += int((~ok).sum())
            rep.max_abs_diff = max(rep.max_abs_diff, float(diff.max()))
            for i, j in np.argwhere(~ok)[: max(0, max_examples - len(rep.examples))]:
                rep.examples.append(
                    f"{fs.name}.{online.columns[j]} entity={fs.entity.key_id(codes[i])} t={int(t)}: "
                    f"online={online.values[i, j]!r} (missing={bool(online.missing[i, j])}) "
                    f"batch={batch.values[i, j]!r} (missing={bool(batch.missing[i, j])})"
                )
    rs = list(reports.values())
    return VerifyReport(
        checked=sum(r.checked for r in rs),
        mismatches=sum(r.mismatches for r in rs),
        max_abs_diff=max((r.max_abs_diff for r in rs), default=0.0),
        probes=len(times),
        events=len(events),
        sets=rs,
    )
