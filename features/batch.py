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
        by_source: dict[str, _Sorted] = {}
        for r in layout.rings:
            src = fs.source(r.source)
            if r.source not in by_source:
                m = src.mask(ev)
                by_source[r.source] = _Sorted(ent[m], ev.ts[m], ev.event_id[m], src.values(ev)[m], t0, span)
            s = by_source[r.source]
            tiles = s.ts // r.tile_ms
            tmin = int(tiles.min()) if len(tiles) else 0
            tspan = (int(tiles.max()) - tmin + 1) if len(tiles) else 1
            starts = segment_starts(s.ent * tspan + (tiles - tmin))  # one group per (entity, tile)
            gid = np.cumsum(starts) - 1
            first = np.flatnonzero(starts)
            pos = np.arange(len(gid)) - first[gid] if len(gid) else gid
            cum = (pos + 1, segmented_cumsum(s.v, gid), segmented_cummax(s.v, gid))
            ends = np.r_[first[1:] - 1, len(gid) - 1] if len(gid) else gid
            groups = (s.ent[ends], tiles[ends], cum[0][ends], cum[1][ends], cum[2][ends])
            self._rings.append((r, s, tiles, gid, cum, groups))
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
        last_of: dict[int, np.ndarray] = {}  # rings on one source share its search
        for r, s, tiles, gid, (ccount, csum, cmax), (g_ent, g_tile, g_cnt, g_sum, g_max) in self._rings:
            if id(s) not in last_of:
                last_of[id(s)] = s.last_before(ent, t)
            li = last_of[id(s)]
            rows = np.flatnonzero(li >= 0)
            head = np.full(n, NO_TILE, dtype=np.int64)
            head[rows] = tiles[li[rows]]
            st[f"{r.field}_head"] = head
            cnt, sm, mx = st[f"{r.field}_count"], st[f"{r.field}_sum"], st[f"{r.field}_max"]
            nt = r.n_tiles
            # The head tile: a prefix of its events (those before t).
            slot = head[rows] % nt
            cnt[rows, slot], sm[rows, slot], mx[rows, slot] = ccount[li[rows]], csum[li[rows]], cmax[li[rows]]
            # Older tiles are complete: walk back through the entity's (entity, tile) groups
            # until a group belongs to another entity or falls out of the ring.
            gh, ent_r, low = gid[li[rows]], ent[rows], head[rows] - nt
            for m in range(1, nt):
                g = gh - m
                live = g >= 0
                live[live] &= (g_ent[g[live]] == ent_r[live]) & (g_tile[g[live]] > low[live])
                if not live.any():
                    break
                rows, g, gh, ent_r, low = rows[live], g[live], gh[live], ent_r[live], low[live]
                sl = g_tile[g] % nt
                cnt[rows, sl], sm[rows, sl], mx[rows, sl] = g_cnt[g], g_sum[g], g_max[g]
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

    def map_chunks(self, fn, codes: np.ndarray, chunk: int):
        """Yield fn(self, codes[a : a + chunk]) for consecutive chunks, at least one (maybe empty).

        The shape in which a caller asks for per-entity work it can consume chunk by chunk
        (materialisation: records → store commits): the Ray engine (features.engine_ray) runs
        the same `fn` where each partition's engine lives and yields its chunks in order."""
        codes = np.asarray(codes, dtype=np.int64)
        for a in range(0, max(len(codes), 1), chunk):
            yield fn(self, codes[a : a + chunk])

    def features_asof(self, codes: np.ndarray, t: np.ndarray, chunk: int = 32_768) -> FeatureFrame:
        """Feature values per (entity, t) row.

        Rows are processed sorted by (entity, t), so each binary search starts where the
        previous one ended (numpy reuses the bound for sorted needles), and in chunks, so
        the states being built stay small enough for the CPU cache.
        """
        codes = np.asarray(codes, dtype=np.int64)
        t = np.asarray(t, dtype=np.int64)
        order = np.lexsort((t, codes))
        cs, ts = codes[order], t[order]
        n_cols = len(self.layout.columns)
        values = np.empty((len(codes), n_cols), dtype=np.float64)
        missing = np.empty((len(codes), n_cols), dtype=bool)
        fts = np.empty(len(codes), dtype=np.int64)
        for a in range(0, len(codes), chunk):
            sl = order[a : a + chunk]
            fr = read_features(self.layout, self.states_asof(cs[a : a + chunk], ts[a : a + chunk]), ts[a : a + chunk])
            values[sl], missing[sl], fts[sl] = fr.values, fr.missing, fr.feature_ts
        return FeatureFrame(columns=self.layout.columns, values=values, missing=missing, feature_ts=fts)
