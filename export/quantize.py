"""Static int8 quantization of the student ranker with ONNX Runtime, and the checks that gate it.

How (ONNX Runtime quantization guide and the `quantize_static` docstring of the installed
version):
- `quant_pre_process` first (shape inference + graph optimisation), as the guide recommends
  doing optimisation in pre-processing rather than during quantization.
- `quantize_static` in QDQ format (the recommended format for CPU since ORT 1.11), MinMax
  calibration over training rows fed by a `CalibrationDataReader`.
- Only MatMul/Gemm are quantized (`op_types_to_quantize`): the feature transform (IsNaN,
  Where, Log, Min/Max, normalisation) and the final Sigmoid stay float32, so missing values
  and clipping behave exactly as in the float model.
- Weights QInt8 (symmetric), activations QUInt8 (asymmetric), per-tensor, reduce_range off:
  the docstring's setting for x86-64 with VNNI (this machine has AVX512-VNNI / AVX-VNNI).
  For ARM devices the docstring prefers QInt8 activations: pass `activation_type`.

Gates (named errors; the int8 file is only written when all pass):
- ranking agreement: mean Kendall tau-b between fp32 and int8 scores over the given candidate
  lists >= `min_tau` (default 0.95), else `RankingDisagreementError`;
- size: when `teacher_path` is given, int8 bytes <= `max_size_ratio` × teacher bytes, else
  `ModelSizeError`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

from export.onnx_export import INPUT_NAME, ort_score, ort_session
from models.metrics import kendall_tau

__all__ = [
    "quantize_student",
    "QuantizeReport",
    "QuantizationError",
    "RankingDisagreementError",
    "ModelSizeError",
    "RowsCalibrationReader",
    "ranking_agreement",
]

QUANTIZED_OPS = ("MatMul", "Gemm")


class QuantizationError(RuntimeError):
    """Base of the quantization gate failures."""


class RankingDisagreementError(QuantizationError):
    """The int8 model orders candidates differently from the fp32 model (Kendall tau too low)."""


class ModelSizeError(QuantizationError):
    """The int8 model is not small enough relative to the teacher."""


@dataclass(frozen=True)
class QuantizeReport:
    fp32_path: str
    int8_path: str
    fp32_bytes: int
    int8_bytes: int
    teacher_bytes: int | None
    n_calibration_rows: int
    n_lists: int
    mean_tau: float
    min_tau: float  # the worst list
    max_abs_score_diff: float
    settings: dict

    @property
    def size_ratio_to_teacher(self) -> float | None:
        return None if not self.teacher_bytes else self.int8_bytes / self.teacher_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "size_ratio_to_teacher": self.size_ratio_to_teacher}


class RowsCalibrationReader(CalibrationDataReader):
    """Feeds `rows` (N, F) float32 to the model input in batches, once; `rewind()` restarts."""

    def __init__(self, rows: np.ndarray, input_name: str = "features", batch: int = 128) -> None:
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self.rows.ndim != 2 or len(self.rows) == 0:
            raise ValueError(f"calibration rows must be a non-empty 2-D array, got shape {self.rows.shape}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.input_name, self.batch, self._i = input_name, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self.rows):
            return None
        out = {self.input_name: self.rows[self._i:self._i + self.batch]}
        self._i += self.batch
        return out

    def rewind(self) -> None:
        self._i = 0


def ranking_agreement(a: np.ndarray, b: np.ndarray, lists: Sequence[np.ndarray]) -> tuple[float, float, int]:
    """(mean, min, n) of Kendall tau-b between scores a and b over lists with a defined tau."""
    taus = np.array([kendall_tau(a[idx], b[idx]) for idx in lists], dtype=np.float64)
    taus = taus[~np.isnan(taus)]
    if len(taus) == 0:
        return float("nan"), float("nan"), 0
    return float(taus.mean()), float(taus.min()), len(taus)


def quantize_student(
    fp32_path: str | os.PathLike[str],
    int8_path: str | os.PathLike[str],
    calib_X: np.ndarray,
    *,
    check_X: np.ndarray,
    check_lists: Sequence[np.ndarray],
    min_tau: float = 0.95,
    teacher_path: str | os.PathLike[str] | None = None,
    max_size_ratio: float = 0.25,
    n_calibration_rows: int = 2000,
    per_channel: bool = False,
    activation_type: QuantType = QuantType.QUInt8,
    weight_type: QuantType = QuantType.QInt8,
    seed: int = 0,
) -> QuantizeReport:
    """Quantize the fp32 student at `fp32_path` to `int8_path` (QDQ, static), then gate it.

    calib_X: training rows (raw inputs, NaN = missing); `n_calibration_rows` of them are drawn
    with `seed`. check_X / check_lists: validation rows and their candidate lists (index arrays,
    e.g. `models.metrics.candidate_lists(valid.user_id)`) for the ranking-agreement gate.
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"no fp32 model at {fp32_path}")
    if not 0.0 < max_size_ratio:
        raise ValueError(f"max_size_ratio must be > 0, got {max_size_ratio}")
    if not len(check_lists):
        raise ValueError("check_lists is empty: pass candidate lists of validation rows (models.metrics.candidate_lists)")
    calib_X = np.asarray(calib_X, dtype=np.float32)
    rng = np.random.default_rng(seed)
    n_cal = min(n_calibration_rows, len(calib_X))
    calib = calib_X[np.sort(rng.choice(len(calib_X), size=n_cal, replace=False))]
    settings = {
        "format": "QDQ", "calibration": "MinMax", "op_types": list(QUANTIZED_OPS), "per_channel": per_channel,
        "reduce_range": False, "activation_type": activation_type.name, "weight_type": weight_type.name,
        "n_calibration_rows": n_cal, "seed": seed,
    }
    with tempfile.TemporaryDirectory(prefix="parity-quant-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(out), RowsCalibrationReader(calib, INPUT_NAME),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
            reduce_range=False, activation_type=activation_type, weight_type=weight_type,
            calibrate_method=CalibrationMethod.MinMax,
        )
        _carry_metadata(fp32_path, out, settings)

        fp32_scores = ort_score(ort_session(fp32_path), check_X)
        int8_scores = ort_score(ort_session(out), check_X)
        mean_tau, worst_tau, n_lists = ranking_agreement(fp32_scores, int8_scores, check_lists)
        if not mean_tau >= min_tau:  # NaN fails too
            raise RankingDisagreementError(
                f"int8 ranking disagrees with fp32: mean Kendall tau {mean_tau:.4f} over {n_lists} lists < {min_tau} "
                f"(worst list {worst_tau:.4f}); try per_channel=True, more calibration rows or activation_type=QInt8")
        int8_bytes = out.stat().st_size
        teacher_bytes = Path(teacher_path).stat().st_size if teacher_path is not None else None
        if teacher_bytes is not None and int8_bytes > max_size_ratio * teacher_bytes:
            raise ModelSizeError(
                f"int8 student is {int8_bytes} bytes, more than {max_size_ratio} × teacher ({teacher_bytes} bytes); "
                f"shrink the student or check that the teacher is the full model")
        int8_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, str(int8_path) + ".tmp")
        os.replace(str(int8_path) + ".tmp", int8_path)
    return QuantizeReport(
        str(fp32_path), str(int8_path), fp32_path.stat().st_size, int8_bytes, teacher_bytes, n_cal, n_lists, mean_tau,
        worst_tau, float(np.max(np.abs(fp32_scores.astype(np.float64) - int8_scores))) if len(check_X) else 0.0, settings,
    )


def _carry_metadata(src: Path, dst: Path, settings: dict) -> None:
    """Keep the fp32 model's metadata (columns, transform stats) and record the quantization settings."""
    s, d = onnx.load(str(src)), onnx.load(str(dst))
    have = {p.key for p in d.metadata_props}
    for p in s.metadata_props:
        if p.key not in have:
            d.metadata_props.add(key=p.key, value=p.value)
    d.metadata_props.add(key="parity.quantization", value=json.dumps(settings))
    onnx.save(d, str(dst))


# ---------------------------------------------------------------------------------------------
# `python -m export.quantize DATA_DIR`: train, export, quantize and measure, one JSON report.


def _report(data_dir: str, profile: str, seed: int, out_dir: str | None) -> dict:
    """Everything this stage promises, measured on one data dir (torch imported here only)."""
    import time

    import torch

    from export.onnx_export import export_ranker
    from models.data import build_training_data
    from models.metrics import auc, candidate_lists, grouped_mean, logloss, ndcg_at_k
    from models.ranker import RankerConfig, predict, train_student, train_teacher

    t = time.perf_counter()
    td = build_training_data(data_dir, seed=seed)
    t_data = time.perf_counter() - t
    cfg = RankerConfig.for_profile(profile)
    teacher = train_teacher(td, cfg, seed)
    student = train_student(td, teacher, cfg, seed)
    out = Path(out_dir or tempfile.mkdtemp(prefix="parity-rankers-"))
    out.mkdir(parents=True, exist_ok=True)
    t_rep = export_ranker(teacher, out / "teacher_fp32.onnx", td.valid.X)
    s_rep = export_ranker(student, out / "student_fp32.onnx", td.valid.X)
    q = quantize_student(s_rep.path, out / "student_int8.onnx", td.train.X, check_X=td.valid.X,
                         check_lists=candidate_lists(td.valid.user_id), teacher_path=t_rep.path, seed=seed)
    sessions = {"student_fp32": ort_session(s_rep.path), "student_int8": ort_session(out / "student_int8.onnx"),
                "teacher_fp32_ort": ort_session(t_rep.path)}
    scores = {"teacher": predict(teacher, td.test.X), **{k: ort_score(s, td.test.X) for k, s in sessions.items()}}
    lists = candidate_lists(td.test.user_id, min_size=5)
    per_list = {k: np.array([ndcg_at_k(td.test.label[i], p[i], 10) for i in lists]) for k, p in scores.items()}
    ok = ~np.isnan(per_list["teacher"])
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, int(ok.sum()), (2000, int(ok.sum())))
    quality = {}
    for k, p in scores.items():
        d = per_list[k][ok]
        rel = d.mean() / per_list["teacher"][ok].mean() - 1
        rel_ci = np.percentile(d[boot].mean(1) / per_list["teacher"][ok][boot].mean(1) - 1, [2.5, 97.5])
        quality[k] = {"auc": auc(td.test.label, p), "logloss": logloss(td.test.label, p),
                      "ndcg@10": grouped_mean(ndcg_at_k, lists, td.test.label, p).value,
                      "ndcg@10_rel_to_teacher": float(rel), "ndcg@10_rel_to_teacher_95ci": [float(x) for x in rel_ci]}

    cand = np.ascontiguousarray(td.test.X[:500])
    timing = {}
    one = {k: ort_session(p, threads=1) for k, p in (("student_int8", out / "student_int8.onnx"), ("student_fp32", s_rep.path),
                                                       ("teacher_fp32_ort", t_rep.path))}
    for k, s in one.items():
        timing[k] = _time_ms(lambda s=s: ort_score(s, cand))
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timing["teacher_torch"] = _time_ms(lambda: predict(teacher, cand))
    finally:
        torch.set_num_threads(prev)
    return {
        "data_dir": str(data_dir), "kind": td.info.kind, "profile": profile, "seed": seed,
        "rows": {s.name: len(s) for s in (td.train, td.valid, td.test)}, "test_lists": len(lists), "test_lists_with_a_positive": int(ok.sum()),
        "seconds": {"training_data": round(t_data, 1), "teacher": round(teacher.fit_info.seconds, 1), "student": round(student.fit_info.seconds, 1)},
        "epochs": {"teacher": [teacher.fit_info.best_epoch, teacher.fit_info.epochs_run], "student": [student.fit_info.best_epoch, student.fit_info.epochs_run]},
        "valid_auc": {"teacher": teacher.fit_info.best_valid_auc, "student": student.fit_info.best_valid_auc},
        "parameters": {"teacher": teacher.n_parameters(), "student": student.n_parameters()},
        "bytes": {"teacher_fp32": t_rep.bytes, "student_fp32": s_rep.bytes, "student_int8": q.int8_bytes,
                  "int8_over_teacher": q.size_ratio_to_teacher},
        "export_max_abs_diff": {"teacher": t_rep.max_abs_diff, "student": s_rep.max_abs_diff},
        "quantization": {"mean_tau_valid": q.mean_tau, "min_tau_valid": q.min_tau, "lists": q.n_lists, "max_abs_score_diff": q.max_abs_score_diff},
        "test": quality,
        "score_500_candidates_ms_median_1_thread": timing,
        "files": str(out),
    }


def _time_ms(fn, repeat: int = 300) -> float:
    import time

    for _ in range(20):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(float(np.median(ts)) * 1000, 3)


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m export.quantize", description="Train teacher + student, export, quantize, print a JSON report.")
    p.add_argument("data_dir")
    p.add_argument("--profile", default="default", choices=("tiny", "small", "default"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the three ONNX files (default: a new temp folder)")
    a = p.parse_args(argv)
    print(json.dumps(_report(a.data_dir, a.profile, a.seed, a.out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
