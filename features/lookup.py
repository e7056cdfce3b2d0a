"""Online reads: fetch packed states in one round trip, decode, read as of now.

The read goes through the same `read_features` as the batch path, so TTL (a value older
than the set's TTL reads as missing even before Redis evicts it) and the missing policy are
identical online and offline. Every read returns the feature timestamp and staleness.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from features.definitions import FeatureSet
from features.online.base import KeyGroup, OnlineStore, RecordKey
from features.modes import ModePlan, ServingMode, load_modes
from features.on_read import OnReadLayout, is_on_read_record
from features.served_values import VALUES_SUFFIX, merge_states, served_values
from features.served_values import repair as served_repair
from features.state import FeatureFrame, StateLayout

__all__ = ["FeatureLookup", "LookupResult", "LookupRequest", "record_keys", "freshness", "FreshnessReport"]


def record_keys(fs: FeatureSet, codes: Sequence[int] | np.ndarray) -> list[RecordKey]:
    ver, name, ent = fs.version, fs.name, fs.entity
    return [RecordKey(name, ver, ent.name, ent.key_id(c)) for c in np.asarray(codes, dtype=np.int64).tolist()]


@dataclass(frozen=True)
class LookupRequest:
    feature_set: str
    codes: np.ndarray  # entity codes (see Entity.code_of)


@dataclass(frozen=True)
class LookupResult:
    feature_set: str
    version: str
    frame: FeatureFrame
    found: np.ndarray  # (n,) a record existed in the store
    staleness_ms: np.ndarray  # (n,) now - feature_ts; -1 where missing

    @property
    def missing_rate(self) -> float:
        return float(self.frame.missing.mean()) if self.frame.missing.size else 0.0


class FeatureLookup:
    """Reads feature values the way each set is served (features/modes.py, kept in the store):
    served-values records for streaming and materialized sets, raw events computed on read
    for on_read sets. `modes` defaults to what the store says at construction."""

    def __init__(self, store: OnlineStore, sets: Sequence[FeatureSet], modes: ModePlan | None = None) -> None:
        self.store = store
        self.layouts = {fs.name: StateLayout(fs) for fs in sets}
        self.modes = modes if modes is not None else load_modes(store, list(sets))

    def states(self, name: str, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lay = self._layout(name)
        raw = self.store.get_many(record_keys(lay.feature_set, codes))
        if any(is_on_read_record(r) for r in raw):
            return OnReadLayout.cached(lay.feature_set).states(raw)
        return lay.decode(raw)

    def read_many(self, requests: Sequence[LookupRequest], now_ms: int, *, repair: bool = False) -> list[LookupResult]:
        """All requests in one store round trip of served-values records (features/served_values.py)
        or, for on_read sets, of raw-event records, plus one more for the state records of
        entities whose values record cannot answer at now_ms (none when every record is
        inside its exact interval). `repair` then rewrites those values records as of now_ms
        (one optimistic transaction per set), so the next read of a quiet entity is a
        values-only read again."""
        groups, spans = [], []
        n = 0
        for req in requests:
            lay = self._layout(req.feature_set)
            fs = lay.feature_set
            ids = fs.entity.key_ids(req.codes)
            on_read = self.modes.of(fs.name).mode is ServingMode.ON_READ
            groups.append(KeyGroup(fs.name, fs.version if on_read else fs.version + VALUES_SUFFIX, fs.entity.name, ids))
            spans.append((lay, ids, n, on_read))
            n += len(ids)
        raw = self.store.get_groups(groups) if n else []
        got = [None if on_read else served_values(lay).read(raw[a : a + len(ids)], now_ms) for lay, ids, a, on_read in spans]
        stale = [[] if g is None else
                 [RecordKey(lay.feature_set.name, lay.feature_set.version, lay.feature_set.entity.name, ids[i]) for i in np.flatnonzero(g.expired).tolist()]
                 for (lay, ids, _, _), g in zip(spans, got)]
        flat = [k for ks in stale for k in ks]
        states = self.store.get_many(flat) if flat else []
        out = []
        pos = 0
        for (lay, ids, a, on_read), g, sk in zip(spans, got, stale):
            if g is None:
                frame, found = OnReadLayout.cached(lay.feature_set).read(raw[a : a + len(ids)], now_ms)
            else:
                frame = merge_states(lay, g, states[pos : pos + len(sk)], now_ms)
                found = g.found.copy()
                found[g.expired] = [v is not None for v in states[pos : pos + len(sk)]]
                pos += len(sk)
                if repair and sk:
                    served_repair(self.store, lay, sk, now_ms)
            stale_ms = np.where(frame.feature_ts >= 0, now_ms - frame.feature_ts, -1)
            out.append(LookupResult(lay.feature_set.name, lay.feature_set.version, frame, found, stale_ms))
        return out

    def read(self, name: str, codes: Sequence[int] | np.ndarray, now_ms: int) -> LookupResult:
        return self.read_many([LookupRequest(name, np.asarray(codes, dtype=np.int64))], now_ms)[0]

    def _layout(self, name: str) -> StateLayout:
        try:
            return self.layouts[name]
        except KeyError:
            raise KeyError(f"unknown feature set {name!r}; known: {sorted(self.layouts)}") from None


@dataclass(frozen=True)
class FreshnessReport:
    feature_set: str
    version: str
    entities: int
    expired: int  # records whose feature timestamp is older than the TTL at `now`
    staleness_p50_ms: int
    staleness_p95_ms: int
    staleness_max_ms: int


def freshness(store: OnlineStore, sets: Sequence[FeatureSet], now_ms: int, batch: int = 5_000) -> list[FreshnessReport]:
    """Staleness (now - feature timestamp) over every live record of each set."""
    out = []
    for fs in sets:
        lay = StateLayout(fs)
        keys = [k for k in store.iter_keys(fs.name) if k.version == fs.version]
        fts = []
        for a in range(0, len(keys), batch):
            raw = store.get_many(keys[a : a + batch])
            if any(is_on_read_record(r) for r in raw):  # an on_read set: the headers say it
                ts = OnReadLayout.cached(fs).feature_ts(raw)
                fts.append(ts[ts >= 0])
                continue
            states, found = lay.decode(raw)
            fts.append(states["feature_ts"][found])
        ts = np.concatenate(fts) if fts else np.empty(0, dtype=np.int64)
        stale = now_ms - ts
        q = np.percentile(stale, [50, 95]).astype(np.int64) if len(stale) else np.array([-1, -1])
        out.append(
            FreshnessReport(fs.name, fs.version, len(ts), int((stale > fs.ttl_ms).sum()), int(q[0]), int(q[1]), int(stale.max()) if len(stale) else -1)
        )
    return out
