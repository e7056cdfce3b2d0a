"""Ranker training rows as the ranker meets them at serving: retrieval candidate lists.

MovieLens logs no impressions, so its labelled rows (a rating against a random unrated item)
teach a ranker what separates rated from random films: mostly popularity. Among the
two-tower's 200 candidates, which are all plausible, that ranker re-ranked worse than the
tower's own order (NDCG@10 0.083 vs 0.106). Here a ranker learns on what it will be asked:

- a query per user at a time t (a per-user cut, like the evaluation's test start);
- candidates: the serving rule's union as of t (`features.candidate_sources.union_sources`, the
  merge `export.candidates.candidate_union` calls): the two-tower's top items for the user's
  features and history (exact search), the item-item model's best items for the history,
  fresh items and the items popular as of t, with the release's quotas (`choose_quotas`
  splits the retrieval budget between the tower and item-item on validation recall); items
  seen before t or not yet published removed;
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
from features.candidate_sources import SOURCES, CandidatePolicy, SourceList, fresh_ids, item_item_top, union_sources
from features.catalog import ItemCatalog
from features.history import HISTORY_LEN, engagement_mask, history_at, history_row
from features.item_item import DEFAULT_L2, ItemItem, fit_item_item
from features.pit import PitJoiner
from models.data import SPLIT_FRACTIONS, Split, TrainingData, feature_matrix, split_cuts
from models.popularity import popularity_at
from models.two_tower import TwoTowerModel, train_two_tower
from features.sorted_lookup import sorted_positions

__all__ = ["CandidateLists", "TRAIN_QUERY_AT", "candidate_lists_at", "candidate_training_data", "choose_quotas", "item_item_for"]

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


@dataclass(frozen=True)
class _Queries:
    """Users with a positive in [start[u], end[u]), each with its sources as of start[u]."""

    users: np.ndarray
    cut: np.ndarray  # start[u] per user
    truth: dict[int, set[int]]
    scores: np.ndarray  # (users, vocab) tower scores
    seen: dict[int, list[int]]  # engaged before the cut
    history: np.ndarray | None  # (users, L) the item-item model's history (PAD = -1)
    popular: dict[int, np.ndarray]  # cut -> popular ids as of it


def _queries(td: TrainingData, model: TwoTowerModel, joiner: PitJoiner, start: dict[int, int], end: dict[int, int],
             item_item: ItemItem | None, half_life_ms: int | None, reveal_seed: int | None = None) -> _Queries | None:
    """`reveal_seed`: the "missing items" variant. Half of each user's engagements in [start, end)
    (at random; none for a user with one) join the history and the seen items, the other half
    stays the truth: which source finds what is missing from a history, as a random holdout
    asks, where the plain cut asks what comes next."""
    u_all, i_all, t_all, y_all = _all_rows(td)
    st = np.asarray([start.get(u, np.iinfo(np.int64).max) for u in u_all.tolist()], dtype=np.int64)
    en = np.asarray([end.get(u, np.iinfo(np.int64).max) for u in u_all.tolist()], dtype=np.int64)
    w = (y_all > 0) & (t_all >= st) & (t_all < en)
    truth: dict[int, set[int]] = {}
    for u, i in zip(u_all[w].tolist(), i_all[w].tolist()):
        truth.setdefault(u, set()).add(i)
    users = np.asarray(sorted(truth), dtype=np.int64)
    if len(users) == 0:
        return None
    tu = np.asarray([start[u] for u in users.tolist()], dtype=np.int64)
    user_fs = [fs for fs in td.sets if fs.name == td.inputs.user_set]
    ucols = columns_from_join(joiner.join(pa.table({"user_id": users, "ts": tu}), only=[td.inputs.user_set]), user_fs)
    U = np.stack([np.where(ucols[c][1], np.nan, ucols[c][0]) for c in model.user_columns], axis=1).astype(np.float32)
    kind = td.info.kind
    ev = td.events
    cut = dict(zip(users.tolist(), tu.tolist()))
    ev_cut = np.asarray([cut.get(u, -1) for u in ev.user_id.tolist()], dtype=np.int64)
    eng = engagement_mask(ev, kind) & (ev.ts < ev_cut)
    seen: dict[int, list[int]] = {}
    for u, i in zip(ev.user_id[eng].tolist(), ev.item_id[eng].tolist()):
        seen.setdefault(u, []).append(i)
    if reveal_seed is None:
        H = history_at(td.events, kind, users, tu, model.config.history_len) if model.config.history_len else None
        Hii = history_at(td.events, kind, users, tu, item_item.history_len) if item_item is not None else None
    else:
        rng = np.random.default_rng(reveal_seed)
        shown: dict[int, set[int]] = {}
        for u in users.tolist():
            t = sorted(truth[u])
            show = set(rng.choice(t, size=len(t) // 2, replace=False).tolist()) if len(t) > 1 else set()
            truth[u] = set(t) - show
            shown[u] = show
            seen.setdefault(u, []).extend(sorted(show))
        te = np.asarray([end.get(u, np.iinfo(np.int64).max) for u in users.tolist()], dtype=np.int64)
        te = np.minimum(te, int(ev.ts.max()) + 1)

        def hist(n: int) -> np.ndarray:  # the history as of the slice's end, its held-out half removed
            full = history_at(td.events, kind, users, te, max(n, 1) * 4)
            rows = [[i for i in row.tolist() if i >= 0 and (i not in truth[u] or i in shown[u])] for u, row in zip(users.tolist(), full)]
            return np.stack([history_row(np.asarray(r, dtype=np.int64), n) for r in rows])
        H = hist(model.config.history_len) if model.config.history_len else None
        Hii = hist(item_item.history_len) if item_item is not None else None
    S = model.user_embeddings(U, H) @ model.item_embeddings().T
    return _Queries(users, tu, truth, S, seen, Hii, popularity_at(ev, kind, tu, half_life_ms=half_life_ms))


def top_stable(s: np.ndarray, k: int) -> np.ndarray:
    """`np.argsort(-s, kind="stable")[:k]` without sorting the whole row: a partition finds the
    k-th score, ties at it are taken in index order (as the stable sort takes them), and only
    those k are sorted. Called once per user per list build, over the whole catalogue."""
    n = len(s)
    if k >= n:
        return np.argsort(-s, kind="stable")
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    kth = s[np.argpartition(-s, k - 1)[k - 1]]
    above = np.flatnonzero(s > kth)
    idx = np.sort(np.concatenate([above, np.flatnonzero(s == kth)[: k - len(above)]]))
    return idx[np.argsort(-s[idx], kind="stable")]


def _sources(q: _Queries, r: int, vocab: np.ndarray, item_item: ItemItem | None, policy: CandidatePolicy, catalog: ItemCatalog,
             pool: int) -> tuple[list[SourceList], np.ndarray]:
    """User r's sources the way `export.candidates.candidate_union` builds them from a release
    (exact search for the ANN; the fresh and popular lists as of the cut), each `pool` deep."""
    u, t = int(q.users[r]), int(q.cut[r])
    blocked = np.asarray(q.seen.get(u, ()), dtype=np.int64)
    s = q.scores[r]
    top = top_stable(s, pool + len(blocked) + 50)
    top = top[np.lexsort((vocab[top], -s[top]))]
    src = [SourceList(vocab[top], SOURCES.index("ann"), pool)]
    if item_item is not None and q.history is not None:
        src.append(SourceList(item_item_top(item_item, q.history[r], pool, blocked), SOURCES.index("item_item"), policy.n_item_item))
    if policy.n_fresh:
        src.append(SourceList(fresh_ids(catalog, t, policy.fresh_window_ms), SOURCES.index("fresh"), policy.n_fresh))
    if policy.n_popular:
        src.append(SourceList(q.popular[t], SOURCES.index("popular"), policy.n_popular))
    return src, blocked


def candidate_lists_at(td: TrainingData, model: TwoTowerModel, joiner: PitJoiner, start: dict[int, int], end: dict[int, int],
                       policy: CandidatePolicy, name: str, item_item: ItemItem | None = None,
                       half_life_ms: int | None = None, reveal_seed: int | None = None) -> CandidateLists:
    """Each user with a positive in [start[u], end[u]) gets the candidate union as of start[u]
    (`policy`'s quotas; with the `retrieval.item_item` column when `item_item` is given)."""
    F = len(td.inputs.with_retrieval(item_item is not None).columns)
    q = _queries(td, model, joiner, start, end, item_item, half_life_ms, reveal_seed)
    if q is None:
        z = np.zeros(0, dtype=np.int64)
        return CandidateLists(Split(name, z, z, z, np.zeros(0, np.float32), np.zeros((0, F), np.float32), np.zeros((0, 0), np.int64)), z, np.zeros(1, np.int64))
    vocab = model.vocab
    names = [c for c in td.inputs.with_retrieval(item_item is not None).columns if c in RETRIEVAL_COLUMNS]
    ids, cols, offsets = [], {c: [] for c in names}, [0]
    pool = max(policy.retrieve_k, policy.n_item_item)
    for r in range(len(q.users)):
        src, blocked = _sources(q, r, vocab, item_item, policy, td.items, pool)
        src[0] = SourceList(src[0].ids, src[0].source, policy.retrieve_k)
        cand, _ = union_sources(src, td.items, blocked, int(q.cut[r]))
        pos = sorted_positions(vocab, cand)
        sc = np.where(vocab[pos] == cand, q.scores[r][pos], np.nan).astype(np.float64)  # items outside the tower's vocabulary: no score
        rc = retrieval_columns(sc, cand, q.history[r] if q.history is not None else None, item_item)
        ids.append(cand)
        for c in names:
            cols[c].append(np.where(rc[c][1], np.nan, rc[c][0]))
        offsets.append(offsets[-1] + len(cand))
    users, tu, truth = q.users, q.cut, q.truth
    n = np.diff(offsets)
    cu, ct, ci = np.repeat(users, n), np.repeat(tu, n), np.concatenate(ids)
    X = feature_matrix(td.inputs, joiner, list(td.sets), td.items, cu, ci, ct)
    X = np.concatenate([X, *(np.concatenate(cols[c])[:, None] for c in names)], axis=1).astype(np.float32)
    y = np.fromiter((1.0 if i in truth[u] else 0.0 for u, i in zip(cu.tolist(), ci.tolist())), dtype=np.float32, count=len(ci))
    return CandidateLists(Split(name, cu, ci, ct, y, X, np.zeros((len(cu), 0), np.int64)), users, np.asarray(offsets, dtype=np.int64))


ITEM_ITEM_SHARES = (0.0, 0.125, 0.25, 0.5, 0.75)  # shares of the retrieval budget offered to the item-item source


def choose_quotas(td: TrainingData, tower: TwoTowerModel, item_item: ItemItem | None, base: CandidatePolicy,
                  half_life_ms: int | None = None, shares=ITEM_ITEM_SHARES, seed: int = 0) -> tuple[CandidatePolicy, dict]:
    """The split of the retrieval budget (`base.retrieve_k` items) between the two-tower and the
    item-item source that finds most of the validation slice's engagements (recall of the whole
    union, fresh and popular included), measured with the release's tower and item-item model
    (both fitted on the train split only) on lists at each user's validation start, two ways:
    what comes next (the slice after the cut) and what is missing (half the slice revealed as
    history, the other half to find: `_queries`' reveal). A release is judged both ways (the
    time split and MovieLens's random holdout), so the split maximises the mean of the two
    recalls; ties go to the smaller item-item share. Returns the policy and what was measured."""
    if item_item is None:
        return base, {}
    u_all, _, t_all, _ = _all_rows(td)
    c1, c2 = split_cuts(u_all, t_all, td.split_mode, SPLIT_FRACTIONS)
    s1, s2 = dict(zip(u_all.tolist(), c1.tolist())), dict(zip(u_all.tolist(), c2.tolist()))
    joiner = PitJoiner([fs for fs in td.sets if fs.name == td.inputs.user_set], td.events)
    budget = base.retrieve_k
    options = sorted({int(round(budget * f)) for f in shares} - {budget})
    study: dict = {"budget": budget, "n_item_item": options}
    recalls = []
    for way, reveal in (("next", None), ("missing", seed)):
        q = _queries(td, tower, joiner, s1, s2, item_item, half_life_ms, reveal_seed=reveal)
        if q is None:
            return base, {}
        hits, total = np.zeros(len(options)), 0
        for r in range(len(q.users)):
            src, blocked = _sources(q, r, tower.vocab, item_item, base, td.items, budget)
            tset = q.truth[int(q.users[r])]
            total += len(tset)
            for j, n_ii in enumerate(options):
                s = [SourceList(src[0].ids, src[0].source, budget - n_ii), SourceList(src[1].ids, src[1].source, n_ii), *src[2:]]
                cand, _ = union_sources(s, td.items, blocked, int(q.cut[r]))
                hits[j] += len(tset.intersection(cand.tolist()))
        recalls.append(hits / max(total, 1))
        study[f"valid_recall_{way}"] = [round(float(x), 5) for x in recalls[-1]]
    mean = np.mean(recalls, axis=0)
    best = int(np.flatnonzero(mean >= mean.max() - 1e-12)[0])
    policy = dataclasses.replace(base, retrieve_k=budget - options[best], n_item_item=options[best])
    return policy, study | {"users": int(len(q.users))}


def candidate_training_data(td: TrainingData, tower: TwoTowerModel, policy: CandidatePolicy = CandidatePolicy(), seed: int = 0, *,
                            item_item: ItemItem | None = None, half_life_ms: int | None = None,
                            missing_lists: bool = False) -> tuple[TrainingData, TwoTowerModel]:
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
    train = candidate_lists_at(td, early_tower, joiner, s0, s1, policy, "train", early_ii, half_life_ms).split
    if missing_lists:  # and the same users' lists with half their next engagements revealed as history (`_queries`)
        more = candidate_lists_at(td, early_tower, joiner, s0, s1, policy, "train", early_ii, half_life_ms, reveal_seed=seed).split
        train = Split("train", *(np.concatenate([getattr(train, f), getattr(more, f)]) for f in ("user_id", "item_id", "ts", "label", "X", "H")))
    o = np.argsort(train.ts, kind="stable")  # time order, as labelled rows (a row cap keeps the most recent)
    train = Split("train", train.user_id[o], train.item_id[o], train.ts[o], train.label[o], train.X[o], train.H[o])
    valid = candidate_lists_at(td, tower, joiner, s1, s2, policy, "valid", item_item, half_life_ms).split
    test = candidate_lists_at(td, tower, joiner, s2, never, policy, "test", item_item, half_life_ms).split
    return dataclasses.replace(td, inputs=td.inputs.with_retrieval(item_item is not None), train=train, valid=valid, test=test), early_tower
