"""The two-tower retrieval model: what training must guarantee, and that its ONNX export does
the same maths as torch."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.towers import (
    HISTORY_INPUT,
    OUTPUT,
    USER_INPUT,
    TowerMismatchError,
    check_item_tower,
    check_user_tower,
    export_item_tower,
    export_towers,
    export_user_tower,
    item_check_inputs,
)
from features.item_inputs import load_vocab
from models.data import ItemCatalog, TrainingData, build_training_data
from models.two_tower import (
    TwoTowerConfig,
    TwoTowerModel,
    popularity_recall,
    retrieval_recall,
    train_two_tower,
    user_columns,
)

TINY = TwoTowerConfig.for_profile("tiny")


@pytest.fixture(scope="module")
def tiny_td(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    from features.simulator import simulate

    out = tmp_path_factory.mktemp("tt") / "data"
    simulate(out, users=300, items=80, days=5, seed=1)
    return build_training_data(out)


@pytest.fixture(scope="module")
def model(tiny_td: TrainingData) -> TwoTowerModel:
    return train_two_tower(tiny_td, TINY, seed=0)


def _new_catalog(topics: np.ndarray, creators: np.ndarray, durations: np.ndarray) -> ItemCatalog:
    n = len(topics)
    return ItemCatalog(np.arange(10**9, 10**9 + n, dtype=np.int64), np.asarray(topics, dtype=np.int32),
                       np.asarray(creators, dtype=np.int64), np.asarray(durations, dtype=np.float64), np.zeros(n, dtype=np.int64))


def test_user_tower_reads_exactly_the_user_feature_set_columns(tiny_td, model):
    assert model.user_columns == user_columns(tiny_td)
    assert model.user_columns and all(c.startswith(tiny_td.inputs.user_set + ".") for c in model.user_columns)
    assert model.user_tower.n_features == len(model.user_columns)


def test_training_loss_decreases(model):
    assert len(model.loss_history) >= 2
    assert model.loss_history[-1] < model.loss_history[0]
    assert all(np.isfinite(model.loss_history))


def test_same_seed_gives_identical_embeddings_and_another_seed_does_not(tiny_td, model):
    again = train_two_tower(tiny_td, TINY, seed=0)
    X = model.user_inputs(tiny_td.test.X, tiny_td.columns)
    assert again.loss_history == model.loss_history
    assert np.array_equal(again.item_embeddings(), model.item_embeddings())
    assert np.array_equal(again.user_embeddings(X), model.user_embeddings(X))
    other = train_two_tower(tiny_td, dataclasses.replace(TINY, epochs=2, patience=0), seed=1)
    assert not np.allclose(other.item_embeddings(), model.item_embeddings())


def test_embeddings_are_unit_norm_and_of_the_configured_size(tiny_td, model):
    E = model.item_embeddings()
    U = model.user_embeddings(model.user_inputs(tiny_td.test.X, tiny_td.columns))
    assert E.shape == (len(tiny_td.items), TINY.dim) and E.dtype == np.float32
    assert U.shape == (len(tiny_td.test), TINY.dim) and U.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(U, axis=1), 1.0, atol=1e-5)


def test_a_user_with_no_features_at_all_gets_a_finite_unit_embedding(model):
    X = np.full((3, len(model.user_columns)), np.nan, dtype=np.float32)
    U = model.user_embeddings(X)
    assert np.isfinite(U).all()
    np.testing.assert_allclose(np.linalg.norm(U, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(U[0], U[1], atol=1e-6)  # same inputs (batched maths may differ in the last bit)


def test_history_is_read_point_in_time_and_changes_the_embedding(tiny_td, model):
    tr = tiny_td.train
    assert tr.H.shape == (len(tr), 50) and (tr.H >= 0).any()
    X = model.user_inputs(tr.X[-200:], tiny_td.columns)
    with_h = model.user_embeddings(X, tr.H[-200:])
    without = model.user_embeddings(X)  # a new user: empty history
    assert np.isfinite(without).all()
    np.testing.assert_allclose(np.linalg.norm(without, axis=1), 1.0, atol=1e-5)
    has = (tr.H[-200:] >= 0).any(axis=1)
    assert has.any() and np.abs(with_h[has] - without[has]).max() > 1e-3
    np.testing.assert_allclose(with_h[~has], without[~has], atol=1e-6)
    # unknown ids and padding are ignored: an all-unknown history is an empty one
    junk = np.full((len(X), 5), 10**12, dtype=np.int64)
    np.testing.assert_allclose(model.user_embeddings(X, junk), without, atol=1e-6)


def test_a_user_with_history_and_no_features_gets_a_sane_embedding(tiny_td, model):
    X = np.full((1, len(model.user_columns)), np.nan, dtype=np.float32)
    h = tiny_td.train.H[(tiny_td.train.H >= 0).sum(axis=1).argmax()][None, :]
    assert (h >= 0).sum() >= 3
    E = model.user_embeddings(X, h)
    assert np.isfinite(E).all() and abs(float(np.linalg.norm(E)) - 1.0) < 1e-5


def test_a_brand_new_item_gets_its_content_embedding(tiny_td, model):
    cat = tiny_td.items
    new = _new_catalog(cat.topic[:5], cat.creator_id[:5], cat.duration_s[:5])
    inputs = model.item_inputs(new.item_id, new)
    assert (inputs["item_index"] == 0).all()
    E_new = model.item_embeddings(new.item_id, new)
    assert np.isfinite(E_new).all()
    np.testing.assert_allclose(E_new, model.content_embeddings(cat.item_id[:5]), atol=1e-6)


def test_new_items_land_nearer_to_catalogue_items_of_their_own_topic(tiny_td, model):
    cat = tiny_td.items
    E = model.item_embeddings()
    C = model.content_embeddings(cat.item_id)  # every item as if brand new (item_index 0)
    margins = []
    for i in range(len(cat)):
        s = E @ C[i]
        same = cat.topic == cat.topic[i]
        same[i] = False
        other = cat.topic != cat.topic[i]
        if same.any():
            margins.append(s[same].mean() - s[other].mean())
    margins = np.array(margins)
    assert margins.mean() > 0.02
    assert (margins > 0).mean() > 0.75


def test_new_items_of_different_topics_get_different_embeddings(tiny_td, model):
    topics = np.unique(tiny_td.items.topic)[:4]
    new = _new_catalog(topics, np.full(len(topics), -1), np.zeros(len(topics)))
    E = model.item_embeddings(new.item_id, new)
    assert np.isfinite(E).all()
    sims = E @ E.T
    assert (sims[~np.eye(len(topics), dtype=bool)] < 0.9999).all()


def test_items_never_seen_as_positives_keep_no_id_embedding(tiny_td, model):
    w = model.item_tower.id_embedding.weight.detach().numpy()
    seen = np.isin(tiny_td.items.item_id, tiny_td.train.item_id[tiny_td.train.label > 0.5])
    assert (w[0] == 0).all()
    assert (w[1:][~seen] == 0).all()
    assert (np.abs(w[1:][seen]).sum(axis=1) > 0).all()


def test_two_tower_retrieves_held_out_positives_better_than_random(tiny_td, model):
    k = 20
    r = retrieval_recall(model, tiny_td, "test", k=k)
    assert 0.0 <= popularity_recall(tiny_td, "test", k=k) <= 1.0
    assert r > 1.5 * k / len(tiny_td.items)


def test_config_rejects_bad_values_and_unknown_profiles():
    with pytest.raises(ValueError, match="unknown profile"):
        TwoTowerConfig.for_profile("huge")
    with pytest.raises(ValueError, match="id_dropout"):
        TwoTowerConfig(id_dropout=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TwoTowerConfig(batch_size=1)


# ---- ONNX export --------------------------------------------------------------------------


def _ort(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_user_tower_onnx_matches_torch_on_real_and_all_nan_rows_with_and_without_history(tiny_td, model, tmp_path):
    path = export_user_tower(model, tmp_path / "user_tower.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == [USER_INPUT, HISTORY_INPUT] and [o.name for o in proto.graph.output] == [OUTPUT]
    assert proto.opset_import[0].version == 17
    X = model.user_inputs(tiny_td.test.X[:50], tiny_td.columns)
    X = np.concatenate([X, np.full((2, X.shape[1]), np.nan, dtype=np.float32)])
    H = np.concatenate([tiny_td.test.H[:50], np.full((2, tiny_td.test.H.shape[1]), -1, dtype=np.int64)])
    assert (H[:50] >= 0).any()
    for hist in (H, None):
        (got,) = _ort(path).run([OUTPUT], {USER_INPUT: X, HISTORY_INPUT: model.history_inputs(hist, len(X))})
        np.testing.assert_allclose(got, model.user_embeddings(X, hist), atol=1e-4)
    (one,) = _ort(path).run([OUTPUT], {USER_INPUT: X[:1], HISTORY_INPUT: model.history_inputs(H[:1], 1)})  # dynamic batch axis
    assert one.shape == (1, TINY.dim)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert int(meta["parity.history_len"]) == TINY.history_len


def test_item_tower_onnx_matches_torch_on_catalogue_and_unknown_items(tiny_td, model, tmp_path):
    path = export_item_tower(model, tmp_path / "item_tower.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["item_index", "topic", "creator_bucket", "duration_s"]
    new = _new_catalog([-1, 3], [-1, 7], [0.0, 12.0])
    for cat in (tiny_td.items, new):
        feeds = model.item_inputs(cat.item_id, cat)
        (got,) = _ort(path).run([OUTPUT], feeds)
        np.testing.assert_allclose(got, model.item_embeddings(cat.item_id, cat), atol=1e-4)
    assert check_item_tower(model, path) <= 1e-4


def test_export_check_names_a_disagreement_between_torch_and_onnx(model, tmp_path):
    path = export_user_tower(model, tmp_path / "user_tower.onnx")
    broken = dataclasses.replace(model, user_tower=copy.deepcopy(model.user_tower))
    with torch.no_grad():
        broken.user_tower.mlp[-1].bias += 0.5
    with pytest.raises(TowerMismatchError, match="differs from torch"):
        check_user_tower(broken, path)
    assert len(item_check_inputs(model)["item_index"]) > 2 * len(model.vocab)


def test_export_towers_writes_both_towers_and_the_vocabulary_the_server_reads(model, tmp_path):
    paths = export_towers(model, tmp_path / "release")
    assert sorted(paths) == ["item_ids.npy", "item_tower.onnx", "user_tower.onnx"]
    assert all(p.is_file() for p in paths.values())
    assert not [p for p in (tmp_path / "release").iterdir() if p.name.startswith(".")]  # no temp files left
    vocab = load_vocab(tmp_path / "release")
    assert np.array_equal(vocab, model.vocab)
    feeds = model.item_inputs(vocab[:5])
    assert feeds["item_index"].tolist() == [1, 2, 3, 4, 5]
    meta = {p.key: p.value for p in onnx.load(str(paths["user_tower.onnx"])).metadata_props}
    assert json.loads(meta["parity.user_columns"]) == model.user_columns
