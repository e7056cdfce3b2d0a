"""The aggregation engine's state: the one representation both paths produce and read.

For each entity of a feature set the state holds
  * rings of tile partials (count, sum, max) per (source, tile size), as many tiles as the
    longest window on that tile size needs,
  * decayed sums as (S at t_last, t_last), scalar or vector,
  * the last value as (value, ts, event_id),
  * the feature timestamp (the newest event that changed the state).

The streaming path updates states incrementally (`apply_events`); the batch path builds the
state as of any time t directly from the log (features.batch). Both then call the same
`read_features`, which is the only place where windows, decay-on-read, TTL and the missing
policy are computed. A state is packed into one fixed-width little-endian record, so a
batch of records decodes with one `np.frombuffer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from features.definitions import Agg, Feature, FeatureSet
from features.events import EventBatch

__all__ = ["StateLayout", "FeatureFrame", "read_features", "apply_events", "NO_TILE"]

NO_TILE = np.int64(-(1 << 62))  # ring head before any event
_MAGIC = np.uint32(0x50525459)  # "PRTY": guards against decoding a foreign record


@dataclass(frozen=True)
class RingSpec:
    source: str
    tile_ms: int
    n_tiles: int
    field: str


@dataclass(frozen=True)
class DecaySpec:
    source: str
    half_life_ms: int
    dim: int
    index_column: str | None
    field: str


@dataclass(frozen=True)
class LastSpec:
    source: str
    field: str


@dataclass(frozen=True)
class FeatureFrame:
    """Feature values for a batch of entities as of given times."""

    columns: list[str]
    values: np.ndarray  # (n, n_columns) float64, defaults where missing
    missing: np.ndarray  # (n, n_columns) bool
    feature_ts: np.ndarray  # (n,) int64, -1 where the entity has no (unexpired) state

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.columns.index(name)]


class StateLayout:
    """The state components and record dtype derived from a feature set's definition."""

    def __init__(self, fs: FeatureSet) -> None:
        self.feature_set = fs
        rings: dict[tuple[str, int], int] = {}
        decays: dict[tuple[str, int, int, str | None], None] = {}
        lasts: dict[str, None] = {}
        for f in fs.features:
            if f.window is not None:
                key = (f.source, f.window.tile_ms)
                rings[key] = max(rings.get(key, 0), f.window.n_tiles)
            elif f.agg in (Agg.DECAYED_SUM, Agg.DECAYED_VECTOR):
                decays[(f.source, int(f.half_life_ms), f.dim, f.index_column)] = None
            elif f.agg is Agg.LAST:
                lasts[f.source] = None
        self.rings = [RingSpec(s, t, n, f"r{i}") for i, ((s, t), n) in enumerate(sorted(rings.items()))]
        self.decays = [DecaySpec(s, h, d, c, f"d{i}") for i, (s, h, d, c) in enumerate(sorted(decays, key=str))]
        self.lasts = [LastSpec(s, f"l{i}") for i, s in enumerate(sorted(lasts))]
        fields: list[tuple] = [("magic", "<u4"), ("pad", "<u4"), ("feature_ts", "<i8")]
        for r in self.rings:
            fields += [
                (f"{r.field}_head", "<i8"),
                (f"{r.field}_count", "<i8", (r.n_tiles,)),
                (f"{r.field}_sum", "<f8", (r.n_tiles,)),
                (f"{r.field}_max", "<f8", (r.n_tiles,)),
            ]
        for d in self.decays:
            fields += [(f"{d.field}_s", "<f8", (d.dim,)), (f"{d.field}_t", "<i8")]
        for last in self.lasts:
            fields += [(f"{last.field}_v", "<f8"), (f"{last.field}_t", "<i8"), (f"{last.field}_e", "<i8")]
        self.dtype = np.dtype(fields)

    # -- records -----------------------------------------------------------------------
    def empty(self, n: int) -> np.ndarray:
        st = np.zeros(n, dtype=self.dtype)
        st["magic"] = _MAGIC
        st["feature_ts"] = -1
        for r in self.rings:
            st[f"{r.field}_head"] = NO_TILE
            st[f"{r.field}_max"] = -np.inf
        for d in self.decays:
            st[f"{d.field}_t"] = -1
        for last in self.lasts:
            st[f"{last.field}_t"] = -1
            st[f"{last.field}_e"] = -1
        return st

    @property
    def record_size(self) -> int:
        return self.dtype.itemsize

    def encode(self, states: np.ndarray) -> list[bytes]:
        raw = np.ascontiguousarray(states, dtype=self.dtype).tobytes()
        k = self.record_size
        return [raw[i : i + k] for i in range(0, len(raw), k)]

    def decode(self, records: list[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
        """(states, present mask): absent records decode as empty states."""
        present = np.fromiter((r is not None for r in records), dtype=bool, count=len(records))
        states = self.empty(len(records))
        if present.any():
            blobs = [r for r in records if r is not None]
            bad = [len(b) for b in blobs if len(b) != self.record_size]
            if bad:
                raise ValueError(
                    f"record of {bad[0]} bytes does not match feature set {self.feature_set.name} "
                    f"{self.feature_set.version} ({self.record_size} bytes): written by another layout"
                )
            dec = np.frombuffer(b"".join(blobs), dtype=self.dtype)
            if np.any(dec["magic"] != _MAGIC):
                raise ValueError(f"record for {self.feature_set.name} has a bad magic number")
            states[present] = dec
        return states, present

    @cached_property
    def columns(self) -> list[str]:
        return self.feature_set.columns

    def ring_for(self, f: Feature) -> RingSpec:
        return next(r for r in self.rings if r.source == f.source and r.tile_ms == f.window.tile_ms)

    def decay_for(self, f: Feature) -> DecaySpec:
        return next(
            d for d in self.decays if (d.source, d.half_life_ms, d.dim, d.index_column) == (f.source, f.half_life_ms, f.dim, f.index_column)
        )

    def last_for(self, f: Feature) -> LastSpec:
        return next(s for s in self.lasts if s.source == f.source)


# -- reading: the single definition of every feature's value ---------------------------
def _window_mask(head: np.ndarray, n: int, k: int, tile_ms: int, t: np.ndarray) -> np.ndarray:
    """(rows, n) mask of ring slots whose tile lies in the window of k tiles ending at t."""
    slots = np.arange(n, dtype=np.int64)
    slot_tile = head[:, None] - ((head[:, None] - slots[None, :]) % n)
    c = (t // tile_ms)[:, None]
    return (slot_tile <= c) & (slot_tile >= c - k + 1) & (head[:, None] != NO_TILE)


def decay_factor(dt_ms: np.ndarray, half_life_ms: int) -> np.ndarray:
    return np.exp2(-np.asarray(dt_ms, dtype=np.float64) / float(half_life_ms))


def read_features(layout: StateLayout, states: np.ndarray, t: np.ndarray | int) -> FeatureFrame:
    """Every feature's value as of time t (per row): the same code for batch and online."""
    fs = layout.feature_set
    n = len(states)
    t = np.broadcast_to(np.asarray(t, dtype=np.int64), (n,)).copy()
    cols = layout.columns
    values = np.zeros((n, len(cols)), dtype=np.float64)
    missing = np.zeros((n, len(cols)), dtype=bool)
    fts = states["feature_ts"].astype(np.int64)
    alive = (fts >= 0) & (t - fts <= fs.ttl_ms)
    j = 0
    masks: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}  # shared by features on one window
    for f in fs.features:
        if f.window is not None:
            r = layout.ring_for(f)
            mk = (r.field, f.window.n_tiles)
            if mk not in masks:
                m = _window_mask(states[f"{r.field}_head"], r.n_tiles, f.window.n_tiles, f.window.tile_ms, t)
                masks[mk] = (m, np.where(m, states[f"{r.field}_count"], 0).sum(axis=1))
            m, cnt = masks[mk]
            if f.agg is Agg.COUNT:
                v, undefined = cnt.astype(np.float64), np.zeros(n, dtype=bool)
            elif f.agg is Agg.SUM:
                v, undefined = np.where(m, states[f"{r.field}_sum"], 0.0).sum(axis=1), np.zeros(n, dtype=bool)
            elif f.agg is Agg.MEAN:
                s = np.where(m, states[f"{r.field}_sum"], 0.0).sum(axis=1)
                undefined = cnt == 0
                v = s / np.where(undefined, 1, cnt)
            else:  # MAX
                v = np.where(m, states[f"{r.field}_max"], -np.inf).max(axis=1, initial=-np.inf)
                undefined = cnt == 0
            vals = v[:, None]
        elif f.agg in (Agg.DECAYED_SUM, Agg.DECAYED_VECTOR):
            d = layout.decay_for(f)
            td = states[f"{d.field}_t"].astype(np.int64)
            has = td >= 0
            fac = np.where(has, decay_factor(np.maximum(t - td, 0), d.half_life_ms), 0.0)
            s = states[f"{d.field}_s"].reshape(n, d.dim)
            vals = s * fac[:, None]
            undefined = np.zeros(n, dtype=bool)
        else:  # LAST
            last = layout.last_for(f)
            undefined = states[f"{last.field}_t"] < 0
            vals = np.where(undefined, 0.0, states[f"{last.field}_v"])[:, None]
        miss = (~alive) | undefined
        width = vals.shape[1]
        values[:, j : j + width] = np.where(miss[:, None], f.default, vals)
        missing[:, j : j + width] = miss[:, None]
        j += width
    return FeatureFrame(columns=cols, values=values, missing=missing, feature_ts=np.where(alive, fts, -1))


# -- streaming: incremental update of states by a batch of events ----------------------
def apply_events(layout: StateLayout, states: np.ndarray, rows: np.ndarray, events: EventBatch) -> None:
    """Fold events into states in place. `rows[i]` is the state row of event i.

    Events must already be filtered to the set (event_mask) and deduplicated; their order
    does not matter (up to float rounding), so events arriving out of order within the
    allowed lateness give the same state as in-order replay.
    """
    fs = layout.feature_set
    if len(events) == 0:
        return
    np.maximum.at(states["feature_ts"], rows, events.ts)
    for r in layout.rings:
        src = fs.source(r.source)
        m = src.mask(events)
        if not m.any():
            continue
        rr, ts, v = rows[m], events.ts[m], src.values(events)[m]
        tiles = ts // r.tile_ms
        head = states[f"{r.field}_head"]
        old = head.copy()
        np.maximum.at(head, rr, tiles)
        touched = np.unique(rr)
        adv = head[touched] - old[touched]
        n = r.n_tiles
        cnt, sm, mx = states[f"{r.field}_count"], states[f"{r.field}_sum"], states[f"{r.field}_max"]
        # Tiles entering the ring reuse the slots of tiles leaving it: clear those slots.
        full = touched[adv >= n]  # also every ring that had no tile yet (old == NO_TILE)
        cnt[full], sm[full], mx[full] = 0, 0.0, -np.inf
        part, part_adv = touched[(adv > 0) & (adv < n)], adv[(adv > 0) & (adv < n)]
        for step in range(1, n):
            sel = part[part_adv >= step]
            if len(sel) == 0:
                break
            slot = (old[sel] + step) % n
            cnt[sel, slot], sm[sel, slot], mx[sel, slot] = 0, 0.0, -np.inf
        live = tiles > head[rr] - n  # tiles that fell out of the ring affect no window
        rr, tiles, v = rr[live], tiles[live], v[live]
        slot = tiles % n
        np.add.at(cnt, (rr, slot), 1)
        np.add.at(sm, (rr, slot), v)
        np.maximum.at(mx, (rr, slot), v)
    for d in layout.decays:
        src = fs.source(d.source)
        m = src.mask(events)
        if d.index_column is not None:
            idx = getattr(events, d.index_column).astype(np.int64)
            m &= (idx >= 0) & (idx < d.dim)
        if not m.any():
            continue
        rr, ts, v = rows[m], events.ts[m], src.values(events)[m]
        tcol, scol = states[f"{d.field}_t"], states[f"{d.field}_s"].reshape(len(states), d.dim)
        old_t = tcol.copy()
        np.maximum.at(tcol, rr, ts)
        touched = np.unique(rr)
        had = old_t[touched] >= 0
        fac = np.where(had, decay_factor(tcol[touched] - old_t[touched], d.half_life_ms), 0.0)
        scol[touched] *= fac[:, None]
        w = v * decay_factor(tcol[rr] - ts, d.half_life_ms)
        pos = idx[m] if d.index_column is not None else np.zeros(len(rr), dtype=np.int64)
        np.add.at(scol, (rr, pos), w)
        states[f"{d.field}_s"] = scol.reshape(states[f"{d.field}_s"].shape)
    for last in layout.lasts:
        src = fs.source(last.source)
        m = src.mask(events)
        if not m.any():
            continue
        rr, ts, eid, v = rows[m], events.ts[m], events.event_id[m], src.values(events)[m]
        order = np.lexsort((eid, ts, rr))
        rr, ts, eid, v = rr[order], ts[order], eid[order], v[order]
        is_last = np.ones(len(rr), dtype=bool)
        is_last[:-1] = rr[1:] != rr[:-1]
        rr, ts, eid, v = rr[is_last], ts[is_last], eid[is_last], v[is_last]
        ot, oe = states[f"{last.field}_t"][rr], states[f"{last.field}_e"][rr]
        newer = (ts > ot) | ((ts == ot) & (eid > oe))
        rr, ts, eid, v = rr[newer], ts[newer], eid[newer], v[newer]
        states[f"{last.field}_t"][rr] = ts
        states[f"{last.field}_e"][rr] = eid
        states[f"{last.field}_v"][rr] = v
