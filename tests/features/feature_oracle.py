"""A deliberately naive reference: every feature computed straight from the definition in
../shared/DESIGN.md with Python loops over raw events. Slow, obvious, and independent of the
engine's tiles, rings and scans, so both engine paths are checked against the spec itself.
"""
from __future__ import annotations

import math

from features.definitions import Agg, FeatureSet
from features.events import EventBatch


def oracle_row(fs: FeatureSet, events: EventBatch, code: int, t: int) -> tuple[list[float], list[bool], int]:
    ev = events.deduplicated()
    codes, valid = fs.entity.codes(ev)
    in_set = fs.event_mask(ev)
    mine = [i for i in range(len(ev)) if valid[i] and in_set[i] and codes[i] == code and ev.ts[i] < t]
    fts = max((int(ev.ts[i]) for i in mine), default=-1)
    alive = fts >= 0 and t - fts <= fs.ttl_ms
    values: list[float] = []
    missing: list[bool] = []
    for f in fs.features:
        src = fs.source(f.source)
        sel = [i for i in mine if int(ev.type[i]) in {int(x) for x in src.event_types}]
        val = lambda i: 1.0 if src.value == "one" else float(ev.value[i])  # noqa: E731
        if f.window is not None:
            c = t // f.window.tile_ms
            lo = c - f.window.n_tiles + 1
            w = [i for i in sel if lo <= ev.ts[i] // f.window.tile_ms <= c]
            vs = [val(i) for i in w]
            undefined = False
            if f.agg is Agg.COUNT:
                out = [float(len(vs))]
            elif f.agg is Agg.SUM:
                out = [math.fsum(vs)]
            elif f.agg is Agg.MEAN:
                undefined = not vs
                out = [math.fsum(vs) / len(vs) if vs else 0.0]
            else:
                undefined = not vs
                out = [max(vs) if vs else 0.0]
        elif f.agg is Agg.DECAYED_SUM:
            out = [math.fsum(val(i) * 2.0 ** (-(t - int(ev.ts[i])) / f.half_life_ms) for i in sel)]
            undefined = False
        elif f.agg is Agg.DECAYED_VECTOR:
            out = [0.0] * f.dim
            for k in range(f.dim):
                idx = [i for i in sel if int(getattr(ev, f.index_column)[i]) == k]
                out[k] = math.fsum(val(i) * 2.0 ** (-(t - int(ev.ts[i])) / f.half_life_ms) for i in idx)
            undefined = False
        else:  # LAST: newest by (ts, event_id)
            best = max(sel, key=lambda i: (int(ev.ts[i]), int(ev.event_id[i])), default=None)
            undefined = best is None
            out = [0.0 if best is None else val(best)]
        miss = (not alive) or undefined
        values += [f.default] * len(out) if miss else out
        missing += [miss] * len(out)
    return values, missing, fts if alive else -1
