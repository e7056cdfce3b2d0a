"""An item-item model over engagement histories, for the ranker's `retrieval.item_item` input
(how strongly the user's last engaged items point at a candidate) and for the item-item
candidate source of the retrieval union (`ItemItem.top`).

The model is EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019)
solved on each item's co-occurrence neighbourhood, stored sparse. EASE's weights come one
column at a time: with X the binary user x item matrix of engagements and G = X'X, column j
of B (how much engaging with i predicts j) is the ridge regression of x_j on the other items,
B[-j, j] = (G[-j, -j] + lambda I)^-1 G[-j, j] (the closed form B = -P / diag(P), P = (G +
lambda I)^-1, is this same solution for every j at once). Restricting the regressors of each
j to a neighbourhood N(j) of `neighbours` items is SLIM's feature selection (fsSLIM: Ning and
Karypis, "SLIM: Sparse Linear Methods for Top-N Recommender Systems", ICDM 2011) with EASE's
ridge penalty in place of SLIM's elastic net; Steck's "Markov Random Fields for Collaborative
Filtering" (NeurIPS 2019) uses the same sparse approximation of the inverse. N(j) is the m
items that co-occur most with j (ties by the lower id), filled with the most popular others
when j co-occurs with fewer than m; so with m >= n - 1 the fit IS the dense EASE (the tests
check it). Each column costs an m x m solve: the fit grows with n m^3 plus the co-occurrence
counts (n times the co-degree, which stays put while events per item do), memory with the
co-occurrence pairs, never n x n; the model holds n m weights, stored per source item in CSR
arrays (`indptr`, `nbr`, `weights`), which is what scoring a history reads.

Scoring is the same numpy function for training lists (models.candidates), `parity eval`
and the server (server.pipeline): the history is `features.history`'s list of the user's
last `history_len` engaged items (the seen record's; 50, as the user tower reads: 200 scored
better alone under the published protocol but re-ranked worse, on validation), the candidate
ids are the list's; the score of candidate j is the float64 sum, in history-row order, of the
float32 weights B[i, j] over the history's known items i. Pure numpy (scipy only to fit).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.history import HISTORY_LEN
from features.sorted_lookup import sorted_positions

__all__ = ["ItemItem", "fit_item_item", "top_scored", "DEFAULT_L2", "DEFAULT_NEIGHBOURS", "SparseItemItem", "sparsify"]

# Both chosen on MovieLens 100K validation splits (never the test), bench/item_item_quality.py,
# seeds 0-2. lambda: 200 re-ranks better than 800 in whole releases (two-stage validation), though
# 800 scores the model alone higher. m: 128 is within noise of the dense EASE alone at lambda 200
# (paired difference +0.0008 NDCG@10), 64 a little below (-0.0027); 256 costs 8x the solves.
DEFAULT_L2 = 200.0
DEFAULT_NEIGHBOURS = 128
_CHUNK = 256  # target items per vectorised step of the fit (bounds its temporary arrays)


@dataclass(frozen=True)
class ItemItem:
    """Sparse item-item weights: row r (the item vocab[r]) points at items nbr[indptr[r]:indptr[r+1]]
    (vocabulary rows, ascending, never r itself) with float32 `weights`; every other weight is 0."""

    vocab: np.ndarray  # (n,) int64 item ids, sorted ascending
    indptr: np.ndarray  # (n + 1,) int64: row r's neighbours are at indptr[r]:indptr[r + 1]
    nbr: np.ndarray  # (nnz,) int32 vocabulary rows of the items each row points at
    weights: np.ndarray  # (nnz,) float32 B[r, nbr]: how much engaging with vocab[r] predicts vocab[nbr]
    l2: float = DEFAULT_L2  # the lambda it was fitted with
    history_len: int = HISTORY_LEN  # how many of the user's last engaged items it reads (features.history)
    neighbours: int = DEFAULT_NEIGHBOURS  # m: regressors per item it was fitted with

    def __post_init__(self) -> None:
        v, ip, nb, w = self.vocab, self.indptr, self.nbr, self.weights
        if v.ndim != 1 or v.dtype != np.int64:
            raise ValueError(f"item-item vocabulary must be 1-D int64, got {v.dtype} {v.shape}")
        if len(v) > 1 and not (np.diff(v) > 0).all():
            raise ValueError("item-item vocabulary must be sorted and unique")
        n = len(v)
        if ip.dtype != np.int64 or ip.shape != (n + 1,) or ip[0] != 0 or (np.diff(ip) < 0).any():
            raise ValueError(f"item-item indptr must be ({n + 1},) int64, from 0 and non-decreasing, got {ip.dtype} {ip.shape}")
        if nb.dtype != np.int32 or w.dtype != np.float32 or nb.shape != (int(ip[-1]),) or w.shape != nb.shape:
            raise ValueError(f"item-item neighbours must be int32 and weights float32, both ({int(ip[-1])},), "
                             f"got {nb.dtype} {nb.shape} and {w.dtype} {w.shape}")
        if len(nb):
            if nb.min() < 0 or nb.max() >= n:
                raise ValueError(f"item-item neighbours must be vocabulary rows in [0, {n}), got {nb.min()}..{nb.max()}")
            src = np.repeat(np.arange(n, dtype=np.int64), np.diff(ip))
            key = src * n + nb
            if (src == nb).any() or not (np.diff(key) > 0).all():
                raise ValueError("item-item neighbours must be ascending within each row, unique and never the row itself")
            if not np.isfinite(w).all():
                raise ValueError("item-item weights must be finite")
        if not self.l2 > 0 or self.history_len < 0 or self.neighbours < 1:
            raise ValueError(f"item-item l2 must be > 0, history_len >= 0, neighbours >= 1; got {self.l2}, {self.history_len}, {self.neighbours}")

    @property
    def nnz(self) -> int:
        return int(len(self.nbr))

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each id in the vocabulary, -1 if absent (PAD and new items)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        if len(self.vocab) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = sorted_positions(self.vocab, ids)
        return np.where(self.vocab[pos] == ids, pos, -1)

    def _history_rows(self, history: np.ndarray) -> np.ndarray:
        h = self.rows(np.asarray(history, dtype=np.int64).reshape(-1))
        return np.unique(h[h >= 0])

    def _totals(self, h: np.ndarray) -> np.ndarray:
        """(n,) float64: for history rows h (ascending), the sum over h of each item's weights,
        added in row order (np.bincount adds in input order): the one sum `scores` and `top` read."""
        start, length = self.indptr[h], np.diff(self.indptr)[h]
        at = np.repeat(start - np.r_[0, np.cumsum(length)[:-1]], length) + np.arange(int(length.sum()))
        return np.bincount(self.nbr[at], weights=self.weights[at].astype(np.float64), minlength=len(self.vocab))

    def scores(self, history: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values float64 (n,), missing (n,)) for ONE user's history (item ids, PAD = -1) and
        candidates: the sum of B[h, candidate] over the history's known items. Missing when
        the candidate is not in the vocabulary or no history item is."""
        h = self._history_rows(history)
        c = self.rows(np.asarray(item_ids, dtype=np.int64).reshape(-1))
        if len(h) == 0:
            return np.zeros(len(c)), np.ones(len(c), dtype=bool)
        v = self._totals(h)[np.maximum(c, 0)]
        miss = c < 0
        return np.where(miss, 0.0, v), miss

    def top(self, history: np.ndarray, n: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, scores float64) of the `n` best-scoring vocabulary items for ONE user's
        history (the same history and the same numbers as `scores`), best first, ties by the
        lower id; only nonzero scores, never the history's own items nor `exclude`. The
        item-item candidate source of the retrieval union."""
        h = self._history_rows(history)
        if len(h) == 0 or n <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        return top_scored(self.vocab, self._totals(h), h, exclude, n)


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
                  history_len: int = HISTORY_LEN, neighbours: int = DEFAULT_NEIGHBOURS) -> ItemItem:
    """EASE on co-occurrence neighbourhoods (module docstring) from engagement pairs (user, item);
    pairs with items outside `vocab` are ignored, repeated pairs count once."""
    import scipy.sparse as sp  # training only: the server and the device never fit

    vocab = np.unique(np.asarray(vocab, dtype=np.int64))
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    if not isinstance(neighbours, (int, np.integer)) or neighbours < 1:
        raise ValueError(f"neighbours must be an integer >= 1, got {neighbours!r}")
    n = len(vocab)
    empty = ItemItem(vocab, np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), float(l2), int(history_len), int(neighbours))
    m = min(int(neighbours), n - 1)
    col = empty.rows(item_ids)
    ok = col >= 0
    if m < 1 or not ok.any():
        return empty
    _, u = np.unique(np.asarray(user_ids, dtype=np.int64)[ok], return_inverse=True)
    X = sp.csr_matrix((np.ones(int(ok.sum()), np.float32), (u, col[ok])), shape=(int(u.max()) + 1, n))
    X.sum_duplicates()
    X.data[:] = 1.0  # binary: an item engaged with twice is one engagement
    XT = X.T.tocsr()  # item x user
    deg = np.diff(XT.indptr).astype(np.float64)  # G[i, i]: users per item
    popular = np.lexsort((np.arange(n), -deg))[: m + 1]  # the fill for thin neighbourhoods
    up_len, up_idx, up_val = [], [], []  # the upper triangle of G = X'X (CSR pieces), for pass 2
    nbrs, gnb = np.empty((n, m), np.int32), np.empty((n, m), np.float64)
    for a in range(0, n, _CHUNK):  # pass 1: co-occurrence rows -> neighbourhoods
        rows_t = np.arange(a, min(a + _CHUNK, n))
        Gc = (XT[rows_t] @ X).tocsr()
        Gc.sort_indices()
        r = np.repeat(rows_t, np.diff(Gc.indptr))
        up = Gc.indices > r
        up_len.append(np.bincount(r[up] - a, minlength=len(rows_t)))
        up_idx.append(Gc.indices[up].astype(np.int32))
        up_val.append(Gc.data[up].astype(np.float32))  # counts: exact in float32 up to 2^24 users
        other = Gc.indices != r
        nbrs[rows_t], gnb[rows_t] = _neighbourhoods(rows_t, r[other], Gc.indices[other].astype(np.int64),
                                                    Gc.data[other].astype(np.float64), m, popular)
        del Gc, r, up, other
    G_up = sp.csr_array((np.concatenate(up_val), np.concatenate(up_idx), np.r_[0, np.cumsum(np.concatenate(up_len))]), shape=(n, n))
    G_up.has_sorted_indices = True  # rows were sorted above: G_up[a, b] is a binary search within row a
    del up_len, up_idx, up_val
    iu = np.triu_indices(m, 1)
    upper, lower, diag = iu[0] * m + iu[1], iu[1] * m + iu[0], np.arange(m) * (m + 1)
    # G_up[a, b] lookups go in batches of more than nnz/10: below that scipy scans each row
    # linearly instead of a binary search (csr_sample_values), quadratic in the long rows of popular items;
    # _pair_values groups each batch's lookups by row, so each row is searched while it is in cache
    batch = _CHUNK * -(-(G_up.nnz // 10 + 1) // (_CHUNK * max(len(iu[0]), 1)))  # whole chunks
    # an item that co-occurs with nothing has G[N, j] = 0, so its column is 0: only the others are solved
    active = np.flatnonzero((gnb != 0).any(axis=1))
    src, dst, wts = [], [], []
    g_batch, g_from = np.zeros((0, len(iu[0]))), 0
    for a in range(0, len(active), _CHUNK):  # pass 2: one ridge regression per item on its neighbourhood
        rows_t = active[a : a + _CHUNK]
        if a >= g_from + len(g_batch):
            B_ = nbrs[active[a : a + batch]]  # N ascending: a < b, the upper triangle
            g_batch, g_from = _pair_values(G_up, B_, iu).reshape(len(B_), -1), a
        N = nbrs[rows_t]
        g = g_batch[a - g_from : a - g_from + len(rows_t)].astype(np.float64)
        A = np.zeros((len(rows_t), m * m))
        A[:, upper] = g
        A[:, lower] = g
        A[:, diag] = deg[N] + l2
        w = np.linalg.solve(A.reshape(-1, m, m), gnb[rows_t][..., None])[..., 0].astype(np.float32)
        keep = w != 0
        src.append(N[keep])
        dst.append(np.broadcast_to(rows_t[:, None], N.shape)[keep])
        wts.append(w[keep])
    if not src:
        return empty
    src_a, dst_a, w_a = np.concatenate(src), np.concatenate(dst), np.concatenate(wts)
    order = np.lexsort((dst_a, src_a))
    indptr = np.r_[0, np.cumsum(np.bincount(src_a, minlength=n))].astype(np.int64)
    return ItemItem(vocab, indptr, dst_a[order].astype(np.int32), w_a[order], float(l2), int(history_len), int(neighbours))


def _pair_values(G_up, N: np.ndarray, iu: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """float32 (len(N) * len(iu[0]),): G_up[N[k, iu[0]], N[k, iu[1]]] for every row k of N, in that
    order (row k's pairs, then row k + 1's), with 0 where G_up stores nothing: exactly the values of
    scipy's fancy indexing `G_up[a, b]` (the same C++ routine, csr_sample_values, which reads the
    stored float32), with the lookups reordered first. N holds each item's neighbours ascending and
    iu = np.triu_indices(m, 1), so the pairs of (k, p) (row N[k, p], columns N[k, p + 1:]) are one
    contiguous run; the runs are sorted by their row (a stable argsort of len(N) * (m - 1) keys), so
    the binary searches of one row, over all the items of the batch that have it as a neighbour,
    run one after the other while the row is in cache and the rows are read in storage order;
    the values are put back in the original order. G_up must be canonical (sorted indices, no
    duplicates; csr_sample_values checks it) and len(N) * len(iu[0]) > G_up.nnz / 10 for scipy to
    binary-search rather than scan the rows (the caller's batches are sized so)."""
    # scipy's own G_up[a, b] routine, called directly (private module: scipy is pinned, and the tests compare it with G_up[a, b])
    from scipy.sparse._sparsetools import csr_sample_values

    t, m, P = N.shape[0], N.shape[1], len(iu[0])
    if t == 0 or P == 0:
        return np.zeros(t * P, np.float32)
    idx = G_up.indices.dtype  # scipy's index dtype for this matrix (int32 unless nnz needs int64)
    run_len = np.arange(m - 1, 0, -1, dtype=np.int64)  # pairs (p, q > p): m - 1 - p of them
    run_start = np.r_[0, np.cumsum(run_len)[:-1]]  # where run p starts in iu's order
    order = np.argsort(N[:, : m - 1].ravel(), kind="stable")  # runs by their row, ties in place
    lens = np.tile(run_len, t)[order]
    starts = (np.repeat(np.arange(t, dtype=np.int64) * P, m - 1) + np.tile(run_start, t))[order]
    perm = np.repeat(starts - np.r_[0, np.cumsum(lens)[:-1]], lens) + np.arange(t * P, dtype=np.int64)
    rows = N[:, iu[0]].ravel()[perm].astype(idx)
    cols = N[:, iu[1]].ravel()[perm].astype(idx)
    found = np.empty(t * P, G_up.dtype)
    csr_sample_values(G_up.shape[0], G_up.shape[1], G_up.indptr, G_up.indices, G_up.data, t * P, rows, cols, found)
    out = np.empty(t * P, np.float32)
    out[perm] = found
    return out


def _neighbourhoods(rows_t: np.ndarray, r: np.ndarray, c: np.ndarray, v: np.ndarray, m: int,
                    popular: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each target row's m regressors, ascending, and its co-occurrence with each: the m items it
    co-occurs with most (ties by the lower row), then the most popular others (co-occurrence 0)."""
    t = len(rows_t)
    top_v = int(v.max()) + 1 if len(v) else 1
    order = np.argsort(((r - rows_t[0]) * top_v + (top_v - 1 - v.astype(np.int64))) * (int(c.max()) + 1 if len(c) else 1) + c, kind="stable")
    r, c, v = r[order], c[order], v[order]  # by row, then co-occurrence descending, then id (one int64 key)
    first = np.searchsorted(r, rows_t)
    rank = np.arange(len(r)) - first[r - rows_t[0]]
    top = rank < m
    r, c, v, rank = r[top], c[top], v[top], rank[top]
    N = np.full((t, m), -1, np.int64)
    Gv = np.zeros((t, m))
    N[r - rows_t[0], rank] = c
    Gv[r - rows_t[0], rank] = v
    for i in np.flatnonzero(N[:, -1] < 0):  # thin rows: fill with popular items not yet in
        have = N[i][N[i] >= 0]
        fill = popular[~np.isin(popular, have) & (popular != rows_t[i])][: m - len(have)]
        N[i, len(have):] = fill
    order = np.argsort(N, axis=1, kind="stable")
    return np.take_along_axis(N, order, 1).astype(np.int32), np.take_along_axis(Gv, order, 1)


@dataclass(frozen=True)
class SparseItemItem:
    """The item-item model cut to each item's `k` strongest weights (by |B[i, j]|, ties by the
    lower item id), weights rounded to float16: what a device can hold (32 neighbours x 6 bytes
    per item) and score from its own history. Its score is the release model's with every other
    weight set to 0; the device's training rows, evaluation and the device all use this one, so they agree."""

    item_id: np.ndarray  # (n,) int64 sorted: the release model's vocabulary
    nbr_id: np.ndarray  # (n, k) int64 neighbour ids, -1 padded
    nbr_w: np.ndarray  # (n, k) float32 weights (float16 values), 0 padded
    history_len: int = HISTORY_LEN

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(item_ids, dtype=np.int64)
        if len(self.item_id) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = sorted_positions(self.item_id, ids)
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
        pos = sorted_positions(uniq, c)
        hit = (uniq[pos] == c) if len(uniq) else np.zeros(len(c), bool)
        return np.where(hit, total[pos] if len(uniq) else 0.0, 0.0)


def sparsify(model: ItemItem, k: int = 32) -> SparseItemItem:
    """Each item's k strongest outgoing weights of the item-item model (by |w|, ties by the
    lower id), as float16 values: the device's cut of the same sparse model."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(model.vocab)
    nbr_id = np.full((n, k), -1, dtype=np.int64)
    nbr_w = np.zeros((n, k), dtype=np.float32)
    if model.nnz:
        src = np.repeat(np.arange(n), np.diff(model.indptr))
        w16 = model.weights.astype(np.float16).astype(np.float32)
        order = np.lexsort((model.nbr, -np.abs(model.weights), src))  # per row: |w| descending, then id
        rank = np.arange(len(order)) - model.indptr[src[order]]
        keep = order[(rank < k) & (w16[order] != 0)]  # a weight that rounds to 0 in float16 is no neighbour
        kr = rank[(rank < k) & (w16[order] != 0)]
        nbr_id[src[keep], kr] = model.vocab[model.nbr[keep]]
        nbr_w[src[keep], kr] = w16[keep]
    return SparseItemItem(model.vocab.copy(), nbr_id, nbr_w, model.history_len)
