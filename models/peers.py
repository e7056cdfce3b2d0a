"""Peer recommenders: the published collaborative-filtering models Parity is judged against.

Each peer is fitted on a user x item CSR matrix of positives (1.0 per engaged pair) and
returns, for a batch of user rows, a dense (b, n_items) score matrix; the caller masks what a
user may not be shown and cuts the top k, so every peer is scored by the same code as
Parity's own lists (pipeline.peers). Torch-free: numpy, scipy and the `implicit` library
(the `eval` extra), which is imported only when a peer is fitted, so this module imports
without it and the server never needs it.

- ``als``: implicit's AlternatingLeastSquares (Hu, Koren & Volinsky 2008), conjugate gradient;
- ``bpr``: implicit's BayesianPersonalizedRanking (Rendle et al. 2009); its item factors carry
  a bias column matched by a column of ones in the user factors, so U @ V.T is its score;
- ``itemknn``: implicit's CosineRecommender or BM25Recommender, the K nearest items per item;
- ``ease``: EASE^R (Steck 2019), the closed form B = I - P / diag(P), P = (X'X + lambda I)^-1;
- ``popularity``: training counts, the floor every peer must clear.

Fitting is deterministic from a seed: implicit's `random_state` and one thread (implicit's
native loops and BLAS), so the same matrix and seed give the same scores. ALS and BPR report
their factors after several iteration counts from one fit (`iterations` is a tuple): the
factors after 10 iterations of a 40-iteration fit are those of a 10-iteration fit, which
lets a grid over iterations cost one fit.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

__all__ = ["PEERS", "MissingExtra", "Scorer", "fit_peer", "positives_matrix", "require_implicit", "with_cold_start"]

PEERS = ("popularity", "itemknn", "ease", "als", "bpr")
EASE_MAX_ITEMS = 20_000  # a dense item x item inverse: 20k items is 3.2 GB of float64


class MissingExtra(ImportError):
    """A peer needs the `implicit` library, which lives in the `eval` extra."""


def require_implicit():
    """The implicit package, or MissingExtra naming the extra to install."""
    try:
        import implicit  # noqa: F401
        import implicit.cpu.als
        import implicit.cpu.bpr
        import implicit.nearest_neighbours
    except ImportError as exc:
        raise MissingExtra("the peer recommenders need implicit==0.7.3: pip install .[eval]") from exc
    return implicit


@dataclass(frozen=True)
class Scorer:
    """A fitted peer: `scores(rows)` -> (len(rows), n_items) float64, higher is better."""
    name: str
    settings: dict
    scores: Callable[[np.ndarray], np.ndarray]


def positives_matrix(user_index: np.ndarray, item_index: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary float32 CSR of the (user, item) pairs (repeats count once), users as rows."""
    u = np.asarray(user_index, dtype=np.int64)
    i = np.asarray(item_index, dtype=np.int64)
    if len(u) != len(i):
        raise ValueError(f"user and item indices differ in length: {len(u)} vs {len(i)}")
    if len(u) and (u.min() < 0 or u.max() >= n_users or i.min() < 0 or i.max() >= n_items):
        raise ValueError(f"an index is outside the {n_users} x {n_items} matrix")
    X = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=(n_users, n_items), dtype=np.float32)
    X.sum_duplicates()
    X.data[:] = 1.0
    return X


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if sp.issparse(m) else m, dtype=np.float64)


def _one_thread():
    """BLAS limited to one thread while a peer fits (implicit warns otherwise, and runs slower)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, "blas")


def _popularity(X: sp.csr_matrix) -> list[Scorer]:
    pop = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    return [Scorer("popularity", {}, lambda rows: np.broadcast_to(pop, (len(rows), len(pop))).copy())]


def _ease(X: sp.csr_matrix, lambdas: Sequence[float]) -> list[Scorer]:
    n = X.shape[1]
    if n > EASE_MAX_ITEMS:
        raise ValueError(f"EASE inverts a dense {n} x {n} matrix; more than {EASE_MAX_ITEMS} items is refused")
    G = (X.T @ X).toarray().astype(np.float64)
    out = []
    for lam in lambdas:
        if lam <= 0:
            raise ValueError(f"EASE lambda must be > 0, got {lam}")
        A = G.copy()
        A[np.diag_indices(n)] += lam
        P = np.linalg.inv(A)
        B = -P / np.diag(P)[None, :]
        B[np.diag_indices(n)] = 0.0
        out.append(Scorer("ease", {"lambda": float(lam)}, lambda rows, B=B: _dense(X[rows] @ B)))
    return out


def _itemknn(X: sp.csr_matrix, weighting: str, Ks: Sequence[int]) -> list[Scorer]:
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender
    from implicit.utils import ParameterWarning

    cls = {"cosine": CosineRecommender, "bm25": BM25Recommender}
    if weighting not in cls:
        raise ValueError(f"itemknn weighting must be one of {sorted(cls)}, got {weighting!r}")
    out = []
    for K in Ks:
        m = cls[weighting](K=int(K), num_threads=1)
        with _one_thread(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ParameterWarning)  # implicit's own weighting hands its kNN a COO matrix
            m.fit(X, show_progress=False)
        S = m.similarity.tocsr()  # implicit's own score: the user's row times the similarity
        out.append(Scorer("itemknn", {"weighting": weighting, "K": int(K)}, lambda rows, S=S: _dense(X[rows] @ S)))
    return out


def _factor_snapshots(model, X: sp.csr_matrix, iterations: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Fit for max(iterations) epochs; the (user, item) factors after each listed count."""
    want = set(int(i) for i in iterations)
    if not want or min(want) < 1:
        raise ValueError(f"iterations must be >= 1, got {sorted(want)}")
    model.iterations = max(want)
    snaps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def keep(epoch: int, *_progress) -> None:  # implicit calls back after each epoch, counting from 0 (BPR adds counts)
        if epoch + 1 in want:
            snaps[epoch + 1] = (np.array(model.user_factors, dtype=np.float64), np.array(model.item_factors, dtype=np.float64))

    with _one_thread():
        model.fit(X, show_progress=False, callback=keep)
    return snaps


def _als(X, factors, regularization, alpha, iterations, seed) -> list[Scorer]:
    from implicit.cpu.als import AlternatingLeastSquares

    with _one_thread():  # the constructor checks the BLAS thread count (and warns past one)
        m = AlternatingLeastSquares(factors=int(factors), regularization=float(regularization), alpha=float(alpha),
                                    num_threads=1, random_state=seed)
    return [Scorer("als", {"factors": int(factors), "regularization": float(regularization), "alpha": float(alpha), "iterations": it},
                   lambda rows, U=U, V=V: U[rows] @ V.T)
            for it, (U, V) in sorted(_factor_snapshots(m, X, iterations).items())]


def _bpr(X, factors, learning_rate, regularization, iterations, seed) -> list[Scorer]:
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    m = BayesianPersonalizedRanking(factors=int(factors), learning_rate=float(learning_rate), regularization=float(regularization),
                                    num_threads=1, random_state=seed)
    return [Scorer("bpr", {"factors": int(factors), "learning_rate": float(learning_rate), "regularization": float(regularization),
                           "iterations": it}, lambda rows, U=U, V=V: U[rows] @ V.T)
            for it, (U, V) in sorted(_factor_snapshots(m, X, iterations).items())]


def fit_peer(name: str, X: sp.csr_matrix, params: Mapping, seed: int = 0) -> list[Scorer]:
    """Fit one peer on X (users x items, binary). A list-valued parameter (`lambda` for ease,
    `K` for itemknn, `iterations` for als/bpr) is a sweep that one fit serves: one Scorer per
    value, each with its settings. Other parameters are scalars."""
    X = sp.csr_matrix(X, dtype=np.float32)
    p = dict(params)
    if name not in _PARAMS:
        raise ValueError(f"unknown peer {name!r}; the peers are {', '.join(PEERS)}")
    unknown = sorted(set(p) - _PARAMS[name])
    if unknown:
        raise ValueError(f"{name} takes {sorted(_PARAMS[name])}, not {unknown}")
    if name == "popularity":
        return _popularity(X)
    if name == "ease":
        return _ease(X, _listed(p.pop("lambda")))
    if name in ("itemknn", "als", "bpr"):
        require_implicit()
    if name == "itemknn":
        return _itemknn(X, p.pop("weighting", "cosine"), _listed(p.pop("K")))
    if name == "als":
        return _als(X, p.pop("factors"), p.pop("regularization"), p.pop("alpha"), _listed(p.pop("iterations")), seed)
    return _bpr(X, p.pop("factors"), p.pop("learning_rate"), p.pop("regularization"), _listed(p.pop("iterations")), seed)


_PARAMS = {"popularity": set(), "ease": {"lambda"}, "itemknn": {"weighting", "K"},
           "als": {"factors", "regularization", "alpha", "iterations"},
           "bpr": {"factors", "learning_rate", "regularization", "iterations"}}


def with_cold_start(scorer: Scorer, X: sp.csr_matrix) -> Scorer:
    """The same peer, with users that have no positive in X ranked by popularity (training
    counts): a factor model has nothing to say about them (ALS leaves its random start
    half-solved), and a deployed peer would fall back the same way."""
    pop = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    empty = np.diff(X.indptr) == 0

    def scores(rows: np.ndarray) -> np.ndarray:
        s = np.array(scorer.scores(rows), dtype=np.float64, copy=True)
        cold = empty[rows]
        if cold.any():
            s[cold] = pop
        return s
    return Scorer(scorer.name, scorer.settings, scores)


def _listed(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]
