"""The batch path: the state of every entity as of any time t, built vectorised from the log.

For a spine of (entity, t) rows it produces exactly the state the streaming path holds
after ingesting every event with ts < t (tile partials in the ring, decayed sums at the
last event, last values), so both paths end in the same `state.read_features`. Work per
event is done once (sorting and segmented scans); work per spine row is a handful of
binary searches per tile of the longest window.
"""
from __future__ import annotations

import numpy as np

from features.events import EventBatch
from features.scan import segment_starts, segmented_cummax, segmented_cumsum, segmented_linear_scan
from features.state import NO_TILE, FeatureFrame, StateLayout, decay_factor, read_features

__all__ = ["BatchEngine"]


def _gather(arr: np.ndarray, idx: np.ndarray, fill) -> np.ndarray:
    """arr[idx] where idx >= 0, else fill (safe for an empty arr)."""
    out = np.full(len(idx), fill, dtype=arr.dtype)
    hit = idx >= 0
    out[hit] = arr[idx[hit]]
    return out


class _Sorted:
    """Events of one component, sorted by (entity, ts, event_id), with a search key."""

    def __init__(self, ent: np.ndarray, ts: np.ndarray, eid: np.ndarray, v: np.ndarray, t0: int, span: int) -> None:
        order = np.lexsort((eid, ts, ent))
        self.ent, self.ts, self.eid, self.v = ent[order], ts[order], eid[order], v[order]
        self.t0, self.span = t0, span
        self.key = self.ent * span + (self.ts - t0)

    def last_before(self, ent: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Index of the entity's newest event with ts < t, or -1."""
        if len(self.key) == 0:
            return np.full(len(ent), -1, dtype=np.int64)
        q = ent * self.span + np.clip(t - self.t0, 0, self.span - 1)
        idx = np.searchsorted(self.key, q, side="left") - 1
        ok = (ent >= 0) & (idx >= 0)
        ok[ok] &= self.ent[idx[ok]] == ent[ok]
        return np.where(ok, idx, -1)


class BatchEngine:
    """Precomputes per-event scans for one feature set over one event log."""

    def __init__(self, layout: StateLayout, events: EventBatch) -> None:
        self.layout = layout
        fs = layout.feature_set
        events = events.deduplicated()  # same effect as the streaming path's dedupe
        ev = events.take(np.flatnonzero(fs.event_mask(events)))
        codes = fs.entity.codes(ev)[0]
        self.entities = np.unique(codes)
        ent = np.searchsorted(self.entities, codes).astype(np.int64)
        if len(ev):
            t0, t1 = int(ev.ts.min()), int(ev.ts.max())
        else:
            t0, t1 = 0, 0
        span = t1 - t0 + 2  # a query t is clipped into [t0, t1 + 1]
        if len(self.entities) and len(self.entities) * span >= (1 << 62):
            raise ValueError(f"{len(self.entities)} entities over {span} ms overflow the search key; split the log")
        self._all = _Sorted(ent, ev.ts, ev.event_id, ev.value, t0, span)
        self._rings = []
        for r in layout.rings:
            src = fs.source(r.source)
            m = src.mask(ev)
            s = _Sorted(ent[m], ev.ts[m], ev.event_id[m], src.values(ev)[m], t0, span)
            tiles = s.ts // r.tile_ms
            tmin = int(tiles.min()) if len(tiles) else 0
            tspan = (int(tiles.max()) - tmin + 1) if len(tiles) else 1
            gkey_ev = s.ent * tspan + (tiles - tmin)
            starts = segment_starts(gkey_ev)
            gid = np.cumsum(starts) - 1
            pos = np.arange(len(gid)) - np.flatnonzero(starts)[gid] if len(gid) else gid
            cum = (pos + 1, segmented_cumsum(s.v, gid), segmented_cummax(s.v, gid))
            ends = np.r_[np.flatnonzero(starts)[1:] - 1, len(gid) - 1] if len(gid) else gid
            self._rings.append((r, s, tiles, cum, gkey_ev[ends] if len(gid) else gid, ends, tmin, tspan))
        self._decays = []
        for d in layout.decays:
            src = fs.source(d.source)
            m = src.mask(ev)
            if d.index_column is not None:
                idx = getattr(ev, d.index_column).astype(np.int64)
                m &= (idx >= 0) & (idx < d.dim)
            parts = []
            positions = [None] if d.index_column is None else range(d.dim)
            for k in positions:
                mk = m if k is None else m & (idx == k)
                s = _Sorted(ent[mk], ev.ts[mk], ev.event_id[mk], src.values(ev)[mk], t0, span)
                gap = np.diff(s.ts, prepend=s.ts[:1] if len(s.ts) else s.ts)
                gap[segment_starts(s.ent)] = 0  # a segment's first factor is never used
                parts.append((s, segmented_linear_scan(decay_factor(gap, d.half_life_ms), s.v, s.ent)))
            whole = _Sorted(ent[m], ev.ts[m], ev.event_id[m], ev.value[m], t0, span)
            self._decays.append((d, whole, parts))
        self._lasts = []
        for last in layout.lasts:
            src = fs.source(last.source)
            m = src.mask(ev)
            self._lasts.append((last, _Sorted(ent[m], ev.ts[m], ev.event_id[m], src.values(ev)[m], t0, span)))

    def entity_index(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        if len(self.entities) == 0:
            return np.full(len(codes), -1, dtype=np.int64)
        e = np.searchsorted(self.entities, codes)
        e_c = np.minimum(e, len(self.entities) - 1)
        return np.where(self.entities[e_c] == codes, e_c, -1).astype(np.int64)

    def states_asof(self, codes: np.ndarray, t: np.ndarray) -> np.ndarray:
        """State per row as of t[i] (events with ts < t[i] only)."""
        lay = self.layout
        t = np.asarray(t, dtype=np.int64)
        ent = self.entity_index(codes)
        n = len(ent)
        st = lay.empty(n)
        i = self._all.last_before(ent, t)
        st["feature_ts"] = _gather(self._all.ts, i, -1)
        for r, s, tiles, (ccount, csum, cmax), gkey, ends, tmin, tspan in self._rings:
            li = s.last_before(ent, t)
            ok = li >= 0
            rows = np.flatnonzero(ok)
            head = np.full(n, NO_TILE, dtype=np.int64)
            head[rows] = tiles[li[rows]]
            st[f"{r.field}_head"] = head
            cnt, sm, mx = st[f"{r.field}_count"], st[f"{r.field}_sum"], st[f"{r.field}_max"]
            nt = r.n_tiles
            slot = head[rows] % nt
            cnt[rows, slot], sm[rows, slot], mx[rows, slot] = ccount[li[rows]], csum[li[rows]], cmax[li[rows]]
            for j in range(1, nt):  # full tiles head-1 ... head-n+1
                tile = head[rows] - j
                q = ent[rows] * tspan + (tile - tmin)
                g = np.searchsorted(gkey, q)
                g_c = np.minimum(g, len(gkey) - 1)
                hit = (tile >= tmin) & (gkey[g_c] == q)
                hr, he = rows[hit], ends[g_c[hit]]
                sl = tile[hit] % nt
                cnt[hr, sl], sm[hr, sl], mx[hr, sl] = ccount[he], csum[he], cmax[he]
        for d, whole, parts in self._decays:
            li = whole.last_before(ent, t)
            t_last = _gather(whole.ts, li, -1)
            st[f"{d.field}_t"] = t_last
            S = np.zeros((n, d.dim), dtype=np.float64)
            for k, (s, y) in enumerate(parts):
                lk = s.last_before(ent, t)
                hit = lk >= 0
                S[hit, k] = y[lk[hit]] * decay_factor(t_last[hit] - s.ts[lk[hit]], d.half_life_ms)
            st[f"{d.field}_s"] = S.reshape(st[f"{d.field}_s"].shape)
        for last, s in self._lasts:
            li = s.last_before(ent, t)
            st[f"{last.field}_t"] = _gather(s.ts, li, -1)
            st[f"{last.field}_e"] = _gather(s.eid, li, -1)
            st[f"{last.field}_v"] = _gather(s.v, li, 0.0)
        return st

    def features_asof(self, codes: np.ndarray, t: np.ndarray, chunk: int = 200_000) -> FeatureFrame:
        """Feature values per (entity, t) row; chunked so memory stays bounded."""
        codes = np.asarray(codes, dtype=np.int64)
        t = np.asarray(t, dtype=np.int64)
        frames = [
            read_features(self.layout, self.states_asof(codes[a : a + chunk], t[a : a + chunk]), t[a : a + chunk])
            for a in range(0, max(len(codes), 1), chunk)
        ]
        return FeatureFrame(
            columns=self.layout.columns,
            values=np.concatenate([f.values for f in frames]),
            missing=np.concatenate([f.missing for f in frames]),
            feature_ts=np.concatenate([f.feature_ts for f in frames]),
        )
