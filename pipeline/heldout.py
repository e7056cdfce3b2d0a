"""The held-out slice a release is scored on, and the list metric it is scored with.

`parity eval`, the device evaluation and `parity backtest` must score the same users at the
same times against the same truth, or their numbers cannot be compared: the device path and
the backtest report themselves against eval's. Each used to cut the slice itself (the device
evaluation carried a copy of eval's lines and had to check its user count against eval's to
notice a drift). `held_out` is the one cut: the labelled rows of the log, split exactly as
training split them (globally in time, or per user; the manifest says which), the users with a
positive in the test part, optionally a seeded sample of them, each with its test start.

Pure numpy (models.data's labels and split are torch-free).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.release import Release
from features.catalog import ItemCatalog
from features.events import EventBatch
from models.data import SPLIT_FRACTIONS, LabelledRows, label_rows, split_cuts

__all__ = ["HeldOut", "held_out", "topk_metrics"]


@dataclass(frozen=True)
class HeldOut:
    users: np.ndarray  # (u,) int64, sorted: the users scored
    cut: np.ndarray  # (u,) int64 ms: each scored user's test start, the "now" of their request
    truth: dict[int, set[int]]  # user -> items engaged with in the test part (the relevant set)
    cut_of: dict[int, int]  # every labelled user's test start (eval removes items seen before it)
    rows: LabelledRows  # the labelled rows of the log
    test_rows: np.ndarray  # (n,) bool: rows in the test part

    def __len__(self) -> int:
        return len(self.users)


def held_out(release: Release, kind: str, events: EventBatch, items: ItemCatalog, *, max_users: int | None = None,
             seed: int = 0) -> HeldOut:
    """The test slice of `events` (deduplicated) as the release's training cut it. `max_users`:
    a sample drawn with `seed` (the same users for the same seed in every caller)."""
    m = release.manifest
    td_meta = m["training_data"]
    mode = td_meta.get("split_mode", "time")
    fractions = tuple(td_meta.get("split_fractions", SPLIT_FRACTIONS))
    rows = label_rows(kind, events, items, seed=int(m["seed"]))
    _, cut = split_cuts(rows.user_id, rows.ts, mode, fractions)
    if mode == "time" and "split_ts" in td_meta:
        cut = np.full(len(rows.ts), int(td_meta["split_ts"][1]), dtype=np.int64)
    trow = rows.ts >= cut
    test = trow & (rows.label > 0)
    truth: dict[int, set[int]] = {}
    for u, i in zip(rows.user_id[test].tolist(), rows.item_id[test].tolist()):
        truth.setdefault(u, set()).add(i)
    cut_of = dict(zip(rows.user_id.tolist(), cut.tolist()))
    users = np.asarray(sorted(truth), dtype=np.int64)
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    if len(users) == 0:
        raise ValueError("the held-out slice has no positives to evaluate")
    t_user = np.asarray([cut_of[u] for u in users.tolist()], dtype=np.int64)
    return HeldOut(users, t_user, truth, cut_of, rows, trow)


def topk_metrics(top: np.ndarray, truth: set[int], k: int = 10) -> tuple[float, float]:
    """(NDCG@k, recall@k) of one ranked id list against a set of relevant ids (binary gain)."""
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    rel = np.fromiter((1.0 if int(x) in truth else 0.0 for x in top[:k]), dtype=np.float64, count=min(k, len(top)))
    ideal = disc[: min(len(truth), k)].sum()
    return float((rel * disc[: len(rel)]).sum() / ideal), float(rel.sum() / len(truth))
