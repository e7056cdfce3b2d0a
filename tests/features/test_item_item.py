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
