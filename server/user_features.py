"""A user's online features for one request: which keys to read, and decoding them as of now.

One store round trip per request carries every key the request needs: the user feature set,
the pair sets (user_topic, user_creator or user_genre) for every value of their item
column when the catalogue has few (`pair_prefetch_limit`), and the user's seen-items record.
A pair set with too many values to prefetch is read in a second round trip for the
candidates' values only.

Raw record bytes are what the caches hold; values are computed at request time through the
feature store's own `StateLayout.decode` and `read_features` (what `FeatureLookup.read_many`
does), so a cached record still reads exactly as of the request's time: windows roll and
decayed sums decay, and a record older than its TTL reads as missing.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from features.assemble import RankerInputs, columns_from_frame
from features.catalog import ItemCatalog
from features.definitions import FeatureSet
from features.lookup import record_keys
from features.online.base import RecordKey
from features.state import FeatureFrame, StateLayout, read_features
from server.seen import decode_seen, seen_key

__all__ = ["PairTable", "UserFeatures", "UserFeaturePlan", "empty_pair_table"]

log = logging.getLogger(__name__)

Columns = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class PairTable:
    """A pair set's features for (user, v) for sorted values v; row len(values) is 'missing'."""

    feature_set: FeatureSet
    values: np.ndarray  # sorted int64
    frame: FeatureFrame

    def columns(self, keys: np.ndarray) -> Columns:
        """Per-candidate columns for the candidates' second keys (topic / creator id; -1 unknown)."""
        keys = np.asarray(keys, dtype=np.int64)
        n = len(self.values)
        if n:
            pos = np.clip(np.searchsorted(self.values, keys), 0, n - 1)
            rows = np.where((self.values[pos] == keys) & (keys >= 0), pos, n)
        else:
            rows = np.zeros(len(keys), dtype=np.int64)
        fr = self.frame
        sub = FeatureFrame(fr.columns, fr.values[rows], fr.missing[rows], fr.feature_ts[rows])
        return columns_from_frame(self.feature_set.name, sub, self.feature_set)

    def covers(self, keys: np.ndarray) -> bool:
        k = np.asarray(keys, dtype=np.int64)
        k = k[k >= 0]
        return bool(np.isin(k, self.values).all())


@dataclass(frozen=True)
class UserFeatures:
    user_id: int
    columns: Columns  # the user set's columns, one row
    found: bool  # the user set had a live record
    feature_ts: int  # -1 when missing
    missing_rate: float  # fraction of the user set's columns that are missing
    pairs: Mapping[str, PairTable]
    seen: np.ndarray  # item ids the user engaged with
    degraded: bool = False
    source: str = "store"  # store | cache | stale | default
    problems: tuple[str, ...] = field(default=())


def _read(lay: StateLayout, raw: Sequence[bytes | None], now_ms: int, extra_empty: bool) -> tuple[FeatureFrame, np.ndarray, str | None]:
    problem = None
    try:
        states, found = lay.decode(list(raw))
    except ValueError as exc:  # a record of another layout: serve it as missing, loudly
        problem = f"{lay.feature_set.name}: {exc}"
        states, found = lay.empty(len(raw)), np.zeros(len(raw), dtype=bool)
    if extra_empty:
        states = np.concatenate([states, lay.empty(1)])
    return read_features(lay, states, now_ms), found, problem


def empty_pair_table(fs: FeatureSet, now_ms: int) -> PairTable:
    lay = StateLayout(fs)
    return PairTable(fs, np.empty(0, dtype=np.int64), read_features(lay, lay.empty(1), now_ms))


class UserFeaturePlan:
    """The keys a request reads for a user, fixed for one release + catalogue."""

    def __init__(self, inputs: RankerInputs, sets: Mapping[str, FeatureSet], catalog: ItemCatalog, prefetch_limit: int) -> None:
        self.inputs = inputs
        self.user_set = sets[inputs.user_set]
        self.user_layout = StateLayout(self.user_set)
        self.pair_sets = [(sets[name], col) for name, col in inputs.pair_sets]
        self.pair_layouts = {fs.name: StateLayout(fs) for fs, _ in self.pair_sets}
        self.prefetch: dict[str, np.ndarray] = {}
        for fs, col in self.pair_sets:
            vals = np.unique(np.asarray(getattr(catalog, col), dtype=np.int64))
            vals = vals[(vals >= 0) & (vals < (1 << 31))]
            if len(vals) <= prefetch_limit:
                self.prefetch[fs.name] = vals
        h = hashlib.blake2b(digest_size=8)
        h.update(self.user_set.version.encode())
        for fs, _ in self.pair_sets:
            h.update(fs.version.encode())
            h.update(self.prefetch[fs.name].tobytes() if fs.name in self.prefetch else b"-")
        self.plan_id = h.hexdigest()

    @property
    def deferred(self) -> list[tuple[FeatureSet, str]]:
        """Pair sets read after retrieval, for the candidates' values only."""
        return [(fs, col) for fs, col in self.pair_sets if fs.name not in self.prefetch]

    def keys(self, user_id: int) -> list[RecordKey]:
        keys = record_keys(self.user_set, [user_id])
        for fs, _ in self.pair_sets:
            if fs.name in self.prefetch:
                keys += record_keys(fs, (int(user_id) << 32) | self.prefetch[fs.name])
        keys.append(seen_key(user_id))
        return keys

    def pair_keys(self, fs: FeatureSet, user_id: int, values: np.ndarray) -> list[RecordKey]:
        return record_keys(fs, (int(user_id) << 32) | np.asarray(values, dtype=np.int64))

    def decode(self, user_id: int, raw: Sequence[bytes | None] | None, now_ms: int, *, source: str = "store", degraded: bool = False) -> UserFeatures:
        """UserFeatures from the raw records of `keys(user_id)`; raw None: every feature missing."""
        if raw is None:
            raw = [None] * len(self.keys(user_id))
        problems = []
        frame, found, p = _read(self.user_layout, raw[:1], now_ms, extra_empty=False)
        if p:
            problems.append(p)
        pos = 1
        pairs = {}
        for fs, _ in self.pair_sets:
            vals = self.prefetch.get(fs.name)
            if vals is None:
                continue
            fr, _, p = _read(self.pair_layouts[fs.name], raw[pos : pos + len(vals)], now_ms, extra_empty=True)
            if p:
                problems.append(p)
            pairs[fs.name] = PairTable(fs, vals, fr)
            pos += len(vals)
        seen = decode_seen(raw[pos])
        cols = columns_from_frame(self.user_set.name, frame, self.user_set)
        return UserFeatures(user_id, cols, bool(found[0]), int(frame.feature_ts[0]), float(frame.missing.mean()) if frame.missing.size else 0.0,
                            pairs, seen, degraded or bool(problems), source, tuple(problems))

    def decode_pairs(self, fs: FeatureSet, values: np.ndarray, raw: Sequence[bytes | None] | None, now_ms: int) -> PairTable:
        vals = np.asarray(values, dtype=np.int64)
        if raw is None:
            raw = [None] * len(vals)
        fr, _, p = _read(self.pair_layouts[fs.name], raw, now_ms, extra_empty=True)
        if p:
            log.warning("pair features: %s", p)
        return PairTable(fs, vals, fr)
