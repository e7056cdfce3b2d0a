"""The ranker's raw input matrix, assembled the same way for training rows and for serving.

Inputs are named columns ("user_activity.plays_7d", "request.item_age_h", ...); missing
values become NaN and the ONNX graph applies the missing policy, log1p, clipping and
normalisation, so training, the server and the device feed identical raw numbers to
identical maths. Training gets its columns from the point-in-time join table; the server
from online FeatureFrames; both end in `assemble`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pyarrow as pa

from features.catalog import ItemCatalog
from features.definitions import FeatureSet
from features.item_item import ItemItem
from features.profile import item_age_hours
from features.state import FeatureFrame

if TYPE_CHECKING:
    from features.pit import PitJoiner

__all__ = ["point_in_time_matrix", "RankerInputs", "ranker_inputs", "assemble", "columns_from_join", "columns_from_frame", "Columns",
           "RETRIEVAL_COLUMNS", "retrieval_columns", "Block", "DERIVED_COLUMNS", "TREND_COLUMNS", "prefixed"]

RETRIEVAL_COLUMNS = ("retrieval.rank", "retrieval.gap", "retrieval.item_item")

# Trend inputs (issue 13, robustness under shift): how fast something moves now against its usual
# pace, derived by `assemble` from windowed columns the ranker already reads, so the batch path
# and the server compute them from the same numbers with the same code. name -> (short column,
# long column, steady-state ratio of short to long): value = (short + 1) / (long * ratio + 1),
# 1 for a steady pace, above 1 when rising (a missing count reads as 0). A release reads the
# ones whose columns its feature sets have (`ranker_inputs`).
TREND_COLUMNS: dict[str, tuple[str, str, float]] = {
    # item velocity: plays, exposure, over a day against the week, over an hour against the day
    "trend.item_plays_1d_7d": ("item_popularity.plays_1d", "item_popularity.plays_7d", 1 / 7),
    "trend.item_plays_1h_1d": ("item_popularity.plays_1h", "item_popularity.plays_1d", 1 / 24),
    "trend.item_impressions_1d_7d": ("item_popularity.impressions_1d", "item_popularity.impressions_7d", 1 / 7),
    # recency of the user's interest in the item's topic: 3-day-decayed engagements against the
    # week's plays (a steady rate gives decayed / count = (3 d / ln 2) (1 - 2^(-7/3)) / 7 d ~ 0.5)
    "trend.user_topic_recency": ("user_topic.engaged_decayed_3d", "user_topic.plays_7d", 0.5),
    # MovieLens: item ratings over a week against the month, a day against the week; the user's genre
    "trend.item_ratings_7d_30d": ("item_ratings.ratings_7d", "item_ratings.ratings_30d", 7 / 30),
    "trend.item_ratings_1d_7d": ("item_ratings.ratings_1d", "item_ratings.ratings_7d", 1 / 7),
    "trend.user_genre_recency": ("user_genre.rating_decayed_30d", "user_genre.ratings_30d", 0.72),  # (30 d / ln 2)(1 - 1/2) / 30 d
}
# the item's topic's share of the user's (decayed) topic affinity vector: where their interest is now
TOPIC_SHARE = "trend.user_topic_share"
DERIVED_COLUMNS = ("cross.topic_affinity", "request.item_age_h", "item.duration_s", TOPIC_SHARE, *TREND_COLUMNS)  # computed by `assemble`

Columns = Mapping[str, tuple[np.ndarray, np.ndarray]]  # name -> (values, missing)


@dataclass(frozen=True)
class Block:
    """Several ranker inputs already in the matrix's form: (1 or n, len(names)) float32, NaN where
    missing. The same numbers as the (values, missing) columns they come from (`Block.of`); the
    server keeps its item block per as-of time and writes a block with one assignment."""

    names: tuple[str, ...]
    values: np.ndarray

    @classmethod
    def of(cls, names: Sequence[str], values: np.ndarray, missing: np.ndarray) -> "Block":
        """From (rows, k) values and missing flags (or (k,) for one row)."""
        v = np.where(missing, np.nan, values).astype(np.float32)
        return cls(tuple(names), v.reshape(1, -1) if v.ndim == 1 else v)


@dataclass(frozen=True)
class RankerInputs:
    """Which feature sets feed the ranker and the ordered raw input columns."""

    user_set: str
    item_set: str
    pair_sets: tuple[tuple[str, str], ...]  # (set name, item column giving the pair's second key)
    affinity: str  # user vector feature indexed by item topic: "set.feature"
    columns: tuple[str, ...]

    @property
    def sets(self) -> tuple[str, ...]:
        return (self.user_set, self.item_set, *(p for p, _ in self.pair_sets))

    @property
    def uses_retrieval(self) -> bool:
        """Whether the ranker reads the candidate's retrieval columns (see `retrieval_columns`)."""
        return any(c in self.columns for c in RETRIEVAL_COLUMNS)

    def with_retrieval(self, item_item: bool = False) -> "RankerInputs":
        """These inputs plus the retrieval rank and gap (and `retrieval.item_item` if asked)."""
        add = RETRIEVAL_COLUMNS if item_item else RETRIEVAL_COLUMNS[:2]
        return RankerInputs(self.user_set, self.item_set, self.pair_sets, self.affinity,
                            self.columns + tuple(c for c in add if c not in self.columns))

    @property
    def uses_item_item(self) -> bool:
        return "retrieval.item_item" in self.columns


def retrieval_columns(scores: np.ndarray, item_ids: np.ndarray, history: np.ndarray | None = None,
                      item_item: ItemItem | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The retrieval columns of ONE user's candidate list, from the two-tower scores (user
    embedding . item embedding; NaN where an item has no embedding):

    - ``retrieval.rank``: 0-based position in the list ordered by score, best first (ties by
      item id; items without a score after all others);
    - ``retrieval.gap``: score minus the list's best score (<= 0; missing without a score);
    - ``retrieval.item_item`` (only when `item_item` is given): the item-item model's score of
      each candidate for the user's engagement `history` (item ids, PAD = -1; the tower's
      history, `features.history`), see `features.item_item`.

    Rank and gap are relative to the list, so they mean the same whichever tower scored it:
    training lists scored by an earlier tower, the server's and the evaluation's by the release's."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    miss = ~np.isfinite(s)
    key = np.where(miss, np.inf, -s)
    order = np.lexsort((ids, key))
    rank = np.empty(len(s), dtype=np.float64)
    rank[order] = np.arange(len(s), dtype=np.float64)
    best = s[~miss].max() if (~miss).any() else 0.0
    out = {"retrieval.rank": (rank, np.zeros(len(s), dtype=bool)),
           "retrieval.gap": (np.where(miss, 0.0, s - best), miss)}
    if item_item is not None:
        out["retrieval.item_item"] = item_item.scores(np.empty(0, np.int64) if history is None else history, ids)
    return out


def ranker_inputs(sets: Sequence[FeatureSet], trend: bool = True) -> RankerInputs:
    """The ranker's inputs for a dataset kind's feature sets: every column of the user, item and
    pair sets, then the derived columns (`trend`: with the trend inputs, `TREND_COLUMNS`)."""
    by = {fs.name: fs for fs in sets}
    if "user_activity" in by:
        user, item, pairs, aff = "user_activity", "item_popularity", (("user_topic", "topic"), ("user_creator", "creator_id")), "user_activity.topic_affinity"
    elif "user_ratings" in by:
        user, item, pairs, aff = "user_ratings", "item_ratings", (("user_genre", "topic"),), "user_ratings.genre_affinity"
    else:
        raise ValueError(f"no ranker inputs known for feature sets {sorted(by)}")
    cols: list[str] = []
    for name in (user, item, *(p for p, _ in pairs)):
        cols += [f"{name}.{c}" for c in by[name].columns]
    cols += ["cross.topic_affinity", "request.item_age_h", "item.duration_s"]
    if trend:
        cols += [TOPIC_SHARE] + [name for name, (a, b, _) in TREND_COLUMNS.items() if a in cols and b in cols]
    return RankerInputs(user, item, pairs, aff, tuple(cols))


@functools.lru_cache(maxsize=256)
def prefixed(prefix: str, columns: tuple[str, ...]) -> tuple[str, ...]:
    """The ranker's names of a feature set's columns ("set.column"), as `columns_from_frame` names them."""
    return tuple(f"{prefix}.{c}" for c in columns)


def columns_from_frame(prefix: str, frame: FeatureFrame, fs: FeatureSet) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for j, c in enumerate(frame.columns):
        out[f"{prefix}.{c}"] = (frame.values[:, j], frame.missing[:, j])
    return out


def columns_from_join(table: pa.Table, sets: Sequence[FeatureSet]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Columns of a point-in-time join table (values plus per-feature missing flags)."""
    out = {}
    for fs in sets:
        for f in fs.features:
            miss = table.column(f"{fs.name}.{f.name}.missing").to_numpy(zero_copy_only=False)
            for c in f.columns:
                out[f"{fs.name}.{c}"] = (table.column(f"{fs.name}.{c}").to_numpy(zero_copy_only=False), miss)
    return out


def assemble(
    spec: RankerInputs,
    cols: Columns,
    *,
    item_topic: np.ndarray,
    item_publish_ts: np.ndarray,
    item_duration_s: np.ndarray,
    request_ts: np.ndarray | int,
    blocks: Sequence[Block] = (),
) -> np.ndarray:
    """(n, len(spec.columns)) float32, NaN where missing. Columns broadcast to n rows.

    Inputs come from `blocks` (each written with one assignment; a one-row block broadcasts),
    then from `cols`; `DERIVED_COLUMNS` are computed here (the affinity from `cols`). Columns
    with one value (the user's, at serving time) are written as one row in a single
    assignment; per-row columns one by one. Same numbers as np.where(m, nan, v) per column,
    without a broadcast_to per column (that was the largest cost of a served request)."""
    n = len(item_topic)
    X = np.empty((n, len(spec.columns)), dtype=np.float32)
    plan = _plan(spec.columns, tuple(b.names for b in blocks))
    for b, (dest, take) in zip(blocks, plan.blocks):
        if take is not None:
            X[:, dest] = b.values[:, take]
        elif dest is not None:
            X[:, dest] = b.values
    derived = _derived(spec, cols, np.asarray(item_topic), np.asarray(item_publish_ts), np.asarray(item_duration_s), request_ts, n)
    one_j: list[int] = []
    one_v: list[float] = []
    trends: list[tuple[int, str]] = []
    for j, name in plan.rest:
        if name in TREND_COLUMNS:
            trends.append((j, name))  # from the filled matrix, below
            continue
        if name in derived:
            v, m = derived[name]
        else:
            try:
                v, m = cols[name]
            except KeyError:
                raise KeyError(f"ranker input {name!r} was not provided") from None
        v, m = np.asarray(v), np.asarray(m)
        if v.size == 1 and m.size == 1 and n != 1:
            one_j.append(j)
            one_v.append(np.nan if m.item() else v.item())
            continue
        if v.shape != (n,) or m.shape != (n,):
            v, m = np.broadcast_to(v, (n,)), np.broadcast_to(m, (n,))
        X[:, j] = v
        if m.any():
            X[m, j] = np.nan
    if one_j:
        X[:, one_j] = np.asarray(one_v, dtype=np.float64).astype(np.float32)
    if trends:
        _trends(X, spec.columns, trends)
    return X


def _trends(X: np.ndarray, columns: tuple[str, ...], trends: list[tuple[int, str]]) -> None:
    """`TREND_COLUMNS` from the matrix's own (float32) short and long columns, in place."""
    pos = _positions(columns)
    for j, name in trends:
        short, long, ratio = TREND_COLUMNS[name]
        try:
            a, b = X[:, pos[short]], X[:, pos[long]]
        except KeyError:
            raise KeyError(f"ranker input {name!r} needs {short!r} and {long!r} among the inputs") from None
        a = np.where(np.isnan(a), 0.0, a.astype(np.float64))
        b = np.where(np.isnan(b), 0.0, b.astype(np.float64))
        X[:, j] = (np.maximum(a, 0.0) + 1.0) / (np.maximum(b, 0.0) * ratio + 1.0)


@functools.lru_cache(maxsize=256)
def _positions(columns: tuple[str, ...]) -> dict[str, int]:
    return {c: j for j, c in enumerate(columns)}


@dataclass(frozen=True)
class _Plan:
    blocks: tuple  # per block (destination columns: slice | index array | None, block columns taken: index array | None = all)
    rest: tuple[tuple[int, str], ...]  # (j, name) of the columns not in any block


@functools.lru_cache(maxsize=256)
def _plan(columns: tuple[str, ...], block_names: tuple[tuple[str, ...], ...]) -> _Plan:
    """Where each block's columns go (fixed per ranker inputs and block layout: computed once).
    A name in two blocks is written by the later one; derived columns never come from a block."""
    pos = {c: j for j, c in enumerate(columns)}
    owner: dict[int, tuple[int, int]] = {}
    for bi, names in enumerate(block_names):
        for k, c in enumerate(names):
            j = pos.get(c)
            if j is not None and c not in DERIVED_COLUMNS:
                owner[j] = (bi, k)
    out = []
    for bi, names in enumerate(block_names):
        mine = sorted((k, j) for j, (b, k) in owner.items() if b == bi)
        if not mine:
            out.append((None, None))
            continue
        ks = np.array([k for k, _ in mine], dtype=np.intp)
        js = np.array([j for _, j in mine], dtype=np.intp)
        take = None if len(ks) == len(names) and (ks == np.arange(len(names))).all() else ks
        dest = slice(int(js[0]), int(js[-1]) + 1) if (np.diff(js) == 1).all() else js
        out.append((dest, take))
    return _Plan(tuple(out), tuple((j, c) for j, c in enumerate(columns) if j not in owner))


@functools.lru_cache(maxsize=256)
def _affinity_keys(prefix: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The affinity vector's columns among `names`, by dimension."""
    return tuple(k for _, k in sorted((int(k[len(prefix) : -1]), k) for k in names if k.startswith(prefix)))


def _derived(spec, cols, topic, publish_ts, duration_s, request_ts, n):
    keys = _affinity_keys(spec.affinity + "[", tuple(cols))
    if keys:
        ok = (topic >= 0) & (topic < len(keys))
        t = np.clip(topic, 0, len(keys) - 1)
        vals = [np.asarray(cols[k][0]) for k in keys]
        if all(v.size == 1 for v in vals):  # one user's vector (serving): index it, no (n, d) matrix
            aff = np.where(ok, np.concatenate([v.reshape(1) for v in vals]).astype(np.float64, copy=False)[t], 0.0)
        else:
            A = np.stack([np.broadcast_to(v, (n,)) for v in vals], axis=1)
            aff = np.where(ok, A[np.arange(n), t], 0.0)
        aff_m = np.broadcast_to(cols[keys[0]][1], (n,)) | ~ok
    else:
        aff, aff_m = np.zeros(n), np.ones(n, dtype=bool)
    age, age_m = item_age_hours(publish_ts, request_ts)
    dur = np.asarray(duration_s, dtype=np.float64)
    out = {
        "cross.topic_affinity": (aff, aff_m),
        "request.item_age_h": (np.broadcast_to(age, (n,)), np.broadcast_to(age_m, (n,))),
        "item.duration_s": (dur, dur <= 0),
    }
    if TOPIC_SHARE in _positions(spec.columns):  # a release the trend choice left without it: not on its request path
        out[TOPIC_SHARE] = _topic_share(cols, keys, aff, aff_m, n)
    return out


def _topic_share(cols, keys, aff, aff_m, n):
    """The affinity of the item's topic over the sum of the user's affinity vector (missing
    where the affinity is, or the vector sums to nothing)."""
    if not keys:
        return np.zeros(n), np.ones(n, dtype=bool)
    vals = [np.asarray(cols[k][0], dtype=np.float64) for k in keys]
    total = sum(np.where(np.isnan(v), 0.0, v) for v in vals)  # one value per user (serving) or per row
    total = np.broadcast_to(total, (n,))
    ok = ~np.asarray(aff_m) & (total > 0)
    return np.where(ok, aff / np.where(ok, total, 1.0), 0.0), ~ok


def point_in_time_matrix(inputs: RankerInputs, joiner: "PitJoiner", sets: Sequence[FeatureSet], items: ItemCatalog,
                         user_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray | int) -> np.ndarray:
    """The batch path's raw ranker inputs for (user, item, t) rows: point-in-time features as of
    each t (events with ts < t) through `assemble`. Training rows (models.data) and the live
    parity check on the served log (monitor.skew) both build their rows here."""
    row = items.index(item_ids)
    ok = row >= 0
    r = np.maximum(row, 0)
    topic = np.where(ok, items.topic[r], -1).astype(np.int64)
    t = np.broadcast_to(np.asarray(ts, dtype=np.int64), (len(row),))
    spine = pa.table({"user_id": np.asarray(user_ids, np.int64), "item_id": np.asarray(item_ids, np.int64), "topic": topic,
                      "creator_id": np.where(ok, items.creator_id[r], -1), "ts": t})
    used = [fs for fs in sets if fs.name in inputs.sets]
    cols = columns_from_join(joiner.join(spine, only=[fs.name for fs in used]), used)
    return assemble(inputs, cols, item_topic=topic, item_publish_ts=np.where(ok, items.publish_ts[r], 0),
                    item_duration_s=np.where(ok, items.duration_s[r], 0.0), request_ts=t)
