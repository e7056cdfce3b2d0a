"""The item-item model behind the ranker's retrieval.item_item column (features.item_item)."""
import numpy as np
import pytest

from export.item_item import load_item_item, save_item_item
from features.assemble import retrieval_columns
from features.item_item import ItemItem, fit_item_item


def _fit(l2=1.0):
    # users 1 and 2 engage with items 10 and 20 together; user 3 with 30 alone; item 40 never
    users = np.array([1, 1, 2, 2, 3, 3])
    items = np.array([10, 20, 10, 20, 30, 99])  # 99 is outside the vocabulary: ignored
    return fit_item_item(np.array([40, 10, 30, 20]), users, items, l2)


def test_ease_weights_have_a_zero_diagonal_and_link_co_engaged_items():
    m = _fit()
    assert m.vocab.tolist() == [10, 20, 30, 40] and m.weights.dtype == np.float32 and m.l2 == 1.0
    assert np.all(np.diag(m.weights) == 0)
    r = m.rows(np.array([10, 20, 30, 40]))
    assert m.weights[r[0], r[1]] > 0.5 and m.weights[r[1], r[0]] > 0.5  # 10 <-> 20
    assert abs(m.weights[r[0], r[2]]) < 1e-6 and np.all(m.weights[:, r[3]] == 0)  # nothing links to 30 or 40
    # closed form: B = I - P diagMat(1/diag(P)), P = (X'X + l2 I)^-1
    X = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float64)
    P = np.linalg.inv(X.T @ X + np.eye(4))
    B = np.eye(4) - P / np.diag(P)[None, :]
    np.testing.assert_allclose(m.weights, B, atol=1e-6)


def test_scores_sum_the_history_rows_and_flag_what_cannot_be_scored():
    m = _fit()
    v, miss = m.scores(np.array([-1, -1, 10, 30]), np.array([20, 40, 77, 10]))
    r = m.rows(np.array([10, 20, 30, 40]))
    assert miss.tolist() == [False, False, True, False]  # 77: not in the vocabulary
    np.testing.assert_allclose(v[0], m.weights[r[0], r[1]] + m.weights[r[2], r[1]], rtol=1e-6)
    assert v[2] == 0.0
    v, miss = m.scores(np.array([-1, 55]), np.array([10, 20]))  # no known history item: all missing
    assert miss.all() and (v == 0).all()
    v, miss = m.scores(np.empty(0, np.int64), np.empty(0, np.int64))
    assert len(v) == 0 and len(miss) == 0


def test_retrieval_columns_add_the_item_item_score_only_when_given_a_model():
    m = _fit()
    ids, s = np.array([20, 30]), np.array([0.5, 0.9])
    assert set(retrieval_columns(s, ids)) == {"retrieval.rank", "retrieval.gap"}
    rc = retrieval_columns(s, ids, np.array([10]), m)
    v, miss = m.scores(np.array([10]), ids)
    np.testing.assert_array_equal(rc["retrieval.item_item"][0], v)
    np.testing.assert_array_equal(rc["retrieval.item_item"][1], miss)
    assert rc["retrieval.item_item"][1].tolist() == [False, False]
    assert retrieval_columns(s, ids, None, m)["retrieval.item_item"][1].all()  # no history: missing


def test_files_round_trip_and_bad_shapes_are_refused(tmp_path):
    m = _fit(5.0)
    save_item_item(m, tmp_path)
    back = load_item_item(tmp_path, 5.0, 30)
    assert back.l2 == 5.0 and back.history_len == 30 and _fit().history_len == 50  # default: the tower's HISTORY_LEN
    np.testing.assert_array_equal(back.vocab, m.vocab)
    np.testing.assert_array_equal(back.weights, m.weights)
    with pytest.raises(ValueError, match="must be"):
        ItemItem(np.array([1, 2]), np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="sorted"):
        ItemItem(np.array([2, 1]), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="l2"):
        fit_item_item(np.array([1]), np.array([1]), np.array([1]), 0.0)


def _random_model(seed=0, users=300, items=60):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, 4000)
    i = rng.zipf(1.3, 4000) % items * 3 + 5  # ids 5, 8, ... with a popular head
    return fit_item_item(np.arange(items) * 3 + 5, u, i, 10.0)


def _top_by_full_sort(m, history, n, exclude=()):
    """The reference: score every vocabulary item with `scores`, drop history/exclude/zero, sort."""
    v, miss = m.scores(history, m.vocab)
    keep = ~miss & (v != 0) & ~np.isin(m.vocab, history) & ~np.isin(m.vocab, np.asarray(exclude, np.int64))
    ids, v = m.vocab[keep], v[keep]
    order = np.lexsort((ids, -v))[:n]
    return ids[order], v[order]


@pytest.mark.parametrize("n", [1, 5, 17, 1000])
def test_top_equals_a_full_sort_of_the_vocabulary_scores(n):
    m = _random_model()
    rng = np.random.default_rng(1)
    for _ in range(20):
        hist = np.concatenate([[-1, -1, 999], rng.choice(m.vocab, rng.integers(1, 8), replace=False)])
        exclude = rng.choice(m.vocab, 5, replace=False)
        ids, v = m.top(hist, n, exclude)
        ref_ids, ref_v = _top_by_full_sort(m, hist, n, exclude)
        assert ids.dtype == np.int64 and v.dtype == np.float64
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(v, ref_v)  # the same numbers as `scores`, bit for bit
        assert not np.isin(ids, hist).any() and not np.isin(ids, exclude).any() and (v != 0).all()


def test_top_breaks_ties_by_the_lower_id_and_keeps_only_nonzero_scores():
    w = np.zeros((5, 5), np.float32)
    w[0, [1, 2, 3]] = [0.5, 0.5, 0.25]  # items 20 and 30 tie; 50 is never pointed at
    m = ItemItem(np.array([10, 20, 30, 40, 50]), w)
    assert m.top(np.array([10]), 1)[0].tolist() == [20] and m.top(np.array([10]), 2)[0].tolist() == [20, 30]
    ids, v = m.top(np.array([10]), 10)
    assert ids.tolist() == [20, 30, 40] and v.tolist() == [0.5, 0.5, 0.25]
    assert m.top(np.array([10]), 10, exclude=np.array([20]))[0].tolist() == [30, 40]
    assert m.top(np.array([-1, 77]), 3)[0].size == 0  # no known history item: nothing to offer
    assert m.top(np.array([10]), 0)[0].size == 0
