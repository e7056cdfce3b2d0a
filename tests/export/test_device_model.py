"""The tiny device ranker built from a real (tiny) release: size, ORT vs ONNX, int8 vs fp32,
columns, and the refusal of training data the release was not trained on."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.release import load_release

from export.device.inputs import device_columns, stat_columns
from export.device.tiny_model import MAX_INT8_BYTES, build_device_model, device_session
from export.device.training_rows import TrainingDataMismatch, device_training_data
from export.onnx_export import ort_score, ort_session
from export.quantize import ranking_agreement
from features.session import session_spec
from models.metrics import candidate_lists


@pytest.fixture(scope="module")
def device(release_dir, small_sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("device")
    return build_device_model(release_dir, small_sim, out, profile="tiny", seed=0)


@pytest.fixture(scope="module")
def rows(release_dir, small_sim):
    return device_training_data(release_dir, small_sim, seed=0)


@pytest.fixture(scope="module")
def labelled_release(small_sim, tmp_path_factory):
    """A release whose rankers learned on labelled impression rows (releases learn on candidate lists by default)."""
    from pipeline.train import train_release

    return train_release(small_sim, tmp_path_factory.mktemp("labelled-releases"), profile="tiny", seed=0, ranker_rows="labelled").path


@pytest.fixture(scope="module")
def labelled(labelled_release, small_sim):
    return device_training_data(labelled_release, small_sim, seed=0, rows="labelled")


def test_the_model_is_small_and_its_files_are_what_they_claim(device):
    assert device.bytes["int8"] == device.int8_path.stat().st_size <= MAX_INT8_BYTES
    assert device.ort_path.read_bytes()[4:8] == b"ORTM"  # a FlatBuffers ORT-format model, not ONNX protobuf
    q = onnx.load(str(device.int8_path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}


def test_columns_session_and_stats_are_the_bundle_contract(device, release_dir):
    has_ii = load_release(release_dir).meta.retrieval.item_item is not None  # every release with candidate lists has one now
    assert device.columns == device_columns("simulated", device.dim, item_item=has_ii)
    assert device.session == session_spec("simulated")
    assert device.stat_columns == stat_columns("simulated")
    sess = ort_session(device.fp32_path)
    assert sess.get_inputs()[0].shape[1] == len(device.columns)


def test_ort_equals_int8_onnx_and_both_rank_like_fp32(device, rows):
    X = np.concatenate([rows.valid.X, rows.train.X[:500]])
    X_nan = X.copy()
    X_nan[:50, : 1 + device.dim] = np.nan  # no user file
    for M in (X, X_nan):
        s8 = ort_score(device_session(device.int8_path), M)
        so = ort_score(device_session(device.ort_path), M)
        assert np.all(np.isfinite(so))
        np.testing.assert_allclose(so, s8, rtol=0, atol=1e-6)
    s32 = ort_score(ort_session(device.fp32_path), X)
    lists = candidate_lists(np.concatenate([rows.valid.user_id, rows.train.user_id[:500]]), min_size=3)
    tau, _, n = ranking_agreement(s32, ort_score(device_session(device.ort_path), X), lists)
    assert n > 10 and tau >= 0.95
    assert device.checks.ort_vs_onnx_max_abs <= 1e-6 and device.checks.tau_int8_vs_fp32 >= 0.95


def test_training_rows_carry_the_teacher_and_blankable_embeddings(rows, labelled):
    assert labelled.fingerprint is not None and labelled.rows == "labelled"
    assert rows.rows == "candidates"
    for r in (rows, labelled):
        assert r.train.X.shape[1] == len(r.columns) and len(r.train.teacher) == len(r.train)
        assert np.all((r.train.teacher >= 0) & (r.train.teacher <= 1)) and np.ptp(r.train.teacher) > 0  # probabilities (float32 saturates)
        assert np.isfinite(r.train.X[:, 0]).all()  # every training row has a user and an item embedding
    # candidate lists: each user's list is ranked by its own dot products (emb.rank 0 is its best)
    c = {n: j for j, n in enumerate(rows.columns)}
    X, u = rows.train.X, rows.train.user_id
    first = np.r_[0, np.flatnonzero(np.diff(u)) + 1]
    assert (X[first, c["emb.rank"]] == 0).mean() > 0.9 and (X[:, c["emb.gap"]] <= 0).all()


def test_data_the_release_was_not_trained_on_is_refused(labelled_release, tmp_path):
    from features.simulator import simulate

    other = tmp_path / "other"
    simulate(other, users=150, items=60, days=4, seed=4)  # same shape and feature sets, other events
    with pytest.raises(TrainingDataMismatch, match="fingerprint .* but release .* was trained on"):
        device_training_data(labelled_release, other, seed=0, rows="labelled")
