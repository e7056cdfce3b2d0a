"""The tiny ranker's input matrix: only what a phone has (mobile_sdk/BUNDLE_FORMAT.md, "The tiny ranker").

Columns, in order (`device_columns`): `emb.dot`, `emb.rank`, `emb.gap` (the dot product, the
candidate's 0-based position in its list by dot product and its distance to the list's best:
list-relative like the server's retrieval columns, so they mean the same for any list a device
ranks), `emb.prod[0..d-1]` (user x item embedding, both int8-dequantised), `item.<stat>` (a fixed short list of the item feature set's
statistics, `stat_columns`), `item.age_h`, `item.duration_s`, `context.hour_sin`,
`context.hour_cos`, then the session features (`features.session`).

`device_matrix` is the pure formula (the SDK computes the same numbers from the bundle);
`DeviceFeatureSource` reads the point-in-time item statistics and session features for
training and evaluation rows through `PitJoiner`, so the device ranker learns on exactly
the values the feature store (and the bundle's stats file) would hold at each row's time.
numpy only: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from features.catalog import ItemCatalog
from features.definitions import FeatureSet
from features.events import MS_PER_DAY, MS_PER_HOUR, EventBatch
from features.pit import PitJoiner
from features.repo import feature_sets
from features.session import session_columns, session_sets, session_values

__all__ = ["STAT_FEATURES", "stat_columns", "stat_feature_set", "device_columns", "DeviceRows", "device_matrix",
           "DeviceFeatureSource", "hour_features", "list_rank_gap"]

# (item feature set, the statistics a bundle ships): few, cheap, and the ones that carry the
# item's recent demand; the full set would bloat the stats file for little.
STAT_FEATURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "simulated": ("item_popularity", ("plays_1d", "plays_7d", "likes_7d", "skips_1d", "impressions_1d",
                                      "watch_s_mean_7d", "plays_decayed_6h")),
    "movielens": ("item_ratings", ("ratings_7d", "ratings_30d", "rating_mean_30d", "ratings_decayed_30d")),
}


def _kind(kind: str) -> tuple[str, tuple[str, ...]]:
    try:
        return STAT_FEATURES[kind]
    except KeyError:
        raise ValueError(f"unknown dataset kind {kind!r}; allowed: {', '.join(STAT_FEATURES)}") from None


def stat_columns(kind: str) -> tuple[str, ...]:
    """The item statistics of the bundle's stats file (`model.stat_columns`), in order."""
    return _kind(kind)[1]


def stat_feature_set(kind: str, n_topics: int = 20) -> FeatureSet:
    """The item feature set the statistics come from (checked to hold every stat)."""
    name, stats = _kind(kind)
    fs = next(f for f in feature_sets(kind, n_topics) if f.name == name)
    have = {f.name for f in fs.features}
    absent = [s for s in stats if s not in have]
    if absent:
        raise ValueError(f"item feature set {name!r} lacks the device statistics {absent}")
    return fs


def device_columns(kind: str, dim: int, item_item: bool = False) -> tuple[str, ...]:
    """The tiny ranker's input columns for a kind and embedding width, in BUNDLE_FORMAT.md order
    (`item.item_item` when the release has an item-item model: a bundle then ships its sparse form)."""
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    return ("emb.dot", "emb.rank", "emb.gap", *(f"emb.prod[{j}]" for j in range(dim)), *(f"item.{s}" for s in stat_columns(kind)),
            "item.age_h", "item.duration_s", *(("item.item_item",) if item_item else ()), "context.hour_sin", "context.hour_cos",
            *session_columns(kind))


def hour_features(now_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos) of the UTC time of day, float64."""
    phase = 2.0 * np.pi * (np.asarray(now_ms, dtype=np.int64) % MS_PER_DAY).astype(np.float64) / MS_PER_DAY
    return np.sin(phase), np.cos(phase)


@dataclass(frozen=True)
class DeviceRows:
    """Per (user, item, now) row, the raw pieces a device holds."""

    user_emb: np.ndarray  # (n, d) float32 dequantised; an all-NaN row: no user embedding
    item_emb: np.ndarray  # (n, d) float32 dequantised; an all-NaN row: the item has no embedding
    stats: np.ndarray  # (n, len(stat_columns)) NaN missing
    publish_ts: np.ndarray  # (n,) int64 ms, 0 unknown
    duration_s: np.ndarray  # (n,) 0 unknown
    now_ms: np.ndarray  # (n,) int64
    session: np.ndarray  # (n, len(session_columns)) count/sum 0 and mean NaN when nothing matched
    item_id: np.ndarray  # (n,) int64
    list_id: np.ndarray  # (n,) int64: rows with the same list id are one ranked list (emb.rank, emb.gap)
    item_item: np.ndarray | None = None  # (n,) the sparse item-item score (features.item_item.SparseItemItem), NaN missing

    def __len__(self) -> int:
        return len(self.now_ms)


def device_matrix(kind: str, rows: DeviceRows) -> np.ndarray:
    """(n, len(device_columns(kind, d))) float32 raw inputs, NaN = missing (the BUNDLE_FORMAT.md formulas)."""
    u = np.asarray(rows.user_emb, dtype=np.float32)
    e = np.asarray(rows.item_emb, dtype=np.float32)
    n, d = u.shape
    if e.shape != (n, d):
        raise ValueError(f"item embeddings {e.shape} do not match user embeddings {u.shape}")
    S, Q = len(stat_columns(kind)), len(session_columns(kind))
    if rows.stats.shape != (n, S) or rows.session.shape != (n, Q):
        raise ValueError(f"stats {rows.stats.shape} / session {rows.session.shape}: expected ({n}, {S}) / ({n}, {Q})")
    prod = u * e  # float32 products; NaN without either embedding
    ii = rows.item_item is not None
    X = np.empty((n, 3 + d + S + 4 + ii + Q), dtype=np.float32)
    dot = prod.astype(np.float64).sum(axis=1).astype(np.float32)
    X[:, 0] = dot
    X[:, 1], X[:, 2] = list_rank_gap(dot, np.asarray(rows.item_id, np.int64), np.asarray(rows.list_id, np.int64))
    X[:, 3:3 + d] = prod
    j = 3 + d
    X[:, j:j + S] = rows.stats
    j += S
    pub = np.asarray(rows.publish_ts, dtype=np.int64)
    now = np.asarray(rows.now_ms, dtype=np.int64)
    X[:, j] = np.where(pub == 0, np.nan, (now - pub).astype(np.float64) / MS_PER_HOUR).astype(np.float32)
    dur = np.asarray(rows.duration_s, dtype=np.float64)
    X[:, j + 1] = np.where(dur == 0, np.nan, dur).astype(np.float32)
    j += 2
    if ii:
        X[:, j] = np.asarray(rows.item_item, dtype=np.float64).astype(np.float32)
        j += 1
    hs, hc = hour_features(now)
    X[:, j], X[:, j + 1] = hs.astype(np.float32), hc.astype(np.float32)
    X[:, j + 2:] = rows.session
    return X


def list_rank_gap(dot: np.ndarray, item_id: np.ndarray, list_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: 0-based position in its list by dot product (best first, ties by item id) and
    dot - the list's best dot (float32); NaN for rows without a dot product (ranked after all others)."""
    dot = np.asarray(dot, dtype=np.float32)
    miss = np.isnan(dot)
    key = np.where(miss, np.inf, -dot.astype(np.float64))
    order = np.lexsort((item_id, key, list_id))
    lid = list_id[order]
    starts = np.r_[0, np.flatnonzero(np.diff(lid)) + 1] if len(lid) else np.zeros(0, np.int64)
    pos = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(dot), dtype=np.float32)
    rank[order] = pos
    best = np.full(len(dot), np.nan, dtype=np.float32)
    first = order[starts]  # each list's best row (its dot is NaN only if the whole list has none)
    best[order] = np.repeat(dot[first], np.diff(np.r_[starts, len(order)]))
    gap = (dot - best).astype(np.float32)
    return np.where(miss, np.float32(np.nan), rank), np.where(miss, np.float32(np.nan), gap)


class DeviceFeatureSource:
    """Point-in-time item statistics and session features of (user, item, t) rows from an event log."""

    def __init__(self, kind: str, n_topics: int, events: EventBatch, items: ItemCatalog) -> None:
        self.kind, self.items = kind, items
        self.stat_set = stat_feature_set(kind, n_topics)
        self.session_sets = session_sets(kind)
        self.joiner = PitJoiner([self.stat_set, *self.session_sets], events)

    def _spine(self, user_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        row = self.items.index(item_ids)
        ok, r = row >= 0, np.maximum(row, 0)
        t = np.broadcast_to(np.asarray(ts, dtype=np.int64), item_ids.shape)
        spine = pa.table({"user_id": np.broadcast_to(np.asarray(user_ids, np.int64), item_ids.shape), "item_id": item_ids,
                          "topic": np.where(ok, self.items.topic[r], -1).astype(np.int64),
                          "creator_id": np.where(ok, self.items.creator_id[r], -1).astype(np.int64), "ts": t})
        return spine, row

    def rows(self, user_emb: np.ndarray, item_emb: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray,
             ts: np.ndarray | int, list_id: np.ndarray, item_item: np.ndarray | None = None) -> DeviceRows:
        """DeviceRows of the given rows; embeddings are passed in already int8 round-tripped."""
        spine, row = self._spine(user_ids, item_ids, ts)
        joined = self.joiner.join(spine)
        stats = np.stack([np.where(joined.column(f"{self.stat_set.name}.{s}.missing").to_numpy(zero_copy_only=False), np.nan,
                                   joined.column(f"{self.stat_set.name}.{s}").to_numpy(zero_copy_only=False))
                          for s in stat_columns(self.kind)], axis=1)
        ok, r = row >= 0, np.maximum(row, 0)
        return DeviceRows(np.asarray(user_emb, np.float32), np.asarray(item_emb, np.float32), stats,
                          np.where(ok, self.items.publish_ts[r], 0), np.where(ok, self.items.duration_s[r], 0.0),
                          spine.column("ts").to_numpy(), session_values(self.kind, joined),
                          np.asarray(item_ids, np.int64), np.asarray(list_id, np.int64), item_item)

    def matrix(self, user_emb: np.ndarray, item_emb: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray,
               ts: np.ndarray | int, list_id: np.ndarray, item_item: np.ndarray | None = None) -> np.ndarray:
        return device_matrix(self.kind, self.rows(user_emb, item_emb, user_ids, item_ids, ts, list_id, item_item))
