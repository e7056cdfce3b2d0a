"""The item-item model behind the ranker's retrieval.item_item column and the item-item candidate
source (features.item_item): EASE on co-occurrence neighbourhoods, stored sparse."""
import tracemalloc

import numpy as np
import pytest

from export.item_item import FILES, IDS_FILE, INDPTR_FILE, NBR_FILE, WEIGHTS_FILE, ItemItemFileError, load_item_item, save_item_item
from features.assemble import retrieval_columns
from features.item_item import ItemItem, fit_item_item, sparsify


def _binary(vocab, users, items):
    vocab = np.unique(vocab)
    keep = np.isin(items, vocab)
    _, u = np.unique(users[keep], return_inverse=True)
    X = np.zeros((u.max() + 1, len(vocab)))
    X[u, np.searchsorted(vocab, items[keep])] = 1.0
    return X


def _dense_ease(X, l2):
    """The closed form, written out here as the reference: B = I - P diagMat(1/diag(P)), P = (X'X + l2 I)^-1."""
    P = np.linalg.inv(X.T @ X + l2 * np.eye(X.shape[1]))
    return np.eye(X.shape[1]) - P / np.diag(P)[None, :]


def _matrix(m):
    """The model's weights as a dense matrix, read from its stored neighbours."""
    n = len(m.vocab)
    B = np.zeros((n, n))
    B[np.repeat(np.arange(n), np.diff(m.indptr)), m.nbr] = m.weights
    return B


def _data(seed=0, users=300, items=60, pairs=4000):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, pairs)
    i = rng.zipf(1.3, pairs) % items * 3 + 5  # ids 5, 8, ... with a popular head
    return np.arange(items) * 3 + 5, u, i


def _fit(l2=1.0, **kw):
    # users 1 and 2 engage with items 10 and 20 together; user 3 with 30 alone; item 40 never
    users = np.array([1, 1, 2, 2, 3, 3])
    items = np.array([10, 20, 10, 20, 30, 99])  # 99 is outside the vocabulary: ignored
    return fit_item_item(np.array([40, 10, 30, 20]), users, items, l2, **kw)


def test_ease_weights_have_a_zero_diagonal_and_link_co_engaged_items():
    m = _fit()
    assert m.vocab.tolist() == [10, 20, 30, 40] and m.weights.dtype == np.float32 and m.l2 == 1.0
    B = _matrix(m)
    assert np.all(np.diag(B) == 0)
    assert B[0, 1] > 0.5 and B[1, 0] > 0.5  # 10 <-> 20
    assert abs(B[0, 2]) < 1e-6 and np.all(B[:, 3] == 0)  # nothing links to 30 or 40
    X = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float64)
    np.testing.assert_allclose(B, _dense_ease(X, 1.0), atol=1e-6)


@pytest.mark.parametrize("l2", [1.0, 10.0, 200.0])
def test_with_every_other_item_as_neighbour_the_fit_is_the_dense_ease(l2):
    vocab, u, i = _data()
    m = fit_item_item(vocab, u, i, l2, neighbours=len(vocab) - 1)
    np.testing.assert_allclose(_matrix(m), _dense_ease(_binary(vocab, u, i), l2), atol=2e-6)


def test_each_column_is_the_ridge_regression_on_its_top_co_occurring_items():
    """Brute force for every item j: N(j) = the m items co-occurring most with j (ties by the lower id),
    filled with the most popular others; B[N, j] = (G[N, N] + l2 I)^-1 G[N, j]; 0 elsewhere."""
    vocab, u, i = _data(1, users=200, items=40, pairs=500)
    mm, l2 = 8, 20.0
    model = fit_item_item(vocab, u, i, l2, neighbours=mm)
    X = _binary(vocab, u, i)
    G, n = X.T @ X, len(vocab)
    B = _matrix(model)
    deg = np.diag(G)
    popular = np.lexsort((np.arange(n), -deg))
    thin = 0
    for j in range(n):
        co = [a for a in np.lexsort((np.arange(n), -G[:, j])) if a != j and G[a, j] > 0][:mm]
        thin += len(co) < mm
        N = np.sort(co + [a for a in popular if a != j and a not in co][: mm - len(co)])
        w = np.linalg.solve(G[np.ix_(N, N)] + l2 * np.eye(mm), G[N, j])
        np.testing.assert_allclose(B[N, j], w, atol=2e-6, err_msg=f"column {j}")
        assert np.all(B[np.setdiff1d(np.arange(n), N), j] == 0)
    assert thin > 0  # the fill was exercised
    assert model.nnz <= n * mm and model.neighbours == mm


def test_scores_sum_the_history_rows_and_flag_what_cannot_be_scored():
    m = fit_item_item(*_data(), 10.0, neighbours=8)
    B = _matrix(m)
    hist, cand = np.array([-1, -1, 5, 8, 50, 5]), np.array([11, 76, 14, 5, 8, 131])
    v, miss = m.scores(hist, cand)
    assert miss.tolist() == [False, True, False, False, False, False]  # 76: not in the vocabulary
    h, c = m.rows(np.array([5, 8, 50])), m.rows(cand)
    np.testing.assert_array_equal(v[~miss], B[np.ix_(h, c[~miss])].sum(axis=0))  # brute force from the stored weights
    assert v[1] == 0.0
    v, miss = m.scores(np.array([-1, 55]), np.array([5, 8]))  # no known history item: all missing
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


def _top_by_full_sort(m, history, n, exclude=()):
    """The reference: score every vocabulary item with `scores`, drop history/exclude/zero, sort."""
    v, miss = m.scores(history, m.vocab)
    keep = ~miss & (v != 0) & ~np.isin(m.vocab, history) & ~np.isin(m.vocab, np.asarray(exclude, np.int64))
    ids, v = m.vocab[keep], v[keep]
    order = np.lexsort((ids, -v))[:n]
    return ids[order], v[order]


@pytest.mark.parametrize("n", [1, 5, 17, 1000])
def test_top_equals_a_full_sort_of_the_vocabulary_scores(n):
    m = fit_item_item(*_data(), 10.0, neighbours=12)
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


def _model(vocab, rows):
    """An ItemItem from {row: [(neighbour row, weight), ...]}."""
    n = len(vocab)
    ent = sorted((r, c, w) for r, lst in rows.items() for c, w in lst)
    indptr = np.r_[0, np.cumsum(np.bincount([e[0] for e in ent], minlength=n))].astype(np.int64)
    return ItemItem(np.asarray(vocab, np.int64), indptr, np.array([e[1] for e in ent], np.int32), np.array([e[2] for e in ent], np.float32))


def test_top_breaks_ties_by_the_lower_id_and_keeps_only_nonzero_scores():
    m = _model([10, 20, 30, 40, 50], {0: [(1, 0.5), (2, 0.5), (3, 0.25)]})  # 20 and 30 tie; 50 is never pointed at
    assert m.top(np.array([10]), 1)[0].tolist() == [20] and m.top(np.array([10]), 2)[0].tolist() == [20, 30]
    ids, v = m.top(np.array([10]), 10)
    assert ids.tolist() == [20, 30, 40] and v.tolist() == [0.5, 0.5, 0.25]
    assert m.top(np.array([10]), 10, exclude=np.array([20]))[0].tolist() == [30, 40]
    assert m.top(np.array([-1, 77]), 3)[0].size == 0  # no known history item: nothing to offer
    assert m.top(np.array([10]), 0)[0].size == 0


def test_files_round_trip(tmp_path):
    m = fit_item_item(*_data(), 5.0, neighbours=9)
    save_item_item(m, tmp_path)
    back = load_item_item(tmp_path, 5.0, 30, 9)
    assert back.l2 == 5.0 and back.history_len == 30 and back.neighbours == 9 and _fit().history_len == 50  # default: the tower's HISTORY_LEN
    for a in ("vocab", "indptr", "nbr", "weights"):
        np.testing.assert_array_equal(getattr(back, a), getattr(m, a))
        assert getattr(back, a).dtype == getattr(m, a).dtype
    h = np.array([5, 8, 11])
    np.testing.assert_array_equal(back.scores(h, m.vocab)[0], m.scores(h, m.vocab)[0])


def test_damaged_or_mismatched_files_are_refused_with_what_is_wrong(tmp_path):
    m = fit_item_item(*_data(), 5.0, neighbours=9)

    def saved(name=None, arr=None):
        d = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        save_item_item(m, d)
        if name is not None:
            (d / name).unlink()
            if arr is not None:
                np.save(d / name, arr, allow_pickle=False)
        return d

    with pytest.raises(ItemItemFileError, match="item_item_nbr.npy is missing"):
        load_item_item(saved(NBR_FILE), 5.0, 50)
    with pytest.raises(ItemItemFileError, match="dense item-item model of an older release"):
        load_item_item(saved(WEIGHTS_FILE, np.zeros((len(m.vocab), len(m.vocab)), np.float32)), 5.0, 50)
    with pytest.raises(ItemItemFileError, match="must be 1-D float32"):
        load_item_item(saved(WEIGHTS_FILE, m.weights.astype(np.float64)), 5.0, 50)
    with pytest.raises(ItemItemFileError, match="do not fit together.*weights"):
        load_item_item(saved(WEIGHTS_FILE, m.weights[:-1]), 5.0, 50)
    with pytest.raises(ItemItemFileError, match="do not fit together.*indptr"):
        load_item_item(saved(INDPTR_FILE, m.indptr[:-1]), 5.0, 50)
    with pytest.raises(ItemItemFileError, match="do not fit together.*in \\[0, 60\\)"):
        load_item_item(saved(NBR_FILE, np.where(np.arange(m.nnz) == 3, 60, m.nbr).astype(np.int32)), 5.0, 50)
    with pytest.raises(ItemItemFileError, match="do not fit together.*sorted"):
        load_item_item(saved(IDS_FILE, m.vocab[::-1].copy()), 5.0, 50)
    with pytest.raises(ItemItemFileError, match="not a readable"):
        d = saved()
        (d / IDS_FILE).write_bytes(b"not numpy")
        load_item_item(d, 5.0, 50)
    assert set(FILES) == {p.name for p in saved().iterdir()}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="l2"):
        fit_item_item(np.array([1]), np.array([1]), np.array([1]), 0.0)
    with pytest.raises(ValueError, match="neighbours"):
        fit_item_item(np.array([1, 2]), np.array([1]), np.array([1]), 1.0, neighbours=0)
    with pytest.raises(ValueError, match="never the row itself"):
        _model([1, 2], {0: [(0, 1.0)]})
    m = fit_item_item(np.array([7]), np.array([1, 2]), np.array([7, 7]))  # one item: nothing to regress on
    assert m.nnz == 0 and m.scores(np.array([7]), np.array([7]))[0].tolist() == [0.0]


def _fit_peak_bytes(n):
    """Peak traced allocation of one fit over n items, 1.6 n users engaging with 12 items each."""
    import scipy.sparse  # noqa: F401 - imported before tracing: its module objects are not the fit's memory
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(n * 8 // 5), 12)
    items = (rng.zipf(1.2, len(users)) + rng.integers(0, n, len(users))) % n
    tracemalloc.start()
    try:
        m = fit_item_item(np.arange(n), users, items, 50.0, neighbours=32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert m.nnz > n * 16  # a real fit: most items have their neighbourhood
    return peak


def test_the_fit_never_allocates_an_n_by_n_matrix_and_its_memory_grows_linearly():
    small, big = _fit_peak_bytes(5000), _fit_peak_bytes(10000)
    assert big < 10000 * 10000 * 4 / 6, f"peak {big / 1e6:.1f} MB; a dense float32 n x n is 400 MB"
    assert big < 2.6 * small, f"peak {small / 1e6:.1f} MB at 5k items, {big / 1e6:.1f} MB at 10k: more than linear"


def test_the_device_cut_keeps_each_items_strongest_weights_of_the_same_model():
    m = fit_item_item(*_data(), 10.0, neighbours=12)
    B = _matrix(m)
    s = sparsify(m, 4)
    np.testing.assert_array_equal(s.item_id, m.vocab)
    for r in range(len(m.vocab)):
        ids = s.nbr_id[r][s.nbr_id[r] >= 0]
        row = B[r]
        order = np.lexsort((np.arange(len(row)), -np.abs(row)))[:4]
        order = order[row[order].astype(np.float16) != 0]
        assert ids.tolist() == m.vocab[order].tolist()
        np.testing.assert_array_equal(s.nbr_w[r][: len(ids)], row[order].astype(np.float16).astype(np.float32))
    full = sparsify(m, int(np.diff(m.indptr).max()))  # every weight kept: the release model's scores, to float16
    h = np.array([5, 8, 11])
    np.testing.assert_allclose(full.scores(h, m.vocab), m.scores(h, m.vocab)[0], atol=2e-3)


def test_the_fit_does_not_depend_on_how_it_is_chunked(monkeypatch):
    """Pass 2 looks G up in batches of whole chunks (more than nnz/10 lookups each); any chunk size gives the same model."""
    import features.item_item as ii

    rng = np.random.default_rng(4)
    users = np.repeat(np.arange(3000), 15)
    items = rng.zipf(1.3, len(users)) % 700
    ref = fit_item_item(np.arange(700), users, items, 30.0, neighbours=12)
    for chunk in (7, 64):
        monkeypatch.setattr(ii, "_CHUNK", chunk)
        m = fit_item_item(np.arange(700), users, items, 30.0, neighbours=12)
        for a in ("indptr", "nbr", "weights"):
            np.testing.assert_array_equal(getattr(m, a), getattr(ref, a))


def _scipy_pair_values(G_up, N, iu):
    """The lookup _pair_values replaced (issue 14), kept here as its reference: scipy's fancy indexing."""
    return np.asarray(G_up[N[:, iu[0]].ravel(), N[:, iu[1]].ravel()], dtype=np.float32)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_the_grouped_pair_lookup_equals_scipys_fancy_indexing(seed, index_dtype):
    """Random canonical upper-triangle matrices (empty rows, long rows, no duplicates), int32 and
    int64 indices, neighbourhoods ascending as the fit makes them, batches above and below nnz/10."""
    import scipy.sparse as sp

    from features.item_item import _pair_values

    rng = np.random.default_rng(seed)
    n, m, t = int(rng.integers(20, 300)), int(rng.integers(2, 18)), int(rng.integers(1, 40))
    m = min(m, n - 1)
    dense = np.triu(rng.random((n, n)) < rng.uniform(0.01, 0.6), 1) * rng.integers(1, 50, (n, n)).astype(np.float32)
    dense[rng.random(n) < 0.3] = 0  # empty rows
    dense[int(rng.integers(n))] = np.triu(np.arange(1, n + 1, dtype=np.float32)[None, :], 1)[0]  # a long row
    G = sp.csr_array(dense)
    G.indptr, G.indices = G.indptr.astype(index_dtype), G.indices.astype(index_dtype)
    G.sum_duplicates()
    G.has_sorted_indices = True
    assert G.indices.dtype == index_dtype and G.has_canonical_format
    N = np.sort(np.stack([rng.choice(n, m, replace=False) for _ in range(t)]), axis=1).astype(np.int32)
    iu = np.triu_indices(m, 1)
    got, want = _pair_values(G, N, iu), _scipy_pair_values(G, N, iu)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    np.testing.assert_array_equal(want, dense[N[:, iu[0]].ravel(), N[:, iu[1]].ravel()])
    assert _pair_values(G, N[:0], iu).shape == (0,) and _pair_values(G, N[:, :1], np.triu_indices(1, 1)).shape == (0,)


def test_the_fit_on_a_simulated_log_is_unchanged_by_the_grouped_lookup(tmp_path, monkeypatch):
    """The fitted model, bit for bit, and its stored files, byte for byte, are the ones of scipy's fancy indexing."""
    import features.item_item as ii
    from features.datasets import read_items
    from features.eventlog import EventLog
    from features.events import EventType
    from features.history import engagement_mask
    from features.simulator import simulate

    simulate(tmp_path / "data", users=1200, items=300, days=14, seed=3)
    ev = EventLog(tmp_path / "data" / "events").read(types=[EventType.PLAY, EventType.LIKE], must_exist=True)
    keep = engagement_mask(ev, "simulated")
    vocab = np.asarray(read_items(tmp_path / "data").column("item_id").to_numpy(), np.int64)
    users, items = ev.user_id[keep], ev.item_id[keep]
    for chunk in (256, 16):  # one batch, and batches of several chunks
        monkeypatch.setattr(ii, "_CHUNK", chunk)
        new = fit_item_item(vocab, users, items, 200.0, neighbours=64)
        with monkeypatch.context() as mp:
            mp.setattr(ii, "_pair_values", _scipy_pair_values)
            old = fit_item_item(vocab, users, items, 200.0, neighbours=64)
        assert new.nnz > 10 * len(vocab)
        for a in ("vocab", "indptr", "nbr", "weights"):
            np.testing.assert_array_equal(getattr(new, a).view(np.uint8), getattr(old, a).view(np.uint8))
        for name, model in (("new", new), ("old", old)):
            (tmp_path / f"{name}{chunk}").mkdir()
            save_item_item(model, tmp_path / f"{name}{chunk}")
        for f in FILES:
            assert (tmp_path / f"new{chunk}" / f).read_bytes() == (tmp_path / f"old{chunk}" / f).read_bytes()
