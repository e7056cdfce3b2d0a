"""The peer recommenders (models.peers): each learns planted structure, deterministically."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("implicit", reason="the peers need the eval extra (pip install .[eval])")

from models.peers import fit_peer, positives_matrix, with_cold_start  # noqa: E402

SMALL = {
    "itemknn": {"weighting": "cosine", "K": 10},
    "ease": {"lambda": 1.0},
    "als": {"factors": 2, "regularization": 1.0, "alpha": 5.0, "iterations": 15},  # two groups: rank 2
    "bpr": {"factors": 4, "learning_rate": 0.05, "regularization": 0.05, "iterations": 200},
}


def _two_groups(seed: int = 0, users: int = 200, per_group: int = 10, liked: int = 6):
    """Users 0..99 like 6 of items 0..9 each, users 100..199 6 of items 10..19."""
    rng = np.random.default_rng(seed)
    u, i = [], []
    for user in range(users):
        group = 0 if user < users // 2 else 1
        for item in rng.choice(per_group, liked, replace=False):
            u.append(user), i.append(group * per_group + int(item))
    return positives_matrix(np.array(u), np.array(i), users, 2 * per_group), per_group


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_peer_ranks_its_users_group_first_among_unseen_items(name):
    X, per_group = _two_groups()
    (sc,) = fit_peer(name, X, SMALL[name], seed=0)
    rows = np.arange(X.shape[0])
    s = sc.scores(rows)
    assert s.shape == X.shape
    s[X.toarray() > 0] = -np.inf  # the 4 unseen items of the user's own group must come first
    for r in rows.tolist():
        group = 0 if r < X.shape[0] // 2 else 1
        top4 = np.argsort(-s[r], kind="stable")[:4]
        assert set((top4 // per_group).tolist()) == {group}, (name, r, top4)


@pytest.mark.parametrize("name", ["als", "bpr"])
def test_factor_peers_are_deterministic_from_the_seed(name):
    X, _ = _two_groups()
    rows = np.arange(X.shape[0])
    a = fit_peer(name, X, SMALL[name], seed=1)[0].scores(rows)
    b = fit_peer(name, X, SMALL[name], seed=1)[0].scores(rows)
    c = fit_peer(name, X, SMALL[name], seed=2)[0].scores(rows)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", ["als", "bpr"])
def test_an_iteration_sweep_reports_what_a_shorter_fit_would_give(name):
    X, _ = _two_groups()
    rows = np.arange(X.shape[0])
    sweep = fit_peer(name, X, {**SMALL[name], "iterations": (3, 7)}, seed=0)
    assert [s.settings["iterations"] for s in sweep] == [3, 7]
    short = fit_peer(name, X, {**SMALL[name], "iterations": 3}, seed=0)[0]
    np.testing.assert_allclose(sweep[0].scores(rows), short.scores(rows), rtol=1e-6)
    assert not np.allclose(sweep[0].scores(rows), sweep[1].scores(rows))


def test_a_sweep_gives_one_scorer_per_value_with_its_settings():
    X, _ = _two_groups()
    ks = [s.settings for s in fit_peer("itemknn", X, {"weighting": "bm25", "K": (2, 5)})]
    assert ks == [{"weighting": "bm25", "K": 2}, {"weighting": "bm25", "K": 5}]
    assert [s.settings["lambda"] for s in fit_peer("ease", X, {"lambda": (1.0, 10.0)})] == [1.0, 10.0]


def test_ease_gives_an_item_no_weight_towards_itself():
    X, _ = _two_groups()
    n = X.shape[0]
    X = positives_matrix(np.r_[X.tocoo().row, n], np.r_[X.tocoo().col, 3], n + 1, X.shape[1])  # the last user has item 3 alone
    (sc,) = fit_peer("ease", X, {"lambda": 5.0})
    s = sc.scores(np.array([n]))[0]
    assert s[3] == 0.0  # without the zero diagonal, item 3 would top its own user's list
    assert s[:10].max() > 0 and np.argmax(s) in range(10) and np.argmax(s) != 3


def test_a_user_without_positives_is_ranked_by_popularity():
    X, _ = _two_groups()
    X = X.tolil()
    X[5, :] = 0
    X = X.tocsr()
    X.eliminate_zeros()
    (sc,) = fit_peer("als", X, SMALL["als"], seed=0)
    cold = with_cold_start(sc, X).scores(np.array([5, 6]))
    np.testing.assert_array_equal(cold[0], np.asarray(X.sum(axis=0)).ravel())
    np.testing.assert_array_equal(cold[1], sc.scores(np.array([6]))[0])


def test_popularity_counts_each_users_positive_once():
    X = positives_matrix(np.array([0, 0, 1, 2]), np.array([1, 1, 1, 0]), 3, 3)
    assert X.nnz == 3 and X.data.tolist() == [1.0, 1.0, 1.0]
    (pop,) = fit_peer("popularity", X, {})
    assert pop.scores(np.array([0, 1])).tolist() == [[1.0, 2.0, 0.0]] * 2


def test_settings_are_checked_where_they_are_given():
    X, _ = _two_groups()
    with pytest.raises(ValueError, match="unknown peer"):
        fit_peer("slim", X, {})
    with pytest.raises(ValueError, match="not \\['lr'\\]"):
        fit_peer("als", X, {**SMALL["als"], "lr": 0.1})
    with pytest.raises(ValueError, match="lambda must be > 0"):
        fit_peer("ease", X, {"lambda": 0.0})
    with pytest.raises(ValueError, match="weighting"):
        fit_peer("itemknn", X, {"weighting": "jaccard", "K": 5})
    with pytest.raises(ValueError, match="outside"):
        positives_matrix(np.array([3]), np.array([0]), 3, 3)
