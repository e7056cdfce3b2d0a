"""The candidate rule's merge (features.candidate_sources): what each source may add, which
source keeps an item, what never becomes a candidate; the item-item source's ranking."""
from __future__ import annotations

import numpy as np

from features.candidate_sources import SOURCES, CandidatePolicy, SourceList, item_item_top, union_sources
from features.catalog import ItemCatalog
from features.item_item import fit_item_item


def _catalog(n: int, publish: np.ndarray | None = None) -> ItemCatalog:
    ids = np.arange(n, dtype=np.int64)
    pub = np.zeros(n, dtype=np.int64) if publish is None else publish
    return ItemCatalog(ids, np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, 60.0), pub)


def test_each_source_adds_at_most_its_quota_of_eligible_items_and_the_first_source_keeps_an_item():
    cat = _catalog(20, np.where(np.arange(20) == 7, 10**9, 0))  # item 7 is published after the request
    a = SourceList(np.array([3, 1, 7, 2, 5]), 0, 3)
    b = SourceList(np.array([2, 9, 8, 4]), SOURCES.index("item_item"), 2)
    ids, src = union_sources([a, b], cat, blocked=np.array([1, 1, 9]), now_ms=1000)
    assert ids.tolist() == [3, 2, 5, 8]  # a: 3, (1 blocked), (7 unpublished), 2, 5; b: 2 (already a's), (9 blocked), 8
    assert src.tolist() == [0, 0, 0, SOURCES.index("item_item")]


def test_unknown_items_and_a_zero_quota_add_nothing():
    cat = _catalog(5)
    ids, src = union_sources([SourceList(np.array([99, 1]), 0, 5), SourceList(np.array([2, 3]), 3, 0)], cat, np.empty(0, np.int64), 10)
    assert ids.tolist() == [1] and src.tolist() == [0]


def test_item_item_top_is_the_best_scoring_unseen_items_of_the_history():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 60, 900), rng.integers(0, 40, 900)
    model = fit_item_item(np.arange(40), users, items, l2=10.0)
    hist = np.array([-1, -1, 3, 8, 11])
    got = item_item_top(model, hist, 7, exclude=np.array([5]))
    s, miss = model.scores(hist, np.arange(40))
    ok = (s != 0) & ~miss & ~np.isin(np.arange(40), [3, 8, 11, 5])
    cand = np.flatnonzero(ok)
    want = cand[np.lexsort((cand, -s[cand]))][:7]
    assert got.tolist() == want.tolist() and len(got) == 7


def test_a_release_policy_replaces_only_the_quotas_it_names():
    base = CandidatePolicy(retrieve_k=300, n_popular=10)
    p = base.for_release({"retrieve_k": 150, "n_item_item": 50})
    assert (p.retrieve_k, p.n_item_item, p.n_popular, p.n_fresh) == (150, 50, 10, base.n_fresh)
    assert base.for_release({}) is base
