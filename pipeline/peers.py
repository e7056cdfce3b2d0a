"""Peer recommenders measured on exactly the split Parity is evaluated on (`parity eval --peers`).

For each protocol, each peer (models.peers) picks its settings from a small grid on a
validation split cut from the TRAINING part of the split being evaluated, the same way Parity
cuts its own, then is refitted on the whole training part with those settings and scored once
on the test part with the metric code Parity's models are scored with:

- time split (`parity eval`, pipeline.heldout): validation = the release's validation part
  (rows from each user's validation start to their test start), fitted on the engagements
  before each user's validation start; test = the held-out users, fitted on the engagements
  before each user's test start (what the release trained and validated on; `seen_before_cut`).
  A list is the top 10 of the items eligible at the user's start (in the release, published
  before it, not already engaged: the popularity baseline's rule, `Eligibility`), ties by item
  id, scored with `topk_metrics`. The popularity row is eval's own (`popularity_lists`).
- random 80/20 (models.protocol): validation = `protocol_split(train_events, seed + 1,
  test_frac=0.125)`, as pipeline.protocol_eval does; every user ranks all items not in
  their training part, `full_ranking_metrics`.

A user with no positive in a training matrix is ranked by popularity (`with_cold_start`).
Ties in a grid keep the first setting in grid order. Torch-free.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from export.release import load_release
from features.catalog import ItemCatalog
from features.datasets import load_info, read_items
from features.eventlog import EventLog
from features.item_inputs import load_vocab
from models.peers import Scorer, fit_peer, positives_matrix, require_implicit, with_cold_start
from models.protocol import ProtocolSplit, full_ranking_metrics, protocol_split
from pipeline.heldout import Eligibility, held_out, popularity_lists, seen_before_cut, topk_metrics

__all__ = ["GRIDS", "Task", "protocol_peers", "protocol_peers_of", "protocol_task", "time_split_peers", "time_split_peers_of",
           "time_split_task", "tune_and_test"]

# Small grids: both protocols on MovieLens 100K in a few minutes on one core. A list value is a
# sweep one fit serves (models.peers.fit_peer); every other key spans the grid.
GRIDS: dict[str, list[dict]] = {
    "itemknn": [{"weighting": w, "K": (20, 50, 100, 200, 400)} for w in ("cosine", "bm25")],
    "ease": [{"lambda": (20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)}],
    "als": [{"factors": f, "regularization": r, "alpha": a, "iterations": (15, 30, 50)}
            for f in (64, 128, 256) for r in (1.0, 10.0, 50.0) for a in (1.0, 5.0)],
    "bpr": [{"factors": f, "learning_rate": lr, "regularization": r, "iterations": (25, 50, 100, 200)}
            for f in (64, 128) for lr in (0.005, 0.01, 0.05) for r in (0.001, 0.01)],
}


@dataclass(frozen=True)
class Task:
    """One training matrix and how a peer fitted on it is scored (the metric of one part)."""
    X: sp.csr_matrix  # users x items, positives of the training part
    evaluate: Callable[[Scorer], dict[str, float]]  # -> {"ndcg@10", "recall@10", ...}


def tune_and_test(valid: Task, test: Task, grids: Mapping[str, Sequence[dict]], seed: int = 0) -> dict[str, dict]:
    """Each peer's best grid point by NDCG@10 on `valid`, refitted on `test.X` and scored once on
    `test`. -> peer -> {"ndcg@10", "recall@10", "settings", "valid_ndcg@10", "grid_points"}."""
    out = {}
    for name, grid in grids.items():
        t0 = time.perf_counter()
        best: tuple[float, dict] | None = None
        points = 0
        for params in grid:
            for sc in fit_peer(name, valid.X, params, seed):
                v = valid.evaluate(with_cold_start(sc, valid.X))["ndcg@10"]
                points += 1
                if best is None or v > best[0]:
                    best = (v, sc.settings)
        if best is None:
            raise ValueError(f"the grid of {name} is empty")
        (chosen,) = fit_peer(name, test.X, best[1], seed)
        m = test.evaluate(with_cold_start(chosen, test.X))
        out[name] = {"ndcg@10": m["ndcg@10"], "recall@10": m["recall@10"], "settings": dict(best[1]),
                     "valid_ndcg@10": best[0], "grid_points": points, "seconds": time.perf_counter() - t0}
    return out


# --- the time split ---------------------------------------------------------------------------

def time_split_task(release, kind: str, events, items: ItemCatalog, *, part: str, max_users: int | None = None,
                    sample_seed: int = 0, k: int = 10) -> tuple[Task, dict]:
    """The Task for one part of the release's time split, and what else the caller reports
    ({"users", "popularity": eval's baseline on the same users})."""
    ho = held_out(release, kind, events, items, max_users=max_users, seed=sample_seed, part=part)
    seen = seen_before_cut(events, kind, ho.cut_of)
    user_ids = np.union1d(np.fromiter(seen, dtype=np.int64, count=len(seen)), ho.users)
    engaged = np.fromiter((i for s in seen.values() for i in s), dtype=np.int64)
    item_ids = np.union1d(items.item_id.astype(np.int64), engaged)
    pairs = [(u, i) for u, s in seen.items() for i in s]
    X = positives_matrix(np.searchsorted(user_ids, [p[0] for p in pairs]), np.searchsorted(item_ids, [p[1] for p in pairs]),
                         len(user_ids), len(item_ids))
    eligible = Eligibility.of(load_vocab(release.file("retrieval/item_ids.npy")), items)
    rows = np.searchsorted(user_ids, ho.users)
    allowed = eligible.mask(item_ids, ho.cut)  # (users, items)
    allowed &= ~X[rows].toarray().astype(bool)  # not already engaged

    def evaluate(sc: Scorer, batch: int = 256) -> dict[str, float]:
        acc = []
        for a in range(0, len(rows), batch):
            s = np.array(sc.scores(rows[a : a + batch]), dtype=np.float64, copy=True)
            s[~allowed[a : a + batch]] = -np.inf
            for r, u in enumerate(ho.users[a : a + batch].tolist()):
                ok = np.flatnonzero(np.isfinite(s[r]))
                top = ok[np.lexsort((item_ids[ok], -s[r, ok]))[:k]]
                acc.append(topk_metrics(item_ids[top], ho.truth[u], k))
        return {"ndcg@10": float(np.mean([a for a, _ in acc])), "recall@10": float(np.mean([b for _, b in acc]))}

    pops = popularity_lists(events, kind, ho.users, ho.cut, seen, eligible, release.meta.popularity_half_life_ms, k)
    pm = [topk_metrics(p, ho.truth[u], k) for u, p in zip(ho.users.tolist(), pops)]
    extra = {"users": len(ho), "popularity": {"ndcg@10": float(np.mean([a for a, _ in pm])), "recall@10": float(np.mean([b for _, b in pm]))}}
    return Task(X, evaluate), extra


def time_split_peers(release_dir: str | Path, data_dir: str | Path, *, max_users: int | None = None, seed: int = 0,
                     grids: Mapping[str, Sequence[dict]] | None = None) -> dict:
    """Peers on `parity eval`'s held-out slice of `release_dir` (the same users for the same
    `max_users` and sample `seed` as evaluate_release). Fitting seeds: the release's seed."""
    grids = GRIDS if grids is None else grids
    if any(n != "popularity" for n in grids):
        require_implicit()
    info = load_info(data_dir)
    events = EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated()
    items = ItemCatalog.from_table(read_items(data_dir))
    return time_split_peers_of(load_release(release_dir), info.kind, events, items, max_users=max_users, seed=seed, grids=grids)


def time_split_peers_of(release, kind: str, events, items: ItemCatalog, *, max_users: int | None = None, seed: int = 0,
                        grids: Mapping[str, Sequence[dict]] | None = None) -> dict:
    """time_split_peers on a deduplicated log already read. -> {"users", "peers", "seconds"}."""
    grids = GRIDS if grids is None else grids
    t0 = time.perf_counter()
    valid, _ = time_split_task(release, kind, events, items, part="valid")
    test, extra = time_split_task(release, kind, events, items, part="test", max_users=max_users, sample_seed=seed)
    peers = {"popularity": {**extra["popularity"], "settings": {"half_life_ms": release.meta.popularity_half_life_ms}},
             **tune_and_test(valid, test, {n: g for n, g in grids.items() if n != "popularity"}, seed=int(release.meta.seed))}
    return {"users": extra["users"], "peers": peers, "seconds": time.perf_counter() - t0}


# --- the random 80/20 protocol ----------------------------------------------------------------

def protocol_task(split: ProtocolSplit) -> Task:
    X = positives_matrix(split.train_u, split.train_i, len(split.user_ids), len(split.item_ids))
    return Task(X, lambda sc: full_ranking_metrics(split, sc.scores))


def protocol_peers(data_dir: str | Path, *, seed: int = 0, grids: Mapping[str, Sequence[dict]] | None = None) -> dict:
    """Peers under the published protocol (the 80/20 split drawn with `seed`, as
    pipeline.protocol_eval.published_protocol draws it for the release's seed)."""
    grids = GRIDS if grids is None else grids
    if any(n != "popularity" for n in grids):
        require_implicit()
    info = load_info(data_dir)
    if info.kind != "movielens":
        raise ValueError(f"the published protocol is defined for MovieLens; {data_dir} holds {info.kind} data")
    return protocol_peers_of(EventLog(Path(data_dir) / "events").read(must_exist=True).deduplicated(), seed=seed, grids=grids)


def protocol_peers_of(events, *, seed: int = 0, grids: Mapping[str, Sequence[dict]] | None = None) -> dict:
    """protocol_peers on a deduplicated log of rating events already read. -> {"users", "peers", "seconds"}."""
    grids = GRIDS if grids is None else grids
    t0 = time.perf_counter()
    split = protocol_split(events, seed)
    valid = protocol_split(split.train_events, seed + 1, test_frac=0.125)
    test = protocol_task(split)
    (pop,) = fit_peer("popularity", test.X, {})
    peers = {"popularity": {**{k: v for k, v in test.evaluate(pop).items() if k != "users"}, "settings": {}},
             **tune_and_test(protocol_task(valid), test, {n: g for n, g in grids.items() if n != "popularity"}, seed=seed)}
    return {"users": int(len(np.unique(split.test_u))), "peers": peers, "seconds": time.perf_counter() - t0}
