"""The tiny ranker: one onnxruntime session on the bundle's `.ort` model, one thread."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from mobile_sdk.errors import BundleError

INPUT = "features"
OUTPUT = "score"


class Ranker:
    """`score(x)`: float32 [N, F] -> float32 [N], in one call."""

    def __init__(self, model_bytes: bytes, n_features: int, *, ort_format: bool = True) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if ort_format:
            so.add_session_config_entry("session.load_model_format", "ORT")
        try:
            self._session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad model
            raise BundleError(f"the ranker model does not load: {exc}") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if [i.name for i in inputs] != [INPUT] or OUTPUT not in [o.name for o in outputs]:
            raise BundleError(f"the ranker must take {INPUT!r} and give {OUTPUT!r}, "
                              f"got {[i.name for i in inputs]} -> {[o.name for o in outputs]}")
        shape = inputs[0].shape
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != n_features):
            raise BundleError(f"the ranker's input is {shape}, model.inputs has {n_features} columns")
        self.n_features = n_features

    def score(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        out = self._session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32).reshape(x.shape[0])
