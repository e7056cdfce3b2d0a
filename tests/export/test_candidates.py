"""The candidate rule's blocked-item filter: a binary search over the sorted blocked ids is
np.isin, and candidate_union's answer does not depend on the order or repeats of `blocked`."""
from __future__ import annotations

import numpy as np

from export import candidates as C
from features import candidate_sources as S
from features.datasets import load_info
from features.repo import feature_sets
from server.items import load_catalog
from server.state import load_runtime


def test_membership_by_binary_search_is_isin():
    rng = np.random.default_rng(0)
    for _ in range(300):
        blocked = np.unique(rng.integers(-5, 50, rng.integers(1, 20)))
        ids = rng.integers(-10, 60, rng.integers(0, 40))
        assert np.array_equal(S.member(ids, blocked), np.isin(ids, blocked))
    assert S.member(np.array([1, 2]), np.empty(0, np.int64)).tolist() == [False, False]


def test_candidates_are_those_of_the_isin_filter_for_any_blocked_list(release_dir, small_sim, monkeypatch):
    info = load_info(small_sim)
    rt = load_runtime(release_dir, {fs.name: fs for fs in feature_sets(info.kind, info.n_topics)})
    catalog = load_catalog(small_sim)
    new = C.NewItems.of(rt, catalog)
    now = int(catalog.publish_ts.max()) + 1
    policy = C.CandidatePolicy(retrieve_k=20, n_content=5, n_fresh=5, fresh_window_ms=10**12, n_popular=10)
    rng = np.random.default_rng(1)
    emb = rt.item_embeddings[:6]
    for i in range(6):
        blocked = rng.choice(catalog.item_id, size=12)  # unsorted, with repeats
        got = C.candidate_union(rt, emb[i], catalog, new, blocked, now, policy)
        with monkeypatch.context() as m:
            m.setattr(S, "member", lambda ids, b: np.isin(ids, b))
            want = C.candidate_union(rt, emb[i], catalog, new, blocked, now, policy)
        assert got.ids.tolist() == want.ids.tolist() and got.source.tolist() == want.source.tolist()
        assert not set(got.ids.tolist()) & set(blocked.tolist())
