"""The ScaNN item index and the torch-free item-input helpers the server shares with training."""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.index import (
    CONFIG_FILE,
    IndexConfig,
    ItemIndex,
    ItemIndexError,
    build_index,
    build_index_for_recall,
    exact_search,
    recall_at_k,
)
from features.item_inputs import (
    VocabError,
    creator_bucket,
    item_tower_inputs,
    load_vocab,
    save_vocab,
    vocab_index,
)
from models.data import ItemCatalog

ROOT = Path(__file__).resolve().parents[2]
TREE = IndexConfig(num_leaves=50, num_leaves_to_search=15, training_sample_size=5000, dims_per_block=2,
                   anisotropic_quantization_threshold=0.2, reorder_k=500)


def _clustered(n: int, d: int, seed: int, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def items() -> np.ndarray:
    return _clustered(5000, 32, seed=1)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return _clustered(300, 32, seed=2)


@pytest.fixture(scope="module")
def tree_index(items) -> ItemIndex:
    return build_index(items, TREE, k=100)


def test_exact_search_matches_brute_force_sorting(queries):
    E = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    idx, sc = exact_search(E, queries[:, :16], k=25)
    S = queries[:, :16] @ E.T
    expect = np.argsort(-S, axis=1, kind="stable")[:, :25]
    assert idx.dtype == np.int64 and sc.dtype == np.float32 and idx.shape == (300, 25)
    assert np.array_equal(idx, expect)
    np.testing.assert_allclose(sc, np.take_along_axis(S, expect, axis=1), rtol=1e-6)


def test_exact_search_caps_k_at_the_catalogue_and_breaks_ties_by_index():
    E = np.ones((4, 3), dtype=np.float32)
    idx, sc = exact_search(E, np.ones((2, 3), dtype=np.float32), k=10)
    assert idx.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert (sc == 3.0).all()


def test_tree_index_finds_95_percent_of_the_exact_top_100(tree_index, items, queries):
    assert not tree_index.config.brute_force
    assert recall_at_k(tree_index, items, queries, k=100) >= 0.95


def test_for_size_configs_reach_95_percent_recall(items, queries):
    for n in (500, 5000):
        index = build_index(items[:n], IndexConfig.for_size(n), k=100)
        assert recall_at_k(index, items[:n], queries, k=100) >= 0.95
    big = IndexConfig.for_size(50_000)
    assert not big.brute_force and big.num_leaves_to_search <= big.num_leaves and big.reorder_k >= 100


def test_search_returns_int64_indices_and_float32_dot_products_best_first(tree_index, items, queries):
    idx, sc = tree_index.search(queries[:7], 10)
    assert idx.shape == (7, 10) and idx.dtype == np.int64 and sc.dtype == np.float32
    np.testing.assert_allclose(sc, np.einsum("md,mkd->mk", queries[:7], items[idx]), atol=1e-4)
    assert (np.diff(sc, axis=1) <= 1e-6).all()
    pidx, _ = tree_index.search(queries[:7], 10, parallel=True)
    assert np.array_equal(pidx, idx)


def test_small_catalogue_brute_force_is_exact_and_caps_k():
    E = _clustered(80, 16, seed=3)
    Q = _clustered(5, 16, seed=4)
    index = build_index(E, IndexConfig.for_size(80), k=100)
    assert index.config.brute_force
    idx, sc = index.search(Q, 100)
    assert idx.shape == (5, 80)
    assert np.array_equal(idx, exact_search(E, Q, 100)[0])


@pytest.mark.parametrize("config", [TREE, IndexConfig.for_size(5000)], ids=["tree", "brute_force"])
def test_saved_index_loads_and_answers_identically_even_after_moving(items, queries, config, tmp_path):
    index = build_index(items, config, k=100)
    before = index.search(queries, 100)
    index.save(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    loaded = ItemIndex.load(tmp_path / "b", embeddings=items)
    after = loaded.search(queries, 100)
    assert np.array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert loaded.config == config and (loaded.n, loaded.dim, loaded.k) == (5000, 32, 100)
    meta = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert IndexConfig.from_dict(meta["config"]) == config


def test_loading_with_other_embeddings_or_from_an_empty_dir_is_refused(tree_index, items, tmp_path):
    tree_index.save(tmp_path / "ix")
    with pytest.raises(ItemIndexError, match="not the ones"):
        ItemIndex.load(tmp_path / "ix", embeddings=items[::-1])
    with pytest.raises(ItemIndexError, match="missing"):
        ItemIndex.load(tmp_path / "nothing")


def test_config_round_trips_and_rejects_unknown_keys_and_bad_values():
    cfg = IndexConfig.for_size(20_000)
    assert IndexConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown IndexConfig keys"):
        IndexConfig.from_dict({**cfg.to_dict(), "leaves": 3})
    with pytest.raises(ValueError, match="exceeds"):
        IndexConfig(num_leaves=5, num_leaves_to_search=6)


def test_building_does_not_spam_stderr_with_scann_logs(items, capfd):
    build_index(items, TREE, k=10)
    assert "partitioner" not in capfd.readouterr().err.lower()


def test_bad_inputs_are_refused_with_clear_errors(tree_index):
    with pytest.raises(ValueError, match="dimension"):
        tree_index.search(np.zeros((2, 8), dtype=np.float32), 10)
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((10, 4), np.nan, dtype=np.float32))
    with pytest.raises(ItemIndexError, match="too few"):
        build_index(_clustered(60, 8, seed=5), TREE)


# ---- item-tower inputs (torch-free, shared with the server) --------------------------------


def test_creator_bucket_is_a_fixed_hash_with_zero_for_unknown():
    got = creator_bucket(np.array([-1, 0, 1, 2, 12345, 2**40]), 1024)
    assert got.dtype == np.int64
    assert got.tolist() == [0, 761, 21, 1019, 1005, 250]  # pinned: training and serving must agree forever
    many = creator_bucket(np.arange(10_000), 1024)
    assert many.min() >= 1 and many.max() <= 1023 and len(np.unique(many)) > 1000


def test_vocab_index_is_one_based_with_zero_for_unknown_and_round_trips(tmp_path):
    vocab = np.array([30, 10, 20], dtype=np.int64)
    assert vocab_index(vocab, np.array([10, 20, 30, 99, -1])).tolist() == [2, 3, 1, 0, 0]
    save_vocab(tmp_path, vocab)
    assert np.array_equal(load_vocab(tmp_path), vocab)
    with pytest.raises(VocabError, match="duplicate"):
        save_vocab(tmp_path, np.array([1, 1]))
    with pytest.raises(FileNotFoundError):
        load_vocab(tmp_path / "elsewhere")


def test_item_tower_inputs_use_the_training_vocab_and_unknown_content_for_unknown_items():
    cat = ItemCatalog(np.array([5, 7, 9]), np.array([2, -1, 4], dtype=np.int32), np.array([11, -1, 12]),
                      np.array([30.0, 0.0, 12.5]), np.zeros(3, dtype=np.int64))
    vocab = np.array([5, 7])  # item 9 arrived after training
    got = item_tower_inputs(cat, np.array([9, 5, 1234]), vocab=vocab)
    assert got["item_index"].tolist() == [0, 1, 0]
    assert got["topic"].tolist() == [4, 2, -1]
    assert got["creator_bucket"].tolist() == creator_bucket(np.array([12, 11, -1])).tolist()
    assert got["duration_s"].dtype == np.float32 and got["duration_s"].tolist() == [12.5, 30.0, 0.0]
    assert {k: v.dtype for k, v in got.items()} == {"item_index": np.int64, "topic": np.int64,
                                                    "creator_bucket": np.int64, "duration_s": np.float32}
    assert (item_tower_inputs(cat, cat.item_id, vocab=vocab, content_only=True)["item_index"] == 0).all()


def test_index_and_item_inputs_import_without_torch():
    code = "import sys; sys.modules['torch'] = None\nimport export.index, features.item_inputs\n"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_an_index_short_of_its_recall_probes_more_leaves_then_falls_back_to_brute_force():
    """Unclustered embeddings (what a barely trained tower gives) at a tree-sized catalogue: the
    search widens until the recall target is met, and brute force always meets it."""
    rng = np.random.default_rng(3)
    E = rng.normal(size=(10_000, 16)).astype(np.float32)
    Q = rng.normal(size=(200, 16)).astype(np.float32)
    first = IndexConfig.for_size(len(E))
    assert not first.brute_force
    index, recall, tried = build_index_for_recall(E, Q, min_recall=0.0)
    assert len(tried) == 1 and tried[0]["config"] == first.to_dict() and index.config == first
    assert recall == pytest.approx(tried[0]["recall"], abs=1e-4) and recall == pytest.approx(recall_at_k(index, E, Q), abs=0.01)
    assert recall < 0.95  # for_size alone misses the release's gate on such embeddings
    index, recall, tried = build_index_for_recall(E, Q, min_recall=1.01)  # unreachable: every step is taken
    probes = [t["config"]["num_leaves_to_search"] for t in tried[:-1]]
    assert probes[0] == first.num_leaves_to_search and probes[-1] == first.num_leaves
    assert all(b == min(2 * a, first.num_leaves) for a, b in itertools.pairwise(probes))
    got = [t["recall"] for t in tried[:-1]]
    assert got[-1] > got[0] + 0.1 and all(b >= a - 0.01 for a, b in itertools.pairwise(got))  # more leaves, more recall (AH caps it below 1)
    assert tried[-1]["config"]["brute_force"] and index.config.brute_force and recall >= 0.999
    target = (tried[0]["recall"] + tried[1]["recall"]) / 2  # between the first two steps (a rebuilt tree varies a little)
    index, recall, tried = build_index_for_recall(E, Q, min_recall=target)
    assert len(tried) == 2 and recall >= target > tried[0]["recall"]
