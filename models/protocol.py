"""MovieLens 100K under the common published protocol, for comparison with the literature.

Ratings >= 4 are implicit positives; a seeded random 80/20 split of them; every user with
held-out items ranks ALL items they have not seen in training; NDCG@10 and recall@10 with
binary relevance. Popularity and matrix factorisation (ALS) are measured in the same run
as Parity's own model, so the comparison does not depend on numbers from elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from features.events import EventBatch, EventType
from models.mf import ALSConfig, train_als

__all__ = ["ProtocolSplit", "protocol_split", "full_ranking_metrics", "protocol_baselines"]


@dataclass(frozen=True)
class ProtocolSplit:
    user_ids: np.ndarray  # dense user index -> raw id
    item_ids: np.ndarray  # dense item index -> raw id
    train_u: np.ndarray
    train_i: np.ndarray
    test_u: np.ndarray
    test_i: np.ndarray
    train_events: EventBatch  # the training positives as rating events (for feature-based models)


def protocol_split(events: EventBatch, seed: int = 0, test_frac: float = 0.2) -> ProtocolSplit:
    m = (events.type == EventType.RATING) & (events.value >= 4)
    pos = events.take(np.flatnonzero(m))
    user_ids, u = np.unique(pos.user_id, return_inverse=True)
    item_ids = np.unique(events.item_id[events.type == EventType.RATING])
    i = np.searchsorted(item_ids, pos.item_id)
    rng = np.random.default_rng(seed)
    test = rng.random(len(u)) < test_frac
    return ProtocolSplit(user_ids, item_ids, u[~test], i[~test], u[test], i[test], pos.take(np.flatnonzero(~test)))


def full_ranking_metrics(split: ProtocolSplit, score: Callable[[np.ndarray], np.ndarray], k: int = 10, batch: int = 256) -> dict[str, float]:
    """score(user_index_batch) -> (b, n_items) scores. Training items are excluded."""
    n_items = len(split.item_ids)
    users = np.unique(split.test_u)
    seen = [set() for _ in range(len(split.user_ids))]
    for uu, ii in zip(split.train_u.tolist(), split.train_i.tolist()):
        seen[uu].add(ii)
    truth = [set() for _ in range(len(split.user_ids))]
    for uu, ii in zip(split.test_u.tolist(), split.test_i.tolist()):
        truth[uu].add(ii)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg, recall = [], []
    for a in range(0, len(users), batch):
        ub = users[a : a + batch]
        s = np.array(score(ub), dtype=np.float64, copy=True)
        if s.shape != (len(ub), n_items):
            raise ValueError(f"score() returned shape {s.shape}, expected {(len(ub), n_items)}")
        for r, uu in enumerate(ub.tolist()):
            if seen[uu]:
                s[r, list(seen[uu])] = -np.inf
        top = np.argpartition(-s, k, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, axis=1), axis=1), axis=1)
        for r, uu in enumerate(ub.tolist()):
            rel = np.fromiter((1.0 if x in truth[uu] else 0.0 for x in top[r].tolist()), dtype=np.float64, count=k)
            ideal = disc[: min(len(truth[uu]), k)].sum()
            ndcg.append(float((rel * disc).sum() / ideal))
            recall.append(float(rel.sum() / len(truth[uu])))
    return {"ndcg@10": float(np.mean(ndcg)), "recall@10": float(np.mean(recall)), "users": int(len(users))}


def protocol_baselines(split: ProtocolSplit, seed: int = 0, als: ALSConfig = ALSConfig()) -> dict[str, dict[str, float]]:
    n_u, n_i = len(split.user_ids), len(split.item_ids)
    pop = np.bincount(split.train_i, minlength=n_i).astype(np.float64)
    out = {"popularity": full_ranking_metrics(split, lambda ub: np.broadcast_to(pop, (len(ub), n_i)))}
    U, V = train_als(n_u, n_i, split.train_u, split.train_i, als, seed)
    out["mf_als"] = full_ranking_metrics(split, lambda ub: U[ub] @ V.T)
    return out
