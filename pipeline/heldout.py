"""The held-out slice a release is scored on, and the list metric it is scored with.

`parity eval`, the device evaluation and `parity backtest` must score the same users at the
same times against the same truth, or their numbers cannot be compared: the device path and
the backtest report themselves against eval's. Each used to cut the slice itself (the device
evaluation carried a copy of eval's lines and had to check its user count against eval's to
notice a drift). `held_out` is the one cut: the labelled rows of the log, split exactly as
training split them (globally in time, or per user; the manifest says which), the users with a
positive in the test part, optionally a seeded sample of them, each with its test start.
`part="valid"` cuts the validation part the same way (its users, truth and start), for choices
that must not read the test part (the peer recommenders' settings, pipeline.peers).

What a user may be shown at their start is one definition too (`seen_before_cut`,
`Eligibility`, `popularity_lists`): eval's popularity baseline and the peers use the same lines.

Pure numpy (models.data's labels and split are torch-free).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.release import Release
from features.catalog import ItemCatalog
from features.events import EventBatch
from features.history import engagement_mask
from models.data import SPLIT_FRACTIONS, LabelledRows, label_rows, split_cuts
from models.popularity import popularity_at

__all__ = ["Eligibility", "HeldOut", "held_out", "popularity_lists", "seen_before_cut", "topk_metrics"]


@dataclass(frozen=True)
class HeldOut:
    users: np.ndarray  # (u,) int64, sorted: the users scored
    cut: np.ndarray  # (u,) int64 ms: each scored user's test start, the "now" of their request
    truth: dict[int, set[int]]  # user -> items engaged with in the test part (the relevant set)
    cut_of: dict[int, int]  # every labelled user's test start (eval removes items seen before it)
    rows: LabelledRows  # the labelled rows of the log
    test_rows: np.ndarray  # (n,) bool: rows in the test part (the validation part for part="valid")

    def __len__(self) -> int:
        return len(self.users)


def held_out(release: Release, kind: str, events: EventBatch, items: ItemCatalog, *, max_users: int | None = None,
             seed: int = 0, part: str = "test") -> HeldOut:
    """The test slice of `events` (deduplicated) as the release's training cut it. `max_users`:
    a sample drawn with `seed` (the same users for the same seed in every caller). `part="valid"`:
    the validation slice instead (rows from the validation start to the test start), whose
    starts stand for the cut; nothing of it reads the test part's rows."""
    if part not in ("test", "valid"):
        raise ValueError(f"part must be 'test' or 'valid', got {part!r}")
    m = release.manifest
    td_meta = m["training_data"]
    mode = td_meta.get("split_mode", "time")
    fractions = tuple(td_meta.get("split_fractions", SPLIT_FRACTIONS))
    rows = label_rows(kind, events, items, seed=int(m["seed"]))
    c1, c2 = split_cuts(rows.user_id, rows.ts, mode, fractions)
    if mode == "time" and "split_ts" in td_meta:
        c1, c2 = (np.full(len(rows.ts), int(t), dtype=np.int64) for t in td_meta["split_ts"])
    cut = c2 if part == "test" else c1
    trow = (rows.ts >= cut) if part == "test" else (rows.ts >= c1) & (rows.ts < c2)
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


def seen_before_cut(events: EventBatch, kind: str, cut_of: dict[int, int]) -> dict[int, set[int]]:
    """user -> items engaged with before the user's cut (a user without a cut: nothing). These
    are what a list must not repeat, and what a model fitted "before the cut" may learn from."""
    ev_cut = np.asarray([cut_of.get(u, -1) for u in events.user_id.tolist()], dtype=np.int64)
    eng = engagement_mask(events, kind) & (events.ts < ev_cut)
    seen: dict[int, set[int]] = {}
    for u, i in zip(events.user_id[eng].tolist(), events.item_id[eng].tolist()):
        seen.setdefault(u, set()).add(i)
    return seen


@dataclass(frozen=True)
class Eligibility:
    """What may be recommended at time t: an item of the release's vocabulary published before t
    (an item missing from the catalogue never is)."""
    in_release: frozenset[int]
    publish_ts: dict[int, int]

    @classmethod
    def of(cls, vocab: np.ndarray, items: ItemCatalog) -> "Eligibility":
        return cls(frozenset(np.asarray(vocab).tolist()), dict(zip(items.item_id.tolist(), items.publish_ts.tolist())))

    def __call__(self, item: int, t: int) -> bool:
        return item in self.in_release and self.publish_ts.get(item, t) < t

    def mask(self, item_ids: np.ndarray, t: np.ndarray) -> np.ndarray:
        """(len(t), len(item_ids)) bool: the same test for every (cut, item) pair at once."""
        ids = np.asarray(item_ids, dtype=np.int64).tolist()
        inr = np.fromiter((x in self.in_release for x in ids), dtype=bool, count=len(ids))
        big = np.iinfo(np.int64).max
        pub = np.fromiter((self.publish_ts.get(x, big) for x in ids), dtype=np.int64, count=len(ids))
        return inr[None, :] & (pub[None, :] < np.asarray(t, dtype=np.int64)[:, None])


def popularity_lists(events: EventBatch, kind: str, users: np.ndarray, cuts: np.ndarray, seen: dict[int, set[int]],
                     eligible: Eligibility, half_life_ms: int | None, k: int = 10) -> list[np.ndarray]:
    """The popularity baseline per user: engagement before the user's cut (decayed with the
    release's half-life), minus what the user has seen and what is not eligible, top k."""
    pop_at = popularity_at(events, kind, np.unique(cuts), half_life_ms=half_life_ms)  # one pass for every cut
    out = []
    for u, t in zip(np.asarray(users).tolist(), np.asarray(cuts).tolist()):
        s = seen.get(u, set())
        pop = [x for x in pop_at[t].tolist() if x not in s and eligible(x, t)]
        out.append(np.asarray(pop[:k], dtype=np.int64))
    return out


def topk_metrics(top: np.ndarray, truth: set[int], k: int = 10) -> tuple[float, float]:
    """(NDCG@k, recall@k) of one ranked id list against a set of relevant ids (binary gain)."""
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    rel = np.fromiter((1.0 if int(x) in truth else 0.0 for x in top[:k]), dtype=np.float64, count=min(k, len(top)))
    ideal = disc[: min(len(truth), k)].sum()
    return float((rel * disc[: len(rel)]).sum() / ideal), float(rel.sum() / len(truth))
