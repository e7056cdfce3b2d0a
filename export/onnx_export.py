"""Export a ranker (transform + network) to ONNX and prove the file computes what torch computes.

Contract of every exported ranker: opset 17, one input "features" float32 [N, F] (raw ranker
inputs in `features.assemble` column order, NaN = missing), one output "score" float32 [N]
(probability), N dynamic. The column names travel in the model's metadata ("parity.columns")
so a reader can check its input order; the transform statistics are in the graph itself (and
in the release manifest through `FeatureTransform.stats_dict()`).

Export uses the TorchScript-based exporter (`dynamo=False`): the torch.export-based default
needs the `onnxscript` package, which is not a project dependency, and for a static MLP graph
the two produce the same operators. After writing, the file must pass `onnx.checker` (full
check) and agree with torch within `atol` on real rows, on the same rows with NaNs punched in,
on an all-missing row and on a batch of one; otherwise `ExportMismatchError`, and no file is
left at `path`.

torch is imported inside the export function only, so `ort_session` / `ort_score` /
`verification_rows` serve torch-free callers (the quantizer, the server).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

__all__ = [
    "export_ranker",
    "ExportReport",
    "ExportMismatchError",
    "ort_session",
    "ort_score",
    "verification_rows",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OPSET",
]

INPUT_NAME = "features"
OUTPUT_NAME = "score"
OPSET = 17


class ExportMismatchError(RuntimeError):
    """ONNX Runtime's scores differ from torch's beyond the tolerance (or the graph is malformed)."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    bytes: int
    n_rows_checked: int
    n_rows_with_nan: int
    max_abs_diff: float
    opset: int


def ort_session(path: str | os.PathLike[str] | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads, sequential execution, no spinning."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])


def ort_score(session: ort.InferenceSession, X: np.ndarray) -> np.ndarray:
    """Scores (N,) float32 of raw inputs (N, F)."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(X, dtype=np.float32)})[0]


def verification_rows(sample_X: np.ndarray, *, max_rows: int = 2048, nan_rows: int = 256, nan_share: float = 0.3,
                      seed: int = 0) -> np.ndarray:
    """Real rows, the same rows with ~nan_share of entries set missing, one all-NaN row, one zero row."""
    X = np.asarray(sample_X, dtype=np.float32)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"sample_X must be a non-empty 2-D array, got shape {X.shape}")
    rng = np.random.default_rng(seed)
    real = X[np.sort(rng.choice(len(X), size=min(max_rows, len(X)), replace=False))]
    punched = real[: min(nan_rows, len(real))].copy()
    punched[rng.random(punched.shape) < nan_share] = np.nan
    extra = np.stack([np.full(X.shape[1], np.nan, dtype=np.float32), np.zeros(X.shape[1], dtype=np.float32)])
    return np.concatenate([real, punched, extra])


def _torch_scores(model, X: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()


def export_ranker(model: "torch.nn.Module", path: str | os.PathLike[str], sample_X: np.ndarray, *, atol: float = 1e-4,
                  metadata: Mapping[str, str] | None = None, seed: int = 0) -> ExportReport:
    """Export `model` (raw inputs → probability) to `path`, check it, and compare with torch."""
    import torch

    path = Path(path)
    X = verification_rows(sample_X, seed=seed)
    was_training = model.training
    model.eval()
    try:
        expected = _torch_scores(model, X)
        if expected.shape != (len(X),):
            raise ExportMismatchError(f"the model must return scores of shape (N,), got {expected.shape}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, see above
                torch.onnx.export(
                    model, (torch.from_numpy(X[:4]),), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    opset_version=OPSET, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True, dynamo=False,
                )
            proto = onnx.load(tmp)
            meta = dict(_default_metadata(model))
            meta.update(metadata or {})
            for k, v in meta.items():
                proto.metadata_props.add(key=k, value=v)
            proto.producer_name = "parity"
            onnx.save(proto, tmp)
            try:
                onnx.checker.check_model(tmp, full_check=True)
            except onnx.checker.ValidationError as e:
                raise ExportMismatchError(f"onnx.checker rejected the exported graph: {e}") from e
            sess = ort_session(tmp)
            _check_io(sess, X.shape[1])
            got = ort_score(sess, X)
            diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
            bad = ~(diff <= atol)  # NaN counts as bad
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ExportMismatchError(
                    f"ONNX Runtime and torch disagree on {int(bad.sum())} of {len(X)} rows (atol {atol}); "
                    f"first: row {i} torch={expected[i]!r} ort={got[i]!r} (row has {int(np.isnan(X[i]).sum())} NaN inputs)")
            one = ort_score(sess, X[:1])
            if one.shape != (1,) or not abs(float(one[0]) - float(expected[0])) <= atol:
                raise ExportMismatchError(f"batch of one scores {one!r}, expected [{expected[0]!r}]")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        model.train(was_training)
    n_nan = int(np.isnan(X).any(axis=1).sum())
    return ExportReport(path, path.stat().st_size, len(X), n_nan, float(diff.max()), OPSET)


def _default_metadata(model) -> dict[str, str]:
    meta = {"parity.model": type(model).__name__}
    transform = getattr(model, "transform", None)
    if transform is not None and hasattr(transform, "stats_dict"):
        # column order only: the full statistics go to the release manifest (transform.stats_dict())
        meta["parity.columns"] = json.dumps(list(transform.stats_dict()["columns"]))
    return meta


def _check_io(sess: ort.InferenceSession, n_features: int) -> None:
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    if inp.name != INPUT_NAME or inp.type != "tensor(float)" or len(inp.shape) != 2 or inp.shape[1] != n_features or isinstance(inp.shape[0], int):
        raise ExportMismatchError(f"input must be {INPUT_NAME!r} float32 [batch, {n_features}], got {inp.name!r} {inp.type} {inp.shape}")
    if out.name != OUTPUT_NAME or out.type != "tensor(float)" or len(out.shape) != 1:
        raise ExportMismatchError(f"output must be {OUTPUT_NAME!r} float32 [batch], got {out.name!r} {out.type} {out.shape}")
