"""The served-values record: an entity's finished feature values and how long they stay exact.

Reading a feature from its state record costs a 2 KB transfer and the window arithmetic of
`read_features` per entity; for 1 user + 500 items that was ~1.2 MB over the wire and most of
the read time. Between two events the values of a state barely move: a window's value
changes only when a non-empty tile leaves it, a decayed sum changes by one multiply, the
last value never, and everything turns missing at the TTL. So every writer that stores a
state also stores, beside it, the values as of just after its newest event, the interval in
which they are exactly what `read_features` would compute from the state (`valid_from`,
`valid_until`), and the decay clocks. A read inside that interval decodes values only (one
`np.frombuffer`, one multiply per decayed column); a read outside it (or a record of an
older format) is reported as expired and the caller reads the state record instead. The
values are bit-for-bit those of `read_features` (the same expressions on the same inputs).

The record lives under its own key (the state's key with `VALUES_SUFFIX` on the version), so
a reader moves ~350 bytes instead of ~2 KB, and it is written in the same store commit as
the state, so the two never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from features.definitions import Agg, FeatureSet
from features.online.base import Commit, OnlineStore, RecordKey, Snapshot, Write
from features.state import NO_TILE, FeatureFrame, StateLayout, decay_factor, read_features

__all__ = ["ServedValues", "ValuesRead", "VALUES_SUFFIX", "values_key", "values_keys", "served_values", "state_writes", "state_records", "writes_of", "repair", "merge_states", "read_mixed", "MixedRead", "expired"]

VALUES_SUFFIX = ".v"
_MAGIC = np.uint32(0x50525456)  # "PRTV"
_STATE_MAGIC = np.uint32(0x50525459).tobytes()  # features/state.py's, little-endian
_NEVER = np.int64(np.iinfo(np.int64).max)


def values_key(key: RecordKey) -> RecordKey:
    """The served-values key beside a state key."""
    return RecordKey(key.feature_set, key.version + VALUES_SUFFIX, key.entity_type, key.entity_id)


def values_keys(keys: Sequence[RecordKey]) -> list[RecordKey]:
    return [values_key(k) for k in keys]


@dataclass(frozen=True)
class ValuesRead:
    """Values as of t for a batch of served-values records.

    `expired` rows (a record exists but t lies outside its exact interval, or it is of a
    foreign format) carry defaults here: read their state records and replace them."""

    frame: FeatureFrame
    found: np.ndarray  # (n,) a values record existed
    expired: np.ndarray  # (n,) the record cannot answer at t: read the state instead


@dataclass(frozen=True)
class _Decayed:
    col: int  # first column
    width: int
    field: str  # the decay's state field prefix (its sum is `{field}_s`, its clock `{field}_t`)
    half_life_ms: int


class ServedValues:
    """Encoder and reader of one feature set's served-values records."""

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout
        fs: FeatureSet = layout.feature_set
        self.columns = layout.columns
        n = len(self.columns)
        fields: list[tuple] = [("magic", "<u4"), ("ncol", "<u4"), ("valid_from", "<i8"), ("valid_until", "<i8"), ("feature_ts", "<i8")]
        fields += [(f"{d.field}_t", "<i8") for d in layout.decays]
        fields += [("values", "<f8", (n,))]
        self.dtype = np.dtype(fields)
        self.defaults = np.array([f.default for f in fs.features for _ in f.columns], dtype=np.float64)
        self._decayed: list[_Decayed] = []
        j = 0
        for f in fs.features:
            w = len(f.columns)
            if f.agg in (Agg.DECAYED_SUM, Agg.DECAYED_VECTOR):
                d = layout.decay_for(f)
                self._decayed.append(_Decayed(j, w, d.field, d.half_life_ms))
            j += w
        # (ring field, tile ms, ring tiles, window tiles): each distinct window a feature reads
        windows = sorted({(layout.ring_for(f).field, f.window.tile_ms, layout.ring_for(f).n_tiles, f.window.n_tiles)
                          for f in fs.features if f.window is not None})
        self._rings: list[tuple[tuple[str, int, int], list[int]]] = []  # (ring field, tile ms, ring tiles) -> its window lengths
        for field, tile_ms, tiles, k in windows:
            if not self._rings or self._rings[-1][0] != (field, tile_ms, tiles):
                self._rings.append(((field, tile_ms, tiles), []))
            self._rings[-1][1].append(k)
        # an entity with no record reads as this at any time (no feature timestamp: every value missing, its default)
        self.empty_row = FeatureFrame(list(self.columns), self.defaults[None, :].copy(), np.ones((1, n), dtype=bool), np.full(1, -1, dtype=np.int64))

    @property
    def record_size(self) -> int:
        return self.dtype.itemsize

    # -- writing -----------------------------------------------------------------------------
    def interval(self, states: np.ndarray, t_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per state, the interval [from, until) around t_ref in which `read_features` equals its
        value as of t_ref (up to the decay multiply): it ends when a non-empty tile leaves a
        window or at the TTL, and starts after the newest event and the last such change."""
        fts = states["feature_ts"].astype(np.int64)
        ttl = self.layout.feature_set.ttl_ms
        dead_at = fts + 1 + ttl  # alive while t - fts <= ttl
        start = fts + 1
        until = np.full(len(states), _NEVER, dtype=np.int64)
        for (field, tile_ms, n), ks in self._rings:
            head = states[f"{field}_head"].astype(np.int64)
            slot_tile = head[:, None] - ((head[:, None] - np.arange(n, dtype=np.int64)[None, :]) % n)
            # a ring's filled tiles, by how far below the current tile they lie (the same for all its windows)
            below = np.where((states[f"{field}_count"] > 0) & (head[:, None] != NO_TILE), (t_ref // tile_ms)[:, None] - slot_tile, -1)
            for k in ks:
                # the window ending in tile c holds tiles c-k+1..c: a tile `d` below c leaves it k - d tiles on
                inside = (below >= 0) & (below < k)
                d_max = np.where(inside, below, -1).max(axis=1)
                until = np.minimum(until, np.where(d_max >= 0, ((t_ref // tile_ms) - d_max + k) * tile_ms, _NEVER))
                d_gone = np.where(below >= k, below, _NEVER).min(axis=1)  # the newest tile that already left
                start = np.maximum(start, np.where(d_gone < _NEVER, ((t_ref // tile_ms) - d_gone + k) * tile_ms, start))
        alive = t_ref < dead_at
        until = np.where(alive, np.minimum(until, dead_at), _NEVER)  # once expired it stays missing
        start = np.where(alive, start, dead_at)
        return start, until

    def encode(self, states: np.ndarray, t_ref: int | np.ndarray | None = None) -> list[bytes]:
        """One served-values record per state, with values as of `t_ref` (default: just after
        each state's newest event; writers pass the time they write at, so an entity quiet for
        days gets an interval that starts now). States with no event get an empty interval."""
        raw = self.encode_array(states, t_ref).tobytes()
        k = self.record_size
        return [raw[i : i + k] for i in range(0, len(raw), k)]

    def encode_array(self, states: np.ndarray, t_ref: int | np.ndarray | None = None) -> np.ndarray:
        """`encode`'s records as one structured array (`dtype`): for a holder that keeps them in
        process (the server's item table) and never needs the bytes."""
        n = len(states)
        rec = np.zeros(n, dtype=self.dtype)
        rec["magic"] = _MAGIC
        rec["ncol"] = len(self.columns)
        fts = states["feature_ts"].astype(np.int64)
        t = fts + 1 if t_ref is None else np.maximum(np.broadcast_to(np.asarray(t_ref, dtype=np.int64), (n,)), fts + 1)
        frame = read_features(self.layout, states, t)
        vals = np.where(frame.missing, np.nan, frame.values)
        for d in self._decayed:  # the undecayed sum: a reader multiplies by the decay to its time
            s = states[f"{d.field}_s"].reshape(n, d.width)
            vals[:, d.col : d.col + d.width] = np.where(frame.missing[:, d.col : d.col + d.width], np.nan, s)
            rec[f"{d.field}_t"] = states[f"{d.field}_t"]
        start, until = self.interval(states, t)
        has = fts >= 0
        rec["values"] = vals
        rec["feature_ts"] = np.where(frame.feature_ts >= 0, fts, -1)
        rec["valid_from"] = np.where(has, start, _NEVER)
        rec["valid_until"] = np.where(has, until, np.iinfo(np.int64).min)
        return rec

    # -- reading -----------------------------------------------------------------------------
    def read(self, records: Sequence[bytes | None], t: int) -> ValuesRead:
        n = len(records)
        ncol = len(self.columns)
        size = self.record_size
        lens = np.fromiter((-1 if r is None else len(r) for r in records), dtype=np.int64, count=n)
        present = lens >= 0
        expired = present & (lens != size)  # a record of another format: the state answers
        values = np.empty((n, ncol), dtype=np.float64)
        values[:] = self.defaults
        missing = np.ones((n, ncol), dtype=bool)
        fts_out = np.full(n, -1, dtype=np.int64)
        whole = lens == size
        idx = np.flatnonzero(whole)
        if len(idx):
            # the common case, every record present and of this format, joins the list as it is
            blob = b"".join(records) if len(idx) == n else b"".join([records[i] for i in idx.tolist()])
            rec = np.frombuffer(blob, dtype=self.dtype)
            good = self.answers(rec, t)
            if not good.all():
                expired[idx[~good]] = True
                rec, idx = rec[good], idx[good]
            v, miss = self.values_at(rec, t)
            values[idx] = v
            missing[idx] = miss
            fts_out[idx] = rec["feature_ts"]
        return ValuesRead(FeatureFrame(list(self.columns), values, missing, fts_out), present, expired)

    def answers(self, rec: np.ndarray, t: int) -> np.ndarray:
        """Which records (a `dtype` array) hold this set's values exactly at t."""
        return (rec["magic"] == _MAGIC) & (rec["ncol"] == len(self.columns)) & (rec["valid_from"] <= t) & (t < rec["valid_until"])

    def values_at(self, rec: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(values with defaults where missing, missing) as of t of records that `answer` at t."""
        v = rec["values"].copy()
        for d in self._decayed:
            td = rec[f"{d.field}_t"].astype(np.int64)
            fac = np.where(td >= 0, decay_factor(np.maximum(t - td, 0), d.half_life_ms), 0.0)
            v[:, d.col : d.col + d.width] *= fac[:, None]
        miss = np.isnan(v)
        return np.where(miss, self.defaults, v), miss


@dataclass(frozen=True)
class MixedRead:
    frame: FeatureFrame
    found: np.ndarray  # (n,) a record (values or state) existed
    unresolved: np.ndarray  # (n,) a values record that cannot answer at t and no state in its place: read as missing


def read_mixed(layout: StateLayout, records: Sequence[bytes | None], t: int) -> MixedRead:
    """Values as of t from a list holding, per entity, its served-values record or, where that
    could not answer, its state record (told apart by their magic numbers), or None."""
    sv = served_values(layout)
    size = layout.record_size
    is_state = np.fromiter((r is not None and len(r) == size and r[:4] == _STATE_MAGIC for r in records), dtype=bool, count=len(records))
    if not is_state.any():
        got = sv.read(records, t)
        return MixedRead(got.frame, got.found, got.expired)
    idx = np.flatnonzero(is_state)
    got = sv.read([None if s else r for r, s in zip(records, is_state.tolist())], t)
    states, _ = layout.decode([records[i] for i in idx.tolist()])
    fr = read_features(layout, states, t)
    f = got.frame
    f.values[idx], f.missing[idx], f.feature_ts[idx] = fr.values, fr.missing, fr.feature_ts
    found = got.found | is_state
    return MixedRead(f, found, got.expired & ~is_state)


def expired(layout: StateLayout, records: Sequence[bytes | None], t: int) -> np.ndarray:
    """Positions of served-values records that cannot answer at t (their state must be read)."""
    size = served_values(layout).record_size
    lens = np.fromiter((-1 if r is None else len(r) for r in records), dtype=np.int64, count=len(records))
    idx = np.flatnonzero(lens == size)
    out = np.zeros(len(records), dtype=bool)
    if len(idx):
        rec = np.frombuffer(b"".join([records[i] for i in idx.tolist()]), dtype=served_values(layout).dtype)
        out[idx] = (rec["magic"] == _MAGIC) & ~((rec["valid_from"] <= t) & (t < rec["valid_until"]))
    other = (lens >= 0) & (lens != size)  # not a values record: a state one answers itself, a foreign one reads as missing
    return out & ~other


def merge_states(layout: StateLayout, got: ValuesRead, state_records: Sequence[bytes | None], t: int) -> FeatureFrame:
    """Replace the expired rows of a values read with `read_features` of their state records
    (`state_records` holds one per expired row, in row order)."""
    rows = np.flatnonzero(got.expired)
    if len(rows) == 0:
        return got.frame
    states, _ = layout.decode(list(state_records))
    fr = read_features(layout, states, t)
    f = got.frame
    f.values[rows] = fr.values
    f.missing[rows] = fr.missing
    f.feature_ts[rows] = fr.feature_ts
    return f


_CODECS: dict[str, ServedValues] = {}


def served_values(layout: StateLayout) -> ServedValues:
    """The codec of a layout (built once per feature-set version: writers call this per batch)."""
    fs = layout.feature_set
    key = f"{fs.name}:{fs.version}"
    sv = _CODECS.get(key)
    if sv is None or sv.layout.dtype != layout.dtype:
        sv = _CODECS[key] = ServedValues(layout)
    return sv


def state_writes(layout: StateLayout, keys: Sequence[RecordKey], states: np.ndarray, t_ref: int | np.ndarray | None = None) -> list[Write]:
    """The writes that store states: each state record and, beside it, its served-values record.
    Every writer of states goes through here, so a reader never finds one without the other."""
    return writes_of(layout, keys, *state_records(layout, states, t_ref))


def state_records(layout: StateLayout, states: np.ndarray, t_ref: int | np.ndarray | None = None) -> tuple[list[bytes], list[bytes]]:
    """The bytes `state_writes` stores, without keys: (state records, served-values records).
    The batch path on Ray (features.engine_ray) computes these where a partition's states are."""
    return layout.encode(states), served_values(layout).encode(states, t_ref)


def writes_of(layout: StateLayout, keys: Sequence[RecordKey], state_recs: Sequence[bytes], values_recs: Sequence[bytes] | None) -> list[Write]:
    """The writes of `state_records` under their keys (`values_recs` None: state records only)."""
    ttl = layout.feature_set.ttl_ms
    out = [Write(k, v, ttl) for k, v in zip(keys, state_recs)]
    if values_recs is not None:
        out += [Write(values_key(k), v, ttl) for k, v in zip(keys, values_recs)]
    return out


def repair(store: OnlineStore, layout: StateLayout, keys: Sequence[RecordKey], t: int) -> int:
    """Rewrite the served-values records of `keys` (state keys) as of t, from their states, in one
    optimistic transaction: if a writer changed a state meanwhile, nothing is written (that
    writer wrote fresh values itself). Returns how many records were rewritten."""
    keys = list(keys)
    if not keys:
        return 0
    done = [0]

    def decide(snap: Snapshot) -> Commit:
        have = [i for i, v in enumerate(snap.values) if v is not None]
        if not have:
            return Commit()
        states, _ = layout.decode([snap.values[i] for i in have])
        vals = served_values(layout).encode(states, t)
        done[0] = len(have)
        return Commit([Write(values_key(keys[i]), v, layout.feature_set.ttl_ms) for i, v in zip(have, vals)])

    store.transact(keys, [], [], decide)
    return done[0]
