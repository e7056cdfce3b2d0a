"""Training data from the feature store: labelled rows, point-in-time features, time split.

Labels (simulated): an impression is positive if, in the same session, the user played the
item for at least half its duration or liked it. Labels (MovieLens): a rating >= 4 is
positive, a lower rating negative, and for each rating `negatives_per_rating` items the
user had not rated by then are sampled as negatives at the same time.

Every row's features come from the point-in-time join at the row's own time, so no row
sees its label event or anything after it; the same holds for its engagement history
(`features.history.history_at`: the user's last items strictly before the row). Pure numpy: no torch needed to build or check it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.catalog import ItemCatalog
from features.assemble import point_in_time_matrix, RankerInputs, ranker_inputs
from features.datasets import DatasetInfo, load_info, read_items
from features.definitions import FeatureSet
from features.engines import Engine
from features.eventlog import EventLog
from features.history import HISTORY_LEN, history_at
from features.events import EventBatch, EventType
from features.pit import PitJoiner
from features.repo import feature_sets

__all__ = ["ItemCatalog", "Split", "TrainingData", "build_training_data", "label_rows", "LabelledRows", "feature_matrix",
           "split_cuts", "split_mode_for", "SPLIT_FRACTIONS"]


@dataclass(frozen=True)
class LabelledRows:
    user_id: np.ndarray
    item_id: np.ndarray
    ts: np.ndarray
    label: np.ndarray  # float32 0/1


@dataclass(frozen=True)
class Split:
    name: str
    user_id: np.ndarray  # (n,) int64
    item_id: np.ndarray  # (n,) int64
    ts: np.ndarray  # (n,) int64 ms
    label: np.ndarray  # (n,) float32
    X: np.ndarray  # (n, F) float32 raw ranker inputs, NaN = missing
    H: np.ndarray  # (n, L) int64 engagement history as of ts (features.history.history_at), PAD = -1

    def __len__(self) -> int:
        return len(self.label)


@dataclass(frozen=True)
class TrainingData:
    info: DatasetInfo
    sets: tuple[FeatureSet, ...]
    inputs: RankerInputs
    items: ItemCatalog
    train: Split
    valid: Split
    test: Split
    split_ts: tuple[int, int]  # global time quantiles (the cuts themselves when split_mode is "time")
    events: EventBatch  # the deduplicated log the rows were built from
    split_mode: str = "time"  # "time" | "per_user" (see split_cuts)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.inputs.columns

    @property
    def feature_set_versions(self) -> dict[str, str]:
        return {fs.name: fs.version for fs in self.sets}

    def fingerprint(self) -> str:
        """Content hash of every row, label and input: same events + config → same hash."""
        h = hashlib.sha256()
        for s in (self.train, self.valid, self.test):
            for a in (s.user_id, s.item_id, s.ts, s.label, np.nan_to_num(s.X, nan=-1.2345e30), s.H):
                h.update(np.ascontiguousarray(a).tobytes())
        h.update(repr(self.columns).encode())
        return h.hexdigest()[:16]


def label_rows(kind: str, events: EventBatch, items: ItemCatalog, *, seed: int = 0, negatives_per_rating: int = 1) -> LabelledRows:
    if kind == "simulated":
        return _video_labels(events, items)
    if kind == "movielens":
        return _rating_labels(events, items, seed, negatives_per_rating)
    raise ValueError(f"unknown dataset kind {kind!r}")


def _key(u: np.ndarray, i: np.ndarray, s: np.ndarray) -> np.ndarray:
    return (u.astype(np.int64) << 40) ^ (i.astype(np.int64) << 20) ^ s.astype(np.int64)


def _video_labels(ev: EventBatch, items: ItemCatalog) -> LabelledRows:
    imp = ev.type == EventType.IMPRESSION
    play, like = ev.type == EventType.PLAY, ev.type == EventType.LIKE
    row = items.index(ev.item_id)
    dur = np.where(row >= 0, items.duration_s[np.maximum(row, 0)], 0.0)
    watched = play & (dur > 0) & (ev.value >= 0.5 * dur)
    good = np.unique(_key(ev.user_id, ev.item_id, ev.session_id)[watched | like])
    k = _key(ev.user_id[imp], ev.item_id[imp], ev.session_id[imp])
    label = np.isin(k, good).astype(np.float32)
    return LabelledRows(ev.user_id[imp], ev.item_id[imp], ev.ts[imp], label)


def _rating_labels(ev: EventBatch, items: ItemCatalog, seed: int, k: int) -> LabelledRows:
    r = ev.type == EventType.RATING
    u, i, t, v = ev.user_id[r], ev.item_id[r], ev.ts[r], ev.value[r]
    rng = np.random.default_rng(seed)
    first: dict[tuple[int, int], int] = {}
    for uu, ii, tt in zip(u.tolist(), i.tolist(), t.tolist()):
        first[(uu, ii)] = min(tt, first.get((uu, ii), tt))
    nu, ni, nt = [], [], []
    cand = items.item_id
    for uu, tt in zip(u.tolist(), t.tolist()):
        got = 0
        for draw in rng.choice(cand, size=4 * k + 4).tolist():
            f = first.get((uu, draw))
            if f is None or f >= tt:  # not rated by then
                nu.append(uu), ni.append(draw), nt.append(tt)
                got += 1
                if got == k:
                    break
    user = np.concatenate([u, np.asarray(nu, dtype=np.int64)])
    item = np.concatenate([i, np.asarray(ni, dtype=np.int64)])
    ts = np.concatenate([t, np.asarray(nt, dtype=np.int64)])
    label = np.concatenate([(v >= 4).astype(np.float32), np.zeros(len(nu), dtype=np.float32)])
    order = np.lexsort((item, user, ts))
    return LabelledRows(user[order], item[order], ts[order], label[order])


def feature_matrix(inputs: RankerInputs, joiner: PitJoiner, sets, items: ItemCatalog,
                   user_ids: np.ndarray, item_ids: np.ndarray, ts: np.ndarray | int) -> np.ndarray:
    """Raw ranker inputs for (user, item, t) rows: point-in-time features as of each t."""
    return point_in_time_matrix(inputs, joiner, sets, items, user_ids, item_ids, ts)


SPLIT_FRACTIONS = (0.7, 0.85)


def split_mode_for(kind: str) -> str:
    """Global time split for the video platform; per-user time split for MovieLens, whose
    last weeks belong to a handful of late heavy raters (a global cut there tests 212 users
    on whom even matrix factorisation scores half of popularity)."""
    return "per_user" if kind == "movielens" else "time"


def split_cuts(user_id: np.ndarray, ts: np.ndarray, mode: str, fractions=SPLIT_FRACTIONS) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the (valid, test) start times: the global time quantiles, or each user's own.

    A row is train if ts < cut1, valid if cut1 <= ts < cut2, test if ts >= cut2. Per user,
    cut_q is the time of the user's row at position floor(q * n) in time order (a user with
    too few rows keeps them all in train)."""
    user_id, ts = np.asarray(user_id, np.int64), np.asarray(ts, np.int64)
    if mode == "time":
        return tuple(np.full(len(ts), int(np.quantile(ts, q)) if len(ts) else 0, dtype=np.int64) for q in fractions)
    if mode != "per_user":
        raise ValueError(f"split mode must be 'time' or 'per_user', got {mode!r}")
    order = np.lexsort((ts, user_id))
    u, t = user_id[order], ts[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u)) + 1] if len(u) else np.empty(0, np.int64)
    counts = np.diff(np.r_[starts, len(u)])
    out = []
    for q in fractions:
        idx = np.maximum(np.floor(q * counts).astype(np.int64), 1)  # a user's first row is always train
        cut = np.where(idx < counts, t[np.minimum(starts + idx, len(t) - 1)], np.iinfo(np.int64).max)
        row_cut = np.empty(len(ts), dtype=np.int64)
        row_cut[order] = np.repeat(cut, counts)
        out.append(row_cut)
    return tuple(out)


def build_training_data(data_dir: str | Path, *, seed: int = 0, max_rows: int | None = None, split=SPLIT_FRACTIONS,
                        history_len: int = HISTORY_LEN, engine: Engine | None = None) -> TrainingData:
    """Rows, labels and point-in-time features for a data dir, split by time (see split_mode_for).
    Each row also carries the user's engagement history as of its time (`history_len` items).
    `engine` (features.engines) runs the point-in-time join: this process by default, or Ray
    (the same rows either way)."""
    info = load_info(data_dir)
    sets = feature_sets(info.kind, info.n_topics)
    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    items = ItemCatalog.from_table(read_items(data_dir))
    rows = label_rows(info.kind, events, items, seed=seed)
    if max_rows is not None and len(rows.ts) > max_rows:  # keep the most recent rows: the split stays temporal
        keep = np.argsort(rows.ts, kind="stable")[-max_rows:]
        keep.sort()
        rows = LabelledRows(rows.user_id[keep], rows.item_id[keep], rows.ts[keep], rows.label[keep])
    inputs = ranker_inputs(sets)
    needed = [fs for fs in sets if fs.name in inputs.sets]
    joiner = PitJoiner(needed, events, engine)
    try:
        X = feature_matrix(inputs, joiner, needed, items, rows.user_id, rows.item_id, rows.ts)
    finally:
        joiner.close()  # on Ray: the partitions' engines would otherwise stay on the workers through training
    H = history_at(events, info.kind, rows.user_id, rows.ts, history_len)
    mode = split_mode_for(info.kind)
    c1, c2 = split_cuts(rows.user_id, rows.ts, mode, split)
    parts = []
    for name, m in (("train", rows.ts < c1), ("valid", (rows.ts >= c1) & (rows.ts < c2)), ("test", rows.ts >= c2)):
        parts.append(Split(name, rows.user_id[m], rows.item_id[m], rows.ts[m], rows.label[m], X[m], H[m]))
    t1, t2 = (int(np.quantile(rows.ts, q)) for q in split)
    return TrainingData(info, tuple(needed), inputs, items, *parts, (t1, t2), events, mode)
