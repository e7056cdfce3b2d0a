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

from features.assemble import Block, RankerInputs, columns_from_frame, prefixed
from features.catalog import ItemCatalog
from features.definitions import FeatureSet
from features.lookup import record_keys
from features.online.base import KeyGroup, OnlineStore, RecordKey
from features.modes import ModePlan, ServingMode
from features.on_read import OnReadLayout
from features.sorted_lookup import sorted_positions
from features.served_values import VALUES_SUFFIX, expired, read_mixed, served_values, values_key, values_keys
from features.state import FeatureFrame, StateLayout, read_features
from server.seen import SEEN_SET, SEEN_VERSION, decode_seen

__all__ = ["PairTable", "UserFeatures", "UserFeaturePlan", "empty_pair_table"]

log = logging.getLogger(__name__)

Columns = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class PairTable:
    """A pair set's features for (user, v) for sorted values v; row len(values) is 'missing'."""

    feature_set: FeatureSet
    values: np.ndarray  # sorted int64
    frame: FeatureFrame

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """The frame's row of each second key (topic / creator id; -1 unknown); the 'missing' row for keys not held."""
        keys = np.asarray(keys, dtype=np.int64)
        n = len(self.values)
        if not n:
            return np.zeros(len(keys), dtype=np.int64)
        pos = sorted_positions(self.values, keys)
        return np.where((self.values[pos] == keys) & (keys >= 0), pos, n)

    def columns(self, keys: np.ndarray) -> Columns:
        """Per-candidate columns for the candidates' second keys (topic / creator id; -1 unknown)."""
        rows = self.rows(keys)
        fr = self.frame
        sub = FeatureFrame(fr.columns, fr.values[rows], fr.missing[rows], fr.feature_ts[rows])
        return columns_from_frame(self.feature_set.name, sub, self.feature_set)

    def block(self, keys: np.ndarray) -> Block:
        """`columns(keys)` as one ranker-input block."""
        rows = self.rows(keys)
        fr = self.frame
        return Block.of(prefixed(self.feature_set.name, tuple(fr.columns)), fr.values[rows], fr.missing[rows])

    def covers(self, keys: np.ndarray) -> bool:
        """Whether every known key (>= 0) has its own row (`values` is sorted and distinct)."""
        k = np.asarray(keys, dtype=np.int64)
        k = k[k >= 0]
        if not len(k):
            return True
        if not len(self.values):
            return False
        return bool((self.values[np.minimum(np.searchsorted(self.values, k), len(self.values) - 1)] == k).all())


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


def _read(lay: StateLayout, raw: Sequence[bytes | None], now_ms: int, extra_empty: bool, on_read: bool = False) -> tuple[FeatureFrame, np.ndarray, str | None]:
    """Values from served-values records (or, where those could not answer, the state records
    the reader put in their place: features/served_values.py), or for an on_read set from its
    raw-event records (features/on_read.py)."""
    problem = None
    try:
        if on_read:
            frame, found = OnReadLayout.cached(lay.feature_set).read(list(raw), now_ms)
            got = None
        else:
            got = read_mixed(lay, list(raw), now_ms)
            frame, found = got.frame, got.found
        if got is not None and got.unresolved.any():
            problem = f"{lay.feature_set.name}: {int(got.unresolved.sum())} values record(s) past their exact interval and no state read"
    except ValueError as exc:  # a record of another layout: serve it as missing, loudly
        problem = f"{lay.feature_set.name}: {exc}"
        frame, found = read_features(lay, lay.empty(len(raw)), now_ms), np.zeros(len(raw), dtype=bool)
    if extra_empty:
        e = served_values(lay).empty_row  # the same at every time: no state, every value its default
        frame = FeatureFrame(frame.columns, np.concatenate([frame.values, e.values]), np.concatenate([frame.missing, e.missing]),
                             np.concatenate([frame.feature_ts, e.feature_ts]))
    return frame, found, problem


def empty_pair_table(fs: FeatureSet, now_ms: int) -> PairTable:
    lay = StateLayout(fs)
    return PairTable(fs, np.empty(0, dtype=np.int64), read_features(lay, lay.empty(1), now_ms))


class UserFeaturePlan:
    """The keys a request reads for a user, fixed for one release + catalogue."""

    def __init__(self, inputs: RankerInputs, sets: Mapping[str, FeatureSet], catalog: ItemCatalog, prefetch_limit: int,
                 modes: ModePlan | None = None) -> None:
        self.inputs = inputs
        self.modes = modes if modes is not None else ModePlan({})
        self.on_read = {name for name in sets if self.modes.of(name).mode is ServingMode.ON_READ}  # read raw events, compute
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
        self._prefetch_ids = {name: [str(v) for v in vals.tolist()] for name, vals in self.prefetch.items()}
        self.position_sets = [self.user_set.name] + [fs.name for fs, _ in self.pair_sets if fs.name in self.prefetch
                                                     for _ in range(len(self.prefetch[fs.name]))]  # per position of state_keys
        h = hashlib.blake2b(digest_size=8)
        h.update(self.user_set.version.encode())
        h.update(",".join(sorted(self.on_read)).encode())  # cached records are of the modes they were read under
        for fs, _ in self.pair_sets:
            h.update(fs.version.encode())
            h.update(self.prefetch[fs.name].tobytes() if fs.name in self.prefetch else b"-")
        self.plan_id = h.hexdigest()

    @property
    def deferred(self) -> list[tuple[FeatureSet, str]]:
        """Pair sets read after retrieval, for the candidates' values only."""
        return [(fs, col) for fs, col in self.pair_sets if fs.name not in self.prefetch]

    def state_keys(self, user_id: int) -> list[RecordKey]:
        """The state records of the user set and the prefetched pair sets, in `keys` order."""
        keys = record_keys(self.user_set, [user_id])
        for fs, _ in self.pair_sets:
            if fs.name in self.prefetch:
                keys += record_keys(fs, (int(user_id) << 32) | self.prefetch[fs.name])
        return keys

    def groups(self, user_id: int) -> list[KeyGroup]:
        """One round trip's keys, as the store takes them on the request path (no RecordKey per
        key): the served-values records beside `state_keys` (an on_read set's records
        themselves), then the seen record."""
        u = str(int(user_id))
        out = [KeyGroup(self.user_set.name, self._read_version(self.user_set), self.user_set.entity.name, [u])]
        for fs, _ in self.pair_sets:
            if fs.name in self.prefetch:
                out.append(KeyGroup(fs.name, self._read_version(fs), fs.entity.name, [f"{u}|{v}" for v in self._prefetch_ids[fs.name]]))
        out.append(KeyGroup(SEEN_SET, SEEN_VERSION, "user", [u]))
        return out

    def _read_version(self, fs: FeatureSet) -> str:
        return fs.version if fs.name in self.on_read else fs.version + VALUES_SUFFIX

    def keys(self, user_id: int) -> list[RecordKey]:
        """`groups` as RecordKeys (for tools and tests)."""
        return [k for g in self.groups(user_id) for k in g.keys()]

    def _read_keys(self, state_keys: list[RecordKey]) -> list[RecordKey]:
        """What a request reads for these states: the values record beside each, or the record
        itself for an on_read set."""
        if not self.on_read:
            return values_keys(state_keys)
        return [k if k.feature_set in self.on_read else values_key(k) for k in state_keys]

    def expired(self, raw: Sequence[bytes | None], now_ms: int) -> np.ndarray:
        """Positions in `raw` (of `keys`) whose values record cannot answer at now_ms: the reader
        puts the state record of `state_keys()[pos]` there instead."""
        out = [np.empty(0, dtype=np.int64) if self.user_set.name in self.on_read else np.flatnonzero(expired(self.user_layout, raw[:1], now_ms))]
        pos = 1
        for fs, _ in self.pair_sets:
            vals = self.prefetch.get(fs.name)
            if vals is None:
                continue
            if fs.name not in self.on_read:
                out.append(pos + np.flatnonzero(expired(self.pair_layouts[fs.name], raw[pos : pos + len(vals)], now_ms)))
            pos += len(vals)
        return np.concatenate(out)

    def pair_keys(self, fs: FeatureSet, user_id: int, values: np.ndarray) -> list[RecordKey]:
        """Served-values keys of (user, v) pairs; `pair_state_keys` are the states beside them."""
        return self._read_keys(self.pair_state_keys(fs, user_id, values))

    def pair_group(self, fs: FeatureSet, user_id: int, values: np.ndarray) -> KeyGroup:
        """`pair_keys` as one KeyGroup (no RecordKey per pair: a request reads ~100-200 of them)."""
        ids = fs.entity.key_ids((int(user_id) << 32) | np.asarray(values, dtype=np.int64))
        return KeyGroup(fs.name, fs.version if fs.name in self.on_read else fs.version + VALUES_SUFFIX, fs.entity.name, ids)

    def pair_state_keys(self, fs: FeatureSet, user_id: int, values: np.ndarray) -> list[RecordKey]:
        return record_keys(fs, (int(user_id) << 32) | np.asarray(values, dtype=np.int64))

    def read_records(self, store: OnlineStore, user_id: int, now_ms: int) -> list[bytes | None]:
        """The records `decode` takes, read synchronously with no budget or cache: `keys`, then
        the states of the values records that cannot answer at now_ms (what server/records.py
        does on the request path; for tools and tests)."""
        raw = store.get_groups(self.groups(user_id))
        pos = self.expired(raw, now_ms)
        if len(pos):
            sk = self.state_keys(user_id)
            for p, st in zip(pos.tolist(), store.get_many([sk[p] for p in pos.tolist()])):
                raw[p] = st
        return raw

    def bytes_by_set(self, raw: Sequence[bytes | None], positions: Sequence[int] | None = None) -> dict[str, tuple[int, int]]:
        """(records found, bytes) per feature set in `raw` (of `keys`, or of `positions` of it)."""
        out: dict[str, list[int]] = {}
        pos = range(len(self.position_sets)) if positions is None else positions
        for p, r in zip(pos, raw):
            if r is not None:
                c = out.setdefault(self.position_sets[p], [0, 0])
                c[0] += 1
                c[1] += len(r)
        return {k: (v[0], v[1]) for k, v in out.items()}

    def layouts_of(self, keys: list[RecordKey]) -> list[tuple[StateLayout, list[RecordKey]]]:
        """State keys grouped by the layout of their feature set (for the values repair)."""
        by: dict[str, list[RecordKey]] = {}
        for k in keys:
            by.setdefault(k.feature_set, []).append(k)
        lays = {self.user_set.name: self.user_layout, **self.pair_layouts}
        return [(lays[name], ks) for name, ks in by.items()]

    def pairs_expired(self, fs: FeatureSet, raw: Sequence[bytes | None], now_ms: int) -> np.ndarray:
        if fs.name in self.on_read:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(expired(self.pair_layouts[fs.name], raw, now_ms))

    def decode(self, user_id: int, raw: Sequence[bytes | None] | None, now_ms: int, *, source: str = "store", degraded: bool = False) -> UserFeatures:
        """UserFeatures from the raw records of `keys(user_id)`; raw None: every feature missing."""
        if raw is None:
            raw = [None] * len(self.keys(user_id))
        problems = []
        frame, found, p = _read(self.user_layout, raw[:1], now_ms, extra_empty=False, on_read=self.user_set.name in self.on_read)
        if p:
            problems.append(p)
        pos = 1
        pairs = {}
        for fs, _ in self.pair_sets:
            vals = self.prefetch.get(fs.name)
            if vals is None:
                continue
            fr, _, p = _read(self.pair_layouts[fs.name], raw[pos : pos + len(vals)], now_ms, extra_empty=True, on_read=fs.name in self.on_read)
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
        fr, _, p = _read(self.pair_layouts[fs.name], raw, now_ms, extra_empty=True, on_read=fs.name in self.on_read)
        if p:
            log.warning("pair features: %s", p)
        return PairTable(fs, vals, fr)
