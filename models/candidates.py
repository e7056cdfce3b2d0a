"""Ranker training rows as the ranker meets them at serving: retrieval candidate lists.

MovieLens logs no impressions, so its labelled rows (a rating against a random unrated item)
teach a ranker what separates rated from random films: mostly popularity. Among the
two-tower's 200 candidates, which are all plausible, that ranker re-ranked worse than the
tower's own order (NDCG@10 0.083 vs 0.106). Here a ranker learns on what it will be asked:

- a query per user at a time t (a per-user cut, like the evaluation's test start);
- candidates: the two-tower's top `k` items for the user's features and history as of t
  (exact search; items seen before t or not yet published removed);
- label: 1 if the user engaged with the item in [t, end) (rating >= 4 for MovieLens);
- inputs: the ranker's usual point-in-time features as of t plus the list-relative retrieval
  columns (`features.assemble.retrieval_columns`: rank and score gap in the list) and, when
  asked, the item-item model's score of the candidate for the user's history as of t
  (`features.item_item`, EASE fitted on the engagements the list's tower was trained on).

Leakage: the training lists are cut at an earlier per-user time (`TRAIN_QUERY_AT` of each
user's rows) and retrieved by a tower trained only on rows before it (its item-item model is
fitted on those rows' positives too); their labels come from the rest of the train period.
The validation lists (for early stopping) are cut at the valid start and retrieved by the
release's tower and item-item model, which saw the train period only; the test lists
likewise at the test start. Pure numpy apart from the tower's torch forward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from features.assemble import RETRIEVAL_COLUMNS, columns_from_join, retrieval_columns
from features.history import HISTORY_LEN, engagement_mask, history_at
from features.item_item import DEFAULT_L2, ItemItem, fit_item_item
from features.pit import PitJoiner
from models.data import SPLIT_FRACTIONS, Split, TrainingData, feature_matrix, split_cuts
from models.two_tower import TwoTowerModel, train_two_tower

__all__ = ["CandidateLists", "TRAIN_QUERY_AT", "candidate_lists_at", "candidate_training_data", "item_item_for"]

TRAIN_QUERY_AT = 0.5  # training lists: each user's rows before this share of them train the early tower


@dataclass(frozen=True)
class CandidateLists:
    split: Split  # one row per (user, candidate); X holds the ranker inputs incl. the retrieval columns
    users: np.ndarray  # the users with a list, in order; list r is rows r*k .. (r+1)*k - 1 at most
    offsets: np.ndarray  # (len(users) + 1,) row offsets of each user's list


def _all_rows(td: TrainingData) -> tuple[np.ndarray, ...]:
    parts = (td.train, td.valid, td.test)
    return tuple(np.concatenate([getattr(s, f) for s in parts]) for f in ("user_id", "item_id", "ts", "label"))


def item_item_for(split: Split, vocab: np.ndarray, l2: float = DEFAULT_L2, history_len: int = HISTORY_LEN) -> ItemItem:
    """The item-item model of a split's positives (the rows a tower was trained on)."""
    pos = split.label > 0.5
    return fit_item_item(vocab, split.user_id[pos], split.item_id[pos], l2, history_len)


def candidate_lists_at(td: TrainingData, model: TwoTowerModel, joiner: PitJoiner, start: dict[int, int], end: dict[int, int],
                       k: int, name: str, item_item: ItemItem | None = None) -> CandidateLists:
    """Each user with a positive in [start[u], end[u]) gets the tower's top-k list as of start[u]
    (with the `retrieval.item_item` column when `item_item` is given)."""
    u_all, i_all, t_all, y_all = _all_rows(td)
    st = np.asarray([start.get(u, np.iinfo(np.int64).max) for u in u_all.tolist()], dtype=np.int64)
    en = np.asarray([end.get(u, np.iinfo(np.int64).max) for u in u_all.tolist()], dtype=np.int64)
    w = (y_all > 0) & (t_all >= st) & (t_all < en)
    truth: dict[int, set[int]] = {}
    for u, i in zip(u_all[w].tolist(), i_all[w].tolist()):
        truth.setdefault(u, set()).add(i)
    users = np.asarray(sorted(truth), dtype=np.int64)
    tu = np.asarray([start[u] for u in users.tolist()], dtype=np.int64)
    F = len(td.inputs.with_retrieval(item_item is not None).columns)
    if len(users) == 0:
        z = np.zeros(0, dtype=np.int64)
        return CandidateLists(Split(name, z, z, z, np.zeros(0, np.float32), np.zeros((0, F), np.float32), np.zeros((0, 0), np.int64)), z, np.zeros(1, np.int64))
    user_fs = [fs for fs in td.sets if fs.name == td.inputs.user_set]
    ucols = columns_from_join(joiner.join(pa.table({"user_id": users, "ts": tu}), only=[td.inputs.user_set]), user_fs)
    U = np.stack([np.where(ucols[c][1], np.nan, ucols[c][0]) for c in model.user_columns], axis=1).astype(np.float32)
    kind = td.info.kind
    H = history_at(td.events, kind, users, tu, model.config.history_len) if model.config.history_len else None
    Hii = history_at(td.events, kind, users, tu, item_item.history_len) if item_item is not None else None
    S = model.user_embeddings(U, H) @ model.item_embeddings().T
    ev = td.events
    cut = dict(zip(users.tolist(), tu.tolist()))
    ev_cut = np.asarray([cut.get(u, -1) for u in ev.user_id.tolist()], dtype=np.int64)
    eng = engagement_mask(ev, kind) & (ev.ts < ev_cut)
    seen: dict[int, list[int]] = {}
    for u, i in zip(ev.user_id[eng].tolist(), ev.item_id[eng].tolist()):
        seen.setdefault(u, []).append(i)
    vocab = model.vocab
    rows = td.items.index(vocab)
    pub = np.where(rows >= 0, td.items.publish_ts[np.maximum(rows, 0)], np.iinfo(np.int64).max)
    names = [c for c in td.inputs.with_retrieval(item_item is not None).columns if c in RETRIEVAL_COLUMNS]
    ids, cols, offsets = [], {c: [] for c in names}, [0]
    for r, u in enumerate(users.tolist()):
        s = S[r].astype(np.float64)
        ok = pub < tu[r]
        if u in seen:
            ok &= ~np.isin(vocab, seen[u])
        cand = np.flatnonzero(ok)
        top = cand[np.lexsort((vocab[cand], -s[cand]))[:k]]
        rc = retrieval_columns(s[top], vocab[top], Hii[r] if Hii is not None else None, item_item)
        ids.append(vocab[top])
        for c in names:
            cols[c].append(np.where(rc[c][1], np.nan, rc[c][0]))
        offsets.append(offsets[-1] + len(top))
    n = np.diff(offsets)
    cu, ct, ci = np.repeat(users, n), np.repeat(tu, n), np.concatenate(ids)
    X = feature_matrix(td.inputs, joiner, list(td.sets), td.items, cu, ci, ct)
    X = np.concatenate([X, *(np.concatenate(cols[c])[:, None] for c in names)], axis=1).astype(np.float32)
    y = np.fromiter((1.0 if i in truth[u] else 0.0 for u, i in zip(cu.tolist(), ci.tolist())), dtype=np.float32, count=len(ci))
    return CandidateLists(Split(name, cu, ci, ct, y, X, np.zeros((len(cu), 0), np.int64)), users, np.asarray(offsets, dtype=np.int64))


def candidate_training_data(td: TrainingData, tower: TwoTowerModel, k: int = 200, seed: int = 0, *,
                            item_item: ItemItem | None = None) -> tuple[TrainingData, TwoTowerModel]:
    """TrainingData whose train / valid / test splits are candidate lists (see the module
    docstring), with the retrieval columns added to the ranker inputs; and the early tower.
    `item_item`: the release's item-item model (fitted on td.train's positives, as `tower` was
    trained on them) adds the `retrieval.item_item` column; the training lists then get one
    fitted on the early rows."""
    u_all, _, t_all, _ = _all_rows(td)
    c0, c1 = split_cuts(u_all, t_all, td.split_mode, (TRAIN_QUERY_AT, SPLIT_FRACTIONS[0]))
    _, c2 = split_cuts(u_all, t_all, td.split_mode, SPLIT_FRACTIONS)
    at = lambda c: dict(zip(u_all.tolist(), c.tolist()))  # noqa: E731  (the cuts are per user: one value each)
    s0, s1, s2 = at(c0), at(c1), at(c2)
    never = {u: np.iinfo(np.int64).max for u in s2}

    tr = td.train
    early_cut = np.asarray([s0[u] for u in tr.user_id.tolist()], dtype=np.int64)
    pick = lambda s, m, name: Split(name, s.user_id[m], s.item_id[m], s.ts[m], s.label[m], s.X[m], s.H[m])  # noqa: E731
    early = dataclasses.replace(td, train=pick(tr, tr.ts < early_cut, "train"), valid=pick(tr, tr.ts >= early_cut, "valid"))
    early_tower = train_two_tower(early, tower.config, seed + 1)

    joiner = PitJoiner(list(td.sets), td.events)
    early_ii = item_item_for(early.train, item_item.vocab, item_item.l2, item_item.history_len) if item_item is not None else None
    train = candidate_lists_at(td, early_tower, joiner, s0, s1, k, "train", early_ii).split
    o = np.argsort(train.ts, kind="stable")  # time order, as labelled rows (a row cap keeps the most recent)
    train = Split("train", train.user_id[o], train.item_id[o], train.ts[o], train.label[o], train.X[o], train.H[o])
    valid = candidate_lists_at(td, tower, joiner, s1, s2, k, "valid", item_item).split
    test = candidate_lists_at(td, tower, joiner, s2, never, k, "test", item_item).split
    return dataclasses.replace(td, inputs=td.inputs.with_retrieval(item_item is not None), train=train, valid=valid, test=test), early_tower
