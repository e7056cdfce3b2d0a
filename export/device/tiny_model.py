"""Build the device bundle's tiny ranker from a release: distil, export, quantise, convert, check.

Steps (each checked; nothing is returned unless all pass):
1. rows: `export.device.training_rows.device_training_data` (device inputs, labels, the
   release teacher's scores; the training-data fingerprint is checked for labelled rows);
2. distil one tiny MLP per candidate width and label weight (`WIDTHS` x `ALPHAS`, listwise on
   candidate lists) and keep the best validation score (mean within-list AUC of held-out
   users' lists: what NDCG rewards). Chosen this way on the simulator at seeds 0 and 11 and on
   MovieLens: a label weight of 0.1 (the server student's) scored 0.75/0.77/0.76 there, 0.6
   scored 0.80/0.82/0.76, 1.0 (no teacher) about the same as 0.6-0.9; the wider net +0.00-0.01;
3. fp32 ONNX with `export.onnx_export.export_ranker` (torch vs ONNX Runtime within 1e-4);
4. int8 QDQ with `export.quantize.quantize_student`: weights per channel (they are tiny, and a
   per-row scale costs nothing), activations QInt8 (the docstring's choice for ARM, which is
   what phones run), gated on mean Kendall tau >= 0.95 against fp32 over validation lists;
5. ORT format with onnxruntime's own converter (`onnxruntime.tools.convert_onnx_models_to_ort`,
   "Fixed" optimisation style as its guide recommends without NNAPI/CoreML, target `arm`);
6. checks: the .ort scores equal the int8 .onnx scores (1e-6) on validation rows loaded with
   the same int8 setting the converter used, both rank like fp32 (tau), int8 ONNX <= 100 KB.

torch is imported here and in `models.device_ranker` only.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.device.inputs import stat_columns
from export.device.training_rows import DeviceTrainingData, device_training_data
from export.onnx_export import export_ranker, ort_score, ort_session
from export.quantize import QuantizationError, quantize_student, ranking_agreement
from features.session import SessionSpec, session_spec
from features.item_item import SparseItemItem
from models.metrics import auc, candidate_lists, within_list_auc, within_list_ndcg

__all__ = ["DeviceModel", "DeviceModelChecks", "DeviceModelError", "build_device_model", "MAX_INT8_BYTES", "WIDTHS", "ALPHAS",
           "device_session"]

MAX_INT8_BYTES = 100 * 1024
WIDTHS: tuple[tuple[int, ...], ...] = ((64, 32), (128, 64))
ALPHAS: tuple[float, ...] = (0.6, 0.9)  # weight of the list's own labels; the rest on the teacher's list distribution
ORT_TARGET = "arm"
MIN_TAU = 0.95


class DeviceModelError(RuntimeError):
    """The tiny ranker failed a check (size, ORT vs ONNX, ranking agreement)."""


@dataclass(frozen=True)
class DeviceModelChecks:
    ort_vs_onnx_max_abs: float
    tau_int8_vs_fp32: float  # mean Kendall tau over validation lists
    tau_ort_vs_fp32: float
    min_tau: float
    n_lists: int
    export_max_abs_diff: float  # torch vs fp32 ONNX


@dataclass(frozen=True)
class DeviceModel:
    release_id: str
    kind: str
    fp32_path: Path
    int8_path: Path
    ort_path: Path
    bytes: dict[str, int]  # fp32, int8, ort
    columns: tuple[str, ...]
    session: SessionSpec
    stat_columns: tuple[str, ...]
    dim: int
    hidden: tuple[int, ...]
    checks: DeviceModelChecks
    valid: dict[str, float]  # validation metrics (auc of the chosen model, per width tried, teacher)
    rows: dict[str, int]
    seconds: float
    tried: list[dict] = field(default_factory=list)
    item_item: SparseItemItem | None = None  # behind the `item.item_item` column: its neighbours ship in the item chunks

    def item_item_spec(self) -> dict | None:
        """BUNDLE_FORMAT.md's `model.item_item`: how a device builds the history it scores."""
        if self.item_item is None:
            return None
        from features.history import ENGAGEMENT

        types, min_value = ENGAGEMENT["movielens" if self.kind == "movielens" else "simulated"]
        return {"k": int(self.item_item.nbr_id.shape[1]), "history_len": int(self.item_item.history_len),
                "engagement": {"types": list(types), "min_value": min_value}}

    def to_json(self) -> dict:
        d = asdict(self)
        d["item_item"] = self.item_item_spec()
        for k in ("fp32_path", "int8_path", "ort_path"):
            d[k] = str(d[k])
        d["session"] = self.session.to_json()
        return d


def device_session(path: str | Path) -> ort.InferenceSession:
    """A CPU session for the device model files, with the int8 setting the ORT file was converted
    with (`session.qdqisint8allowed` = 1 for arm), so .onnx and .ort run the same kernels."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.qdqisint8allowed", "1" if ORT_TARGET == "arm" else "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _lists(data: DeviceTrainingData) -> list[np.ndarray]:
    v = data.valid
    return candidate_lists(v.user_id, v.ts, bucket_ms=3_600_000 if data.rows == "labelled" else None, min_size=3)


def convert_to_ort(onnx_path: Path, ort_path: Path) -> Path:
    """onnxruntime's converter (Fixed style, ORT_TARGET); its stdout chatter is swallowed."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(prefix="parity-ort-") as tmp:
        src = Path(tmp) / "in" / "model.onnx"
        src.parent.mkdir()
        shutil.copyfile(onnx_path, src)
        out = Path(tmp) / "out"
        with contextlib.redirect_stdout(io.StringIO()):
            # its loggers say INFO for every file written; ours are enough
            for name in ("ort_format_model.utils", "convert_onnx_models_to_ort"):
                logging.getLogger(name).setLevel(logging.WARNING)
            convert_onnx_models_to_ort(src, output_dir=out, optimization_styles=[OptimizationStyle.Fixed], target_platform=ORT_TARGET)
        got = sorted(out.glob("*.ort"))
        if len(got) != 1:
            raise DeviceModelError(f"the ORT converter wrote {[p.name for p in out.iterdir()]}, expected one .ort file")
        shutil.copyfile(got[0], ort_path)
    return ort_path


def build_device_model(release_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *, seed: int = 0,
                       profile: str | None = None, widths: tuple[tuple[int, ...], ...] | None = None,
                       config=None, alphas: tuple[float, ...] | None = None) -> DeviceModel:
    """The tiny ranker of the release at `release_dir`, written to `out_dir` (ranker_{fp32,int8}.onnx,
    ranker_int8.ort, device_model.json). `profile` "tiny" trains a single 16-unit layer for a few
    epochs (tests); None/"small"/"default" choose among `WIDTHS` on validation AUC."""
    from models.device_ranker import DeviceRankerConfig, train_device_ranker

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = device_training_data(release_dir, data_dir, seed=seed)
    base = config or (DeviceRankerConfig(max_epochs=4, patience=2) if profile == "tiny" else DeviceRankerConfig())
    widths = widths or (((16,),) if profile == "tiny" else WIDTHS)
    tr, va = data.train, data.valid
    if len(tr) == 0 or len(va) == 0 or len(np.unique(tr.label)) < 2:
        raise DeviceModelError(f"too few rows to train the device ranker (train {len(tr)}, valid {len(va)})")
    best, tried = None, []
    alphas = alphas or ((base.alpha,) if profile == "tiny" or config is not None else ALPHAS)
    for h, alpha in [(h, a) for h in widths for a in alphas]:
        cfg = base.replace(hidden=tuple(h), alpha=alpha, loss="listwise" if data.rows == "candidates" else "pointwise")
        m = train_device_ranker(tr.X, tr.label, tr.teacher, va.X, va.label, data.columns, cfg, seed,
                                groups=tr.user_id, groups_valid=va.user_id)
        tried.append({"hidden": list(h), "loss": cfg.loss, "valid_metric": m.fit_info.best_valid_auc, "epochs": m.fit_info.epochs_run,
                      "alpha": cfg.alpha, "temperature": cfg.temperature})
        if best is None or m.fit_info.best_valid_auc > best.fit_info.best_valid_auc:
            best = m
    fp32, int8, ortp = out / "ranker_fp32.onnx", out / "ranker_int8.onnx", out / "ranker_int8.ort"
    meta = {"parity.device.release_id": data.release_id, "parity.device.kind": data.kind}
    rep = export_ranker(best, fp32, va.X, metadata=meta, seed=seed)
    lists = _lists(data)
    if not lists:
        raise DeviceModelError("no validation list of 3+ rows to check the int8 ranking against fp32")
    try:
        quantize_student(fp32, int8, tr.X, check_X=va.X, check_lists=lists, min_tau=MIN_TAU, per_channel=True,
                         activation_type=_qint8(), seed=seed)
    except QuantizationError as e:
        raise DeviceModelError(f"int8 quantisation of the device ranker failed its gate: {e}") from e
    convert_to_ort(int8, ortp)
    s32 = ort_score(ort_session(fp32), va.X)
    s8 = ort_score(device_session(int8), va.X)
    so = ort_score(device_session(ortp), va.X)
    diff = float(np.max(np.abs(so.astype(np.float64) - s8))) if len(va.X) else 0.0
    if not diff <= 1e-6:
        raise DeviceModelError(f"the .ort model scores differ from the int8 .onnx by up to {diff:g} (> 1e-6)")
    tau8, _, n_lists = ranking_agreement(s32, s8, lists)
    tau_o, _, _ = ranking_agreement(s32, so, lists)
    if not (tau8 >= MIN_TAU and tau_o >= MIN_TAU):
        raise DeviceModelError(f"int8/ORT ranking disagrees with fp32: tau {tau8:.4f} / {tau_o:.4f} < {MIN_TAU}")
    sizes = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size, "ort": ortp.stat().st_size}
    if sizes["int8"] > MAX_INT8_BYTES:
        for p in (fp32, int8, ortp):
            p.unlink(missing_ok=True)
        raise DeviceModelError(f"the int8 device ranker is {sizes['int8']} bytes > {MAX_INT8_BYTES}: choose a smaller width")
    checks = DeviceModelChecks(diff, tau8, tau_o, MIN_TAU, n_lists, rep.max_abs_diff)
    valid = {"auc_fp32": auc(va.label, s32), "auc_int8": auc(va.label, s8), "auc_teacher": auc(va.label, va.teacher),
             "auc_torch_best_epoch": best.fit_info.best_valid_auc,
             "list_auc_int8": within_list_auc(s8, va.label, va.user_id), "list_auc_teacher": within_list_auc(va.teacher, va.label, va.user_id),
             "list_auc_dot": within_list_auc(va.X[:, 0], va.label, va.user_id),
             "list_ndcg10_int8": within_list_ndcg(s8, va.label, va.user_id), "list_ndcg10_teacher": within_list_ndcg(va.teacher, va.label, va.user_id),
             "list_ndcg10_dot": within_list_ndcg(va.X[:, 0], va.label, va.user_id)}
    model = DeviceModel(data.release_id, data.kind, fp32, int8, ortp, sizes, data.columns, session_spec(data.kind),
                        stat_columns(data.kind), data.dim, tuple(best.config.student_hidden), checks, valid,
                        {"train": len(tr), "valid": len(va)}, time.perf_counter() - t0, tried, data.item_item)
    (out / "device_model.json").write_text(json.dumps(model.to_json(), indent=1))
    return model


def _qint8():
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8
