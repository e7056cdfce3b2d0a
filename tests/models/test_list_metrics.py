"""Per-list metrics the device ranker is chosen and stopped on: each list on its own, lists
without a positive skipped, and blind to score offsets between lists."""
from __future__ import annotations

import numpy as np

from models.metrics import list_index, ndcg_at_k, within_list_auc, within_list_ndcg


def test_list_index_pads_each_contiguous_list():
    idx = list_index(np.array([5, 5, 5, 2, 9, 9]))
    assert idx.tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]]


def test_within_list_metrics_ignore_offsets_between_lists_and_skip_lists_without_a_positive():
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0], dtype=np.float32)
    s = np.array([0.9, 0.1, 0.2, 100.0, 101.0, 99.0, 5.0, 6.0])  # list 1 lives at another scale
    assert within_list_auc(s, y, groups) == 1.0
    assert within_list_ndcg(s, y, groups) == 1.0
    worse = s.copy()
    worse[0] = 0.0  # list 0's positive drops to last of three
    assert within_list_auc(worse, y, groups) == 0.5  # (0 + 1) / 2 lists
    want = (ndcg_at_k(y[:3], worse[:3]) + 1.0) / 2
    assert abs(within_list_ndcg(worse, y, groups) - want) < 1e-12 and want < 1.0
