"""An item-item model over engagement histories (EASE, Steck 2019), for the ranker's
`retrieval.item_item` input: how strongly the user's last engaged items point at a candidate.

Fit (training only): X is the binary user x item matrix of engagements (one row per user),
G = X'X + lambda*I, P = G^-1, B = -P / diag(P) with a zero diagonal. The score of candidate j
for a history h is sum over the history's known items i of B[i, j]: a closed-form linear
model that predicts an item from the user's other items. It complements the two-tower
(a history mean-pooled through an MLP) on MovieLens, where co-rating is the strongest signal.

Scoring is the same numpy function for training lists (models.candidates), `parity eval`
and the server (server.pipeline): the history is `features.history`'s list of the user's
last `history_len` engaged items (the seen record's; 50, as the user tower reads: 200 scored
better alone under the published protocol but re-ranked worse, on validation), the candidate
ids are the list's. Pure numpy, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.history import HISTORY_LEN

__all__ = ["ItemItem", "fit_item_item", "top_scored", "DEFAULT_L2", "SparseItemItem", "sparsify"]

DEFAULT_L2 = 200.0  # lambda: chosen on the MovieLens 100K validation lists (50 / 200 / 800)


@dataclass(frozen=True)
class ItemItem:
    vocab: np.ndarray  # (n,) int64 item ids, sorted ascending; row/column r of B is vocab[r]
    weights: np.ndarray  # (n, n) float32 B: weights[i, j] = how much engaging with i predicts j
    l2: float = DEFAULT_L2  # the lambda it was fitted with
    history_len: int = HISTORY_LEN  # how many of the user's last engaged items it reads (features.history)

    def __post_init__(self) -> None:
        v = np.asarray(self.vocab)
        if v.ndim != 1 or self.weights.shape != (len(v), len(v)):
            raise ValueError(f"item-item weights must be ({len(v)}, {len(v)}), got {self.weights.shape}")
        if len(v) > 1 and not (np.diff(v) > 0).all():
            raise ValueError("item-item vocabulary must be sorted and unique")

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each id in the vocabulary, -1 if absent (PAD and new items)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.vocab, ids), 0, max(len(self.vocab) - 1, 0))
        ok = (len(self.vocab) > 0) & (self.vocab[pos] == ids) if len(self.vocab) else np.zeros(ids.shape, bool)
        return np.where(ok, pos, -1)

    def scores(self, history: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values float64 (n,), missing (n,)) for ONE user's history (item ids, PAD = -1) and
        candidates: the sum of B[h, candidate] over the history's known items. Missing when
        the candidate is not in the vocabulary or no history item is."""
        h = self.rows(np.asarray(history, dtype=np.int64).reshape(-1))
        h = np.unique(h[h >= 0])
        c = self.rows(np.asarray(item_ids, dtype=np.int64).reshape(-1))
        if len(h) == 0:
            return np.zeros(len(c)), np.ones(len(c), dtype=bool)
        v = self.weights[h][:, np.maximum(c, 0)].astype(np.float64).sum(axis=0)
        miss = c < 0
        return np.where(miss, 0.0, v), miss

    def top(self, history: np.ndarray, n: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, scores float64) of the `n` best-scoring vocabulary items for ONE user's
        history (the same history and the same numbers as `scores`), best first, ties by the
        lower id; only nonzero scores, never the history's own items nor `exclude`. The
        item-item candidate source of the retrieval union."""
        h = self.rows(np.asarray(history, dtype=np.int64).reshape(-1))
        h = np.unique(h[h >= 0])
        if len(h) == 0 or n <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        v = self.weights[h].astype(np.float64).sum(axis=0)
        return top_scored(self.vocab, v, h, exclude, n)


def top_scored(vocab: np.ndarray, values: np.ndarray, history_rows: np.ndarray, exclude: np.ndarray | None,
               n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` best of `values` (one float64 per vocabulary row): nonzero, not in `history_rows`
    nor `exclude` (item ids), best first, ties by the lower id. A partial sort (argpartition),
    then an exact sort of the survivors with every tie at the cut kept, so the answer equals a
    full sort's."""
    ok = values != 0
    ok[history_rows] = False
    if exclude is not None and len(exclude):
        ok &= ~np.isin(vocab, np.asarray(exclude, dtype=np.int64).reshape(-1))
    rows = np.flatnonzero(ok)
    v = values[rows]
    if len(rows) > n:
        cut = np.partition(-v, n - 1)[n - 1]  # -(the n-th largest value)
        keep = -v <= cut
        rows, v = rows[keep], v[keep]
    order = np.lexsort((rows, -v))[:n]  # rows are in id order: the vocabulary is sorted
    return vocab[rows[order]].astype(np.int64), v[order].astype(np.float64)


def fit_item_item(vocab: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray, l2: float = DEFAULT_L2,
                  history_len: int = HISTORY_LEN) -> ItemItem:
    """EASE weights from engagement pairs (user, item); pairs with items outside `vocab` are ignored."""
    vocab = np.unique(np.asarray(vocab, dtype=np.int64))
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    n = len(vocab)
    ii = ItemItem(vocab, np.zeros((n, n), dtype=np.float32))
    col = ii.rows(item_ids)
    ok = col >= 0
    _, u = np.unique(np.asarray(user_ids, dtype=np.int64)[ok], return_inverse=True)
    X = np.zeros((int(u.max()) + 1 if len(u) else 0, n), dtype=np.float64)
    X[u, col[ok]] = 1.0
    G = X.T @ X
    G[np.diag_indices(n)] += l2
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return ItemItem(vocab, B.astype(np.float32), float(l2), int(history_len))


@dataclass(frozen=True)
class SparseItemItem:
    """The item-item model cut to each item's `k` strongest weights (by |B[i, j]|, ties by the
    lower item id), weights rounded to float16: what a device can hold (32 neighbours x 6 bytes
    per item) and score from its own history. Its score is the dense model's with every other
    weight set to 0; training, evaluation and the device all use this one, so they agree."""

    item_id: np.ndarray  # (n,) int64 sorted: the dense model's vocabulary
    nbr_id: np.ndarray  # (n, k) int64 neighbour ids, -1 padded
    nbr_w: np.ndarray  # (n, k) float32 weights (float16 values), 0 padded
    history_len: int = HISTORY_LEN

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(item_ids, dtype=np.int64)
        if len(self.item_id) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.item_id, ids), 0, len(self.item_id) - 1)
        return np.where(self.item_id[pos] == ids, pos, -1)

    def scores(self, history: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """float64 (n,): for ONE user's history (item ids, PAD = -1; its last `history_len`
        distinct items count) the sum of the history items' weights on each candidate; NaN
        for every candidate when no history item is in the model."""
        h = np.asarray(history, dtype=np.int64).reshape(-1)
        h = h[h >= 0][-self.history_len:] if self.history_len else h[:0]
        r = np.unique(self.rows(h))
        r = r[r >= 0]
        c = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        if len(r) == 0:
            return np.full(len(c), np.nan)
        ids, w = self.nbr_id[r].reshape(-1), self.nbr_w[r].reshape(-1).astype(np.float64)
        keep = ids >= 0
        uniq, inv = np.unique(ids[keep], return_inverse=True)
        total = np.bincount(inv, weights=w[keep], minlength=len(uniq))
        pos = np.clip(np.searchsorted(uniq, c), 0, max(len(uniq) - 1, 0))
        hit = (uniq[pos] == c) if len(uniq) else np.zeros(len(c), bool)
        return np.where(hit, total[pos] if len(uniq) else 0.0, 0.0)


def sparsify(model: ItemItem, k: int = 32) -> SparseItemItem:
    """Each item's k strongest outgoing weights of a dense item-item model."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(model.vocab)
    k_eff = min(k, max(n - 1, 0))
    nbr_id = np.full((n, k), -1, dtype=np.int64)
    nbr_w = np.zeros((n, k), dtype=np.float32)
    if n and k_eff:
        W = model.weights.astype(np.float32)
        # order each row by |w| descending, ties by column (= item id, the vocabulary is sorted)
        order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -np.abs(W)), axis=1)[:, :k_eff]
        nbr_w[:, :k_eff] = np.take_along_axis(W, order, axis=1).astype(np.float16).astype(np.float32)
        nbr_id[:, :k_eff] = model.vocab[order]
        nbr_id[:, :k_eff][nbr_w[:, :k_eff] == 0] = -1  # a zero weight (the diagonal, or float16 underflow) is no neighbour
    return SparseItemItem(model.vocab.copy(), nbr_id, nbr_w, model.history_len)
