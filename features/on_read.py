"""The `on_read` serving mode: each entity's recent raw events, and the values computed from them.

An on_read record holds, for one entity of one feature-set version,
  * a 32-byte header: magic 0x50524157 ("PRAW", distinct from the state record's 0x50525459
    "PRTY", so neither is ever mistaken for the other), a format version, flags, a
    fingerprint of the set version, the feature timestamp (the newest event held or folded)
    and the number of raw events;
  * a BASE STATE, the set's own StateLayout record, into which the events that no longer fit
    were folded (absent until the first overflow: most entities never hold `cap` events, and
    a base is ~2 KB for user_activity against 29 bytes per raw event);
  * up to `cap` raw events, fixed-width little-endian, sorted by (ts, event_id) at the last
    fold and appended as they came since (an append within the cap copies bytes only),
    holding only the event columns the set's features read (ts, event_id, type, the value if
    a feature reads values, and index columns such as topic). Entity keys are not kept: the
    record is per entity. A COUNT-only source does not keep `value`: the base state's sums
    and maxima of a ring that no feature reads then stay 0, and every feature reads the same.

Why the numbers equal the streaming path's: a read folds the held events into a copy of the
base state with `state.apply_events` and reads it with `state.read_features`, the same two
functions the streaming path runs. apply_events gives the same state whatever the order and
grouping of the events it is handed (ring heads, decays and last values are all order-free,
up to float rounding), so folding the oldest events early at an overflow, the rest at read
time, is the same as folding them all as they arrived. Nothing is ever dropped to honour the
cap: it only decides how much is kept raw.

A state record of the same layout is read as a base with no raw events, so a set switched
from streaming or materialized to on_read needs no rewrite: the next append builds on it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from features.definitions import Agg, FeatureSet
from features.events import EVENT_SCHEMA, EventBatch
from features.modes import DEFAULT_CAP, MAX_CAP, ServingMode, SetMode
from features.state import FeatureFrame, StateLayout, apply_events, read_features

__all__ = ["FORMAT_VERSION", "HEADER_SIZE", "RAW_MAGIC", "OnReadLayout", "is_on_read_record"]

RAW_MAGIC = 0x50524157  # "PRAW"
_RAW_MAGIC_BYTES = RAW_MAGIC.to_bytes(4, "little")
FORMAT_VERSION = 1
_HAS_BASE = 1  # flags bit: a base state follows the header
_HEADER = np.dtype(
    [
        ("magic", "<u4"),
        ("format", "<u2"),
        ("flags", "<u2"),
        ("set_version", "<u8"),  # fingerprint of the feature-set version the record belongs to
        ("feature_ts", "<i8"),  # newest event ts, held or folded (-1: none)
        ("n_events", "<u4"),
        ("pad", "<u4"),
    ]
)
HEADER_SIZE = _HEADER.itemsize  # 32
_LAYOUTS: dict[tuple[str, str, int], "OnReadLayout"] = {}
_FILL = {"value": 0.0}  # columns a set does not keep read as this (ids as -1: unknown)


def is_on_read_record(record: bytes | None) -> bool:
    """Whether a stored value is an on_read record (else a state record, or nothing)."""
    return record is not None and record[:4] == _RAW_MAGIC_BYTES


def _schema_dtype(column: str) -> np.dtype:
    return np.dtype(EVENT_SCHEMA.field(column).type.to_pandas_dtype()).newbyteorder("<")


def _event_columns(fs: FeatureSet) -> list[str]:
    """The event columns apply_events reads for this set's features, and nothing else.

    Part of the record format: a change to this rule needs a new FORMAT_VERSION."""
    cols = ["ts", "event_id", "type"]
    if any(f.agg is not Agg.COUNT and fs.source(f.source).value == "value" for f in fs.features):
        cols.append("value")
    for f in fs.features:
        if f.index_column is not None and f.index_column not in cols:
            cols.append(f.index_column)
    return cols


@dataclass(frozen=True)
class _Parsed:
    present: np.ndarray  # (n,) bool
    raw: np.ndarray  # (n,) bool: an on_read record (else absent or a state record)
    head: np.ndarray  # (n,) _HEADER, checked; zeros (feature_ts -1) where not raw


@dataclass(frozen=True)
class _Decoded:
    states: np.ndarray  # (n,) base states (empty where none), writable copies
    has_base: np.ndarray  # (n,) bool
    feature_ts: np.ndarray  # (n,) int64 from the headers (-1: none)
    present: np.ndarray  # (n,) bool
    events: np.ndarray  # held raw events of all records, record by record, in the order kept
    rows: np.ndarray  # (len(events),) record of each held event


class OnReadLayout:
    """The on_read record of one feature-set version, with a raw-event cap."""

    def __init__(self, fs: FeatureSet, cap: int = DEFAULT_CAP) -> None:
        if isinstance(cap, bool) or not isinstance(cap, int):
            raise TypeError(f"cap must be an int, got {cap!r}")
        if not 1 <= cap <= MAX_CAP:
            raise ValueError(f"cap must be in [1, {MAX_CAP}], got {cap}")
        self.feature_set = fs
        self.cap = cap
        self.keep = cap - cap // 2  # raw events left after an overflow
        self.state = StateLayout(fs)
        self.columns = _event_columns(fs)
        self.event_dtype = np.dtype([(c, _schema_dtype(c)) for c in self.columns])
        self._set_version = np.uint64(int(hashlib.sha256(fs.version.encode()).hexdigest()[:16], 16))

    @classmethod
    def for_mode(cls, fs: FeatureSet, mode: SetMode) -> OnReadLayout:
        if mode.mode is not ServingMode.ON_READ:
            raise ValueError(f"feature set {fs.name} is served {mode.mode.value}, not on_read")
        return cls.cached(fs, mode.cap)

    @classmethod
    def cached(cls, fs: FeatureSet, cap: int = DEFAULT_CAP) -> OnReadLayout:
        """One layout per (set version, cap): writers and readers ask per batch and per request."""
        key = (fs.name, fs.version, int(cap))
        lay = _LAYOUTS.get(key)
        if lay is None:
            lay = _LAYOUTS[key] = cls(fs, cap)
        return lay

    # -- sizes ---------------------------------------------------------------------------
    def record_size(self, n_events: int, *, with_base: bool) -> int:
        return HEADER_SIZE + (self.state.record_size if with_base else 0) + n_events * self.event_dtype.itemsize

    @property
    def max_record_size(self) -> int:
        """A full record: header, base state and `cap` raw events."""
        return self.record_size(self.cap, with_base=True)

    # -- writing -------------------------------------------------------------------------
    def append(self, record: bytes | None, events: EventBatch) -> bytes:
        """One entity's record with `events` added (deduplicated, filtered by event_mask)."""
        if len(events):
            codes = self.feature_set.entity.codes(events)[0]
            if np.any(codes != codes[0]):
                raise ValueError(f"append takes the events of one {self.feature_set.entity.name}; use append_many for several")
        return self.append_many([record], np.zeros(len(events), dtype=np.int64), events)[0]

    def append_many(self, records: Sequence[bytes | None], rows: np.ndarray, events: EventBatch) -> list[bytes]:
        """Every record with its new events (`rows[i]` = record of event i), in one pass.

        A record that stays within its cap is appended to as bytes: new header, its base
        and events as they were, the new events after them (no decoding, no sorting). One
        that would hold more than `cap` events has its oldest by (ts, event_id) folded into
        its base state until `keep` remain (one apply_events call for all such records).
        """
        fs = self.feature_set
        n = len(records)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape != (len(events),):
            raise ValueError(f"rows must give one record per event: {rows.shape} for {len(events)} events")
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"rows must be in [0, {n}), got [{rows.min()}, {rows.max()}]")
        outside = ~fs.event_mask(events)
        if outside.any():
            raise ValueError(
                f"{int(outside.sum())} events are not {fs.name}'s (no source of the set, or no valid "
                f"{fs.entity.name}); filter with FeatureSet.event_mask first"
            )
        p = self._parse(records)
        by_row = np.argsort(rows, kind="stable")
        new, new_rows = self._pack(events)[by_row], rows[by_row]
        new_counts = np.bincount(new_rows, minlength=n)
        fts = p.head["feature_ts"].copy()
        if len(events):
            np.maximum.at(fts, rows, events.ts)
        total = p.head["n_events"].astype(np.int64) + new_counts
        slow = (total > self.cap) | (p.present & ~p.raw)  # overflowing, or a state record to convert
        head = p.head.copy()
        head["magic"], head["format"], head["set_version"] = RAW_MAGIC, FORMAT_VERSION, self._set_version
        head["feature_ts"], head["n_events"] = fts, total
        hb, nb, es = head.tobytes(), new.tobytes(), self.event_dtype.itemsize
        ends = (np.cumsum(new_counts) * es).tolist()
        starts = [0, *ends[:-1]]
        out: list = [None] * n
        for i in np.flatnonzero(~slow).tolist():
            old = records[i]
            out[i] = b"".join((hb[i * HEADER_SIZE : (i + 1) * HEADER_SIZE], bytes(old[HEADER_SIZE:]) if old is not None else b"",
                               nb[starts[i] : ends[i]]))
        sl = np.flatnonzero(slow)
        if len(sl):
            local = np.full(n, -1, dtype=np.int64)
            local[sl] = np.arange(len(sl))
            mine = local[new_rows] >= 0
            for i, rec in zip(sl.tolist(), self._refold([records[i] for i in sl.tolist()], new[mine], local[new_rows[mine]], fts[sl])):
                out[i] = rec
        return out

    def _refold(self, records: list, new: np.ndarray, new_rows: np.ndarray, fts: np.ndarray) -> list[bytes]:
        """Records rebuilt whole: base and held events decoded, the new ones merged in order,
        the oldest beyond the cap folded into the base."""
        d = self._decode(records)
        n = len(records)
        ev = np.concatenate([d.events, new])
        ev_rows = np.concatenate([d.rows, new_rows])
        order = np.lexsort((ev["event_id"], ev["ts"], ev_rows))
        ev, ev_rows = ev[order], ev_rows[order]
        counts = np.bincount(ev_rows, minlength=n)
        over = np.where(counts > self.cap, counts - self.keep, 0)
        rank = np.arange(len(ev_rows)) - (np.cumsum(counts) - counts)[ev_rows]
        fold = rank < over[ev_rows]  # the oldest events of each overflowing record
        states, has_base = d.states, d.has_base | (over > 0)
        if fold.any():
            apply_events(self.state, states, ev_rows[fold], self._unpack(ev[fold]))
        head = np.zeros(n, dtype=_HEADER)
        head["magic"], head["format"], head["set_version"] = RAW_MAGIC, FORMAT_VERSION, self._set_version
        head["flags"] = np.where(has_base, _HAS_BASE, 0)
        head["feature_ts"] = np.maximum(fts, d.feature_ts)  # a state record's own feature_ts counts too
        head["n_events"] = counts - over
        return self._encode(head, states, has_base, np.ascontiguousarray(ev[~fold]), counts - over)

    def _encode(self, head: np.ndarray, states: np.ndarray, has_base: np.ndarray, events: np.ndarray, n_events: np.ndarray) -> list[bytes]:
        hb, sb, eb = head.tobytes(), np.ascontiguousarray(states).tobytes(), events.tobytes()
        rs, es = self.state.record_size, self.event_dtype.itemsize
        ends = (np.cumsum(n_events) * es).tolist()
        out, start = [], 0
        for i, (base, end) in enumerate(zip(has_base.tolist(), ends)):
            parts = [hb[i * HEADER_SIZE : (i + 1) * HEADER_SIZE], sb[i * rs : (i + 1) * rs] if base else b"", eb[start:end]]
            out.append(b"".join(parts))
            start = end
        return out

    # -- reading -------------------------------------------------------------------------
    def states(self, records: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
        """(states, present): each record's base with its raw events folded in, i.e. the
        state the streaming path would hold after the same events. Also what a set switched
        from on_read back to streaming writes (StateLayout.encode)."""
        d = self._decode(records)
        if len(d.events):
            apply_events(self.state, d.states, d.rows, self._unpack(d.events))
        return d.states, d.present

    def read(self, records: Sequence[bytes | None], t: int | np.ndarray) -> tuple[FeatureFrame, np.ndarray]:
        """(values as of t, found): one apply_events and one read_features for all records."""
        states, present = self.states(records)
        return read_features(self.state, states, t), present

    def feature_ts(self, records: Sequence[bytes | None]) -> np.ndarray:
        """Newest event time per record (-1 where absent), from the headers (state records:
        from the state): for staleness reports that need no values."""
        if all(r is None or is_on_read_record(r) for r in records):
            return self._parse(records).head["feature_ts"].copy()
        return self._decode(records).feature_ts

    def held_events(self, record: bytes) -> EventBatch:
        """The events a record keeps raw, in the order kept: sorted by (ts, event_id) at the
        last fold, then as appended (columns it does not keep read -1, or 0.0 for value):
        for audits, erasure checks and tests."""
        d = self._decode([record])
        return self._unpack(d.events)

    # -- packing -------------------------------------------------------------------------
    def _pack(self, events: EventBatch) -> np.ndarray:
        out = np.empty(len(events), dtype=self.event_dtype)
        for c in self.columns:
            out[c] = getattr(events, c)
        return out

    def _unpack(self, ev: np.ndarray) -> EventBatch:
        n = len(ev)
        cols = {}
        for f in EVENT_SCHEMA:
            if f.name in self.columns:
                cols[f.name] = np.ascontiguousarray(ev[f.name]).astype(f.type.to_pandas_dtype(), copy=False)
            else:  # a column no feature of the set reads: a constant, never materialised
                cols[f.name] = np.broadcast_to(np.asarray(_FILL.get(f.name, -1), dtype=f.type.to_pandas_dtype()), (n,))
        return EventBatch(**cols)

    def _parse(self, records: Sequence[bytes | None]) -> _Parsed:
        """Headers of every record, checked; state records are only recognised (raw False)."""
        n = len(records)
        present = np.fromiter((r is not None for r in records), dtype=bool, count=n)
        head = np.zeros(n, dtype=_HEADER)
        head["feature_ts"] = -1
        raw = np.zeros(n, dtype=bool)
        idx = np.flatnonzero(present)
        if len(idx) == 0:
            return _Parsed(present, raw, head)
        blobs = [records[i] for i in idx.tolist()]
        for b in blobs:
            if not isinstance(b, (bytes, bytearray, memoryview)):
                raise TypeError(f"records are bytes or None, got {type(b).__name__}")
        h = np.frombuffer(b"".join(bytes(b[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0") for b in blobs), dtype=_HEADER)
        mine = h["magic"] == RAW_MAGIC
        if mine.any():
            lens = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
            self._check_headers(h[mine], lens[mine])
            head[idx[mine]] = h[mine]
            raw[idx[mine]] = True
        return _Parsed(present, raw, head)

    def _decode(self, records: Sequence[bytes | None]) -> _Decoded:
        """Base states and held events of every record (state records become bases)."""
        fs = self.feature_set
        p = self._parse(records)
        n = len(records)
        states = self.state.empty(n)
        has_base = np.zeros(n, dtype=bool)
        fts = p.head["feature_ts"].copy()
        other = np.flatnonzero(p.present & ~p.raw)
        if len(other):  # not ours: a state record of this layout, or an error
            try:
                st, _ = self.state.decode([bytes(records[i]) for i in other.tolist()])
            except ValueError as exc:
                raise ValueError(f"{fs.name} {fs.version}: record is neither on_read (magic PRAW) nor this set's state record: {exc}") from None
            states[other] = st
            has_base[other] = True
            fts[other] = st["feature_ts"]
        mine = np.flatnonzero(p.raw)
        if len(mine) == 0:
            return _Decoded(states, has_base, fts, p.present, np.empty(0, dtype=self.event_dtype), np.empty(0, dtype=np.int64))
        h = p.head[mine]
        with_base = (h["flags"] & _HAS_BASE) != 0
        rs = self.state.record_size
        based = mine[with_base]
        if len(based):
            try:
                st, _ = self.state.decode([bytes(records[i][HEADER_SIZE : HEADER_SIZE + rs]) for i in based.tolist()])
            except ValueError as exc:
                raise ValueError(f"{fs.name} {fs.version}: on_read record has a corrupt base state: {exc}") from None
            states[based] = st
            has_base[based] = True
        starts = (HEADER_SIZE + with_base * rs).tolist()
        events = np.frombuffer(b"".join(bytes(records[i][s:]) for i, s in zip(mine.tolist(), starts)), dtype=self.event_dtype)
        return _Decoded(states, has_base, fts, p.present, events, np.repeat(mine, h["n_events"].astype(np.int64)))

    def _check_headers(self, h: np.ndarray, lens: np.ndarray) -> None:
        fs = self.feature_set
        where = f"{fs.name} {fs.version} on_read record"
        short = lens < HEADER_SIZE
        if short.any():
            raise ValueError(f"{where} truncated: {int(lens[short][0])} bytes, shorter than its {HEADER_SIZE}-byte header")
        bad = h["format"] != FORMAT_VERSION
        if bad.any():
            raise ValueError(f"{where} has format {int(h['format'][bad][0])}; this reader knows format {FORMAT_VERSION} (written by another Parity)")
        bad = (h["flags"] & ~np.uint16(_HAS_BASE)) != 0
        if bad.any():
            raise ValueError(f"{where} has unknown flags {int(h['flags'][bad][0]):#x} (written by another Parity)")
        bad = h["set_version"] != self._set_version
        if bad.any():
            raise ValueError(f"{where} was written for another version of the set (fingerprint {int(h['set_version'][bad][0]):#x})")
        want = HEADER_SIZE + ((h["flags"] & _HAS_BASE) != 0) * self.state.record_size + h["n_events"].astype(np.int64) * self.event_dtype.itemsize
        bad = lens != want
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{where} is {int(lens[i])} bytes but its header describes {int(want[i])} "
                f"({int(h['n_events'][i])} events{' and a base state' if h['flags'][i] & _HAS_BASE else ''}): truncated or corrupt"
            )
        bad = h["n_events"] > MAX_CAP
        if bad.any():
            raise ValueError(f"{where} holds {int(h['n_events'][bad][0])} raw events, more than any cap ({MAX_CAP}): corrupt")
