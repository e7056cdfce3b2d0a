"""The ranker's input columns (BUNDLE_FORMAT.md "The tiny ranker"), built by name in the order
of `model.inputs`. The plan is made once per bundle, so an unknown column fails at load."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mobile_sdk.bundle import ItemItemSpec, ItemTable, ModelSpec
from mobile_sdk.errors import BundleError

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000
_PROD = re.compile(r"emb\.prod\[(\d+)\]")
_DERIVED_ITEM = ("age_h", "duration_s")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # dot, prod, stat, age, duration, hour_sin, hour_cos, session
    index: int = -1  # j of emb.prod[j]; the stat's position in stat_columns


def plan_columns(model: ModelSpec) -> tuple[Column, ...]:
    session_cols = {f.column for f in model.session.features}
    ambiguous = set(_DERIVED_ITEM) & set(model.stat_columns)
    if ambiguous:
        raise BundleError(f"stat_columns {sorted(ambiguous)} clash with the derived item columns")
    plan = []
    for name in model.inputs:
        if name == "emb.dot":
            plan.append(Column(name, "dot"))
        elif name in ("emb.rank", "emb.gap"):
            plan.append(Column(name, name[4:]))
        elif (m := _PROD.fullmatch(name)) and int(m.group(1)) < model.dim:
            plan.append(Column(name, "prod", int(m.group(1))))
        elif name == "item.age_h":
            plan.append(Column(name, "age"))
        elif name == "item.duration_s":
            plan.append(Column(name, "duration"))
        elif name == "item.item_item" and model.item_item is not None:
            plan.append(Column(name, "item_item"))
        elif name.startswith("item.") and name[5:] in model.stat_columns:
            plan.append(Column(name, "stat", model.stat_columns.index(name[5:])))
        elif name in ("context.hour_sin", "context.hour_cos"):
            plan.append(Column(name, name[8:]))
        elif name in session_cols:
            plan.append(Column(name, "session"))
        else:
            raise BundleError(f"model input column {name!r} is not one BUNDLE_FORMAT.md defines")
    return tuple(plan)


def _rank_gap(dot: np.ndarray, item_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position in this list by dot product (best first, ties by item id, NaN last) and dot - best dot."""
    miss = np.isnan(dot)
    order = np.lexsort((item_id, np.where(miss, np.inf, -dot.astype(np.float64))))
    rank = np.empty(len(dot), dtype=np.float32)
    rank[order] = np.arange(len(dot), dtype=np.float32)
    gap = (dot - dot[order[0]]).astype(np.float32) if len(dot) else dot
    nan = np.float32(np.nan)
    return np.where(miss, nan, rank), np.where(miss, nan, gap)


def hour_angle(now_ms: int) -> float:
    return 2.0 * math.pi * (now_ms % MS_PER_DAY) / MS_PER_DAY


def history(recent: np.ndarray | None, events: list, spec: ItemItemSpec, now_ms: int) -> np.ndarray:
    """The user's last `history_len` distinct engaged items as of now_ms, most recent last: the
    user file's `recent` (as of the export), then this session's engaging events in time order
    (an item engaged again moves to the end): the feature store's `features.history` rule."""
    seq = [int(i) for i in (recent if recent is not None else [])]
    for e in sorted(events, key=lambda e: e.ts):
        if e.ts < now_ms and e.type in spec.engaged_types and (spec.min_value is None or e.value >= spec.min_value):
            seq.append(int(e.item_id))
    out: dict[int, None] = {}
    for i in seq:
        out.pop(i, None)
        out[i] = None
    return np.asarray(list(out)[-spec.history_len:] if spec.history_len else [], dtype=np.int64)


def item_item_scores(table: ItemTable, history_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For the candidates at `rows`: the sum of the history items' neighbour weights on each
    (float64 sum, then float32); NaN for all when no history item has neighbours in the table."""
    h = table.rows(np.unique(history_ids))
    h = h[h >= 0]
    if len(h) == 0 or table.nbr_id is None:
        return np.full(len(rows), np.nan, dtype=np.float32)
    ids, w = table.nbr_id[h].reshape(-1), table.nbr_w[h].reshape(-1).astype(np.float64)
    keep = ids >= 0
    uniq, inv = np.unique(ids[keep], return_inverse=True)
    total = np.bincount(inv, weights=w[keep], minlength=len(uniq))
    cand = table.item_id[rows]
    if len(uniq) == 0:
        return np.zeros(len(rows), dtype=np.float32)
    pos = np.clip(np.searchsorted(uniq, cand), 0, len(uniq) - 1)
    return np.where(uniq[pos] == cand, total[pos], 0.0).astype(np.float32)


def build_features(plan: tuple[Column, ...], table: ItemTable, rows: np.ndarray, user_embedding: np.ndarray | None,
                   now_ms: int, session: Mapping[str, np.ndarray], item_item: np.ndarray | None = None) -> np.ndarray:
    """float32 [N, F] for the candidates at table `rows` (all >= 0)."""
    n = len(rows)
    x = np.empty((n, len(plan)), dtype=np.float32)
    prod = None
    if user_embedding is not None and any(c.kind in ("dot", "prod") for c in plan):
        prod = user_embedding.astype(np.float32)[None, :] * table.embedding[rows]  # float32 products
    angle = hour_angle(now_ms)
    dot = None if prod is None else prod.astype(np.float64).sum(axis=1).astype(np.float32)
    rank_gap = _rank_gap(dot, table.item_id[rows]) if dot is not None and any(c.kind in ("rank", "gap") for c in plan) else None
    for j, col in enumerate(plan):
        if col.kind == "dot":
            x[:, j] = np.nan if dot is None else dot
        elif col.kind in ("rank", "gap"):
            x[:, j] = np.nan if rank_gap is None else rank_gap[0 if col.kind == "rank" else 1]
        elif col.kind == "prod":
            x[:, j] = np.nan if prod is None else prod[:, col.index]
        elif col.kind == "stat":
            x[:, j] = table.stats[rows, col.index]
        elif col.kind == "age":
            pub = table.publish_ts[rows]
            age = ((np.int64(now_ms) - pub) / MS_PER_HOUR).astype(np.float32)
            x[:, j] = np.where(pub == 0, np.float32(np.nan), age)
        elif col.kind == "duration":
            d = table.duration_s[rows]
            x[:, j] = np.where(d == 0, np.float32(np.nan), d)
        elif col.kind == "item_item":
            x[:, j] = item_item
        elif col.kind == "hour_sin":
            x[:, j] = np.float32(math.sin(angle))
        elif col.kind == "hour_cos":
            x[:, j] = np.float32(math.cos(angle))
        else:
            x[:, j] = session[col.name]
    return x
