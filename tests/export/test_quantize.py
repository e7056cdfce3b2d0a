"""ONNX export of the rankers and int8 quantization of the student: round trips and gates."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportMismatchError,
    export_ranker,
    ort_score,
    ort_session,
)
from export.quantize import ModelSizeError, RankingDisagreementError, quantize_student
from models.metrics import candidate_lists
from models.ranker import RankerConfig, predict, train_student, train_teacher


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """Tiny simulated data, a tiny teacher and student, both exported (shared by the tests)."""
    from features.simulator import simulate
    from models.data import build_training_data

    root = tmp_path_factory.mktemp("quantize")
    simulate(root / "data", users=300, items=80, days=5, seed=1)
    td = build_training_data(root / "data")
    cfg = RankerConfig.for_profile("tiny")
    teacher = train_teacher(td, cfg, seed=0)
    student = train_student(td, teacher, cfg, seed=0)
    t_rep = export_ranker(teacher, root / "teacher_fp32.onnx", td.valid.X)
    s_rep = export_ranker(student, root / "student_fp32.onnx", td.valid.X)
    return {"root": root, "td": td, "teacher": teacher, "student": student, "t_rep": t_rep, "s_rep": s_rep}


def _valid_lists(td):
    return candidate_lists(td.valid.user_id, min_size=5)


def test_export_matches_torch_within_1e4_on_rows_with_and_without_nans(tiny):
    for model, rep in ((tiny["teacher"], tiny["t_rep"]), (tiny["student"], tiny["s_rep"])):
        assert rep.n_rows_with_nan > 0 and rep.n_rows_checked > rep.n_rows_with_nan
        assert rep.max_abs_diff <= 1e-4
        X = tiny["td"].test.X.copy()
        X[::5, ::2] = np.nan
        got = ort_score(ort_session(rep.path), X)
        np.testing.assert_allclose(got, predict(model, X), atol=1e-4, rtol=0)


def test_exported_graph_has_the_serving_contract(tiny):
    m = onnx.load(str(tiny["s_rep"].path))
    onnx.checker.check_model(m, full_check=True)
    assert {o.domain: o.version for o in m.opset_import}.get("", None) == 17
    sess = ort_session(tiny["s_rep"].path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1]) == (INPUT_NAME, "tensor(float)", len(tiny["td"].columns))
    assert (out.name, out.type, len(out.shape)) == (OUTPUT_NAME, "tensor(float)", 1)
    for n in (1, 500):  # dynamic batch
        X = np.resize(tiny["td"].valid.X, (n, inp.shape[1])).astype(np.float32)
        assert ort_score(sess, X).shape == (n,)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["parity.model"] == "StudentRanker"
    assert json.loads(meta["parity.columns"]) == list(tiny["td"].columns)


class _DiffersWhenExported(torch.nn.Module):
    """Scores one way in eager torch and another in the exported graph."""

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return torch.sigmoid(x[:, 0] * 0 + 1.0)
        return torch.sigmoid(x[:, 0] * 0)


def test_export_raises_and_writes_nothing_when_onnx_disagrees_with_torch(tmp_path: Path, tiny):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportMismatchError, match="disagree"):
        export_ranker(_DiffersWhenExported(), path, tiny["td"].valid.X)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_quantized_student_is_smaller_and_ranks_like_fp32(tiny, tmp_path: Path):
    td = tiny["td"]
    out = tmp_path / "student_int8.onnx"
    rep = quantize_student(tiny["s_rep"].path, out, td.train.X, check_X=td.valid.X, check_lists=_valid_lists(td),
                           teacher_path=tiny["t_rep"].path)
    assert out.is_file() and rep.int8_bytes == out.stat().st_size
    assert rep.int8_bytes < rep.fp32_bytes
    assert rep.size_ratio_to_teacher is not None and rep.size_ratio_to_teacher <= 0.25
    # Tiny data keeps the documented 0.95 gate: lists of ~10 candidates, tau measured on ~80 lists.
    assert rep.mean_tau >= 0.95 and rep.n_lists >= 20
    assert rep.settings["format"] == "QDQ" and rep.settings["weight_type"] == "QInt8"


def test_quantization_touches_only_matmul_and_gemm(tiny, tmp_path: Path):
    td = tiny["td"]
    out = tmp_path / "student_int8.onnx"
    quantize_student(tiny["s_rep"].path, out, td.train.X, check_X=td.valid.X, check_lists=_valid_lists(td))
    g = onnx.load(str(out)).graph
    producers = {o: n for n in g.node for o in n.output}
    gemms = [n for n in g.node if n.op_type in ("Gemm", "MatMul")]
    assert gemms and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in gemms)  # int8 weights
    assert all(producers[n.input[0]].op_type == "DequantizeLinear" for n in gemms)  # int8 activations
    types = {n.op_type for n in g.node}
    assert {"IsNaN", "Where", "Log", "Sigmoid"} <= types  # transform and output stay float ops
    for n in g.node:
        if n.op_type in ("IsNaN", "Log", "Where"):
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input)


def test_quantized_model_scores_nan_rows(tiny, tmp_path: Path):
    td = tiny["td"]
    out = tmp_path / "student_int8.onnx"
    quantize_student(tiny["s_rep"].path, out, td.train.X, check_X=td.valid.X, check_lists=_valid_lists(td))
    X = np.concatenate([td.test.X, np.full((1, td.test.X.shape[1]), np.nan, np.float32)])
    s = ort_score(ort_session(out), X)
    assert np.isfinite(s).all() and ((s >= 0) & (s <= 1)).all()


def test_disagreeing_ranking_raises_a_named_error_and_writes_nothing(tiny, tmp_path: Path):
    td = tiny["td"]
    out = tmp_path / "student_int8.onnx"
    with pytest.raises(RankingDisagreementError, match="Kendall tau"):
        quantize_student(tiny["s_rep"].path, out, td.train.X, check_X=td.valid.X, check_lists=_valid_lists(td), min_tau=1.01)
    assert not out.exists()


def test_a_student_too_big_for_the_size_budget_raises(tiny, tmp_path: Path):
    td = tiny["td"]
    with pytest.raises(ModelSizeError, match="teacher"):
        quantize_student(tiny["s_rep"].path, tmp_path / "q.onnx", td.train.X, check_X=td.valid.X,
                         check_lists=_valid_lists(td), teacher_path=tiny["t_rep"].path, max_size_ratio=0.001)
