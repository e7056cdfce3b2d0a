"""ONNX export of the two-tower model's towers, checked against torch before it is kept.

- user tower: inputs ``user_features`` [N, U] float32 (raw, NaN = missing; the columns are
  `TwoTowerModel.user_columns`, also stored in the model's metadata as ``parity.user_columns``)
  and ``history`` [N, L] int64 (vocabulary indices of the user's last engaged items, most
  recent last, 0 = empty; built by `features.item_inputs.history_index`; L is
  ``parity.history_len``; the graph mean-pools, so any L works, but L is what it was trained on);
- item tower: inputs ``item_index``, ``topic``, ``creator_bucket`` [N] int64 and
  ``duration_s`` [N] float32, built by `features.item_inputs.item_tower_inputs`;
- both: output ``embedding`` [N, dim] float32, L2-normalised. Opset 17, dynamic batch axis.

Every export is written to a temporary file, passed through ``onnx.checker.check_model`` and
run in ONNX Runtime on real rows plus the awkward ones (all-NaN users, unknown and
out-of-range items); only if every output is within `ATOL` of torch is it moved into place.
Otherwise `TowerMismatchError` says by how much and where.

Uses the TorchScript exporter (``dynamo=False``): the torch.export-based one needs
onnxscript, which is not a dependency.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from features.item_inputs import ITEM_INPUT_NAMES, VOCAB_FILE, save_vocab
from models.two_tower import TwoTowerModel

__all__ = [
    "OPSET",
    "ATOL",
    "USER_INPUT",
    "HISTORY_INPUT",
    "OUTPUT",
    "TowerExportError",
    "TowerMismatchError",
    "USER_TOWER_FILE",
    "ITEM_TOWER_FILE",
    "export_towers",
    "export_user_tower",
    "export_item_tower",
    "check_user_tower",
    "check_item_tower",
    "user_check_rows",
    "item_check_inputs",
]

OPSET = 17
ATOL = 1e-4
USER_INPUT = "user_features"
HISTORY_INPUT = "history"
OUTPUT = "embedding"
USER_TOWER_FILE = "user_tower.onnx"
ITEM_TOWER_FILE = "item_tower.onnx"


class TowerExportError(RuntimeError):
    """The exported graph is not a valid ONNX model or could not be produced."""


class TowerMismatchError(TowerExportError):
    """ONNX Runtime and torch disagree on the exported tower's outputs."""


def user_check_rows(model: TwoTowerModel, rows: np.ndarray | None = None, history: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(user features, history input) to compare torch and ORT on: real rows (given, else the
    model's training sample, with their histories) plus an all-NaN row, a half-missing row,
    zeros, large and negative values, with empty, one-item, full and out-of-range histories."""
    U, L = len(model.user_columns), model.config.history_len
    if rows is None:
        base, hist = model.sample_user_features, model.sample_history
    else:
        base, hist = rows, history
    base = np.zeros((0, U), dtype=np.float32) if base is None else np.asarray(base, dtype=np.float32)
    if base.ndim != 2 or base.shape[1] != U:
        raise ValueError(f"user check rows must be (N, {U}), got {base.shape}")
    hx = model.history_inputs(None if hist is None else np.asarray(hist)[: len(base)], len(base))
    if len(hx) != len(base):
        raise ValueError(f"{len(base)} user check rows but {len(hx)} histories")
    half = base[:1].copy() if len(base) else np.ones((1, U), dtype=np.float32)
    half[:, ::2] = np.nan
    extra = np.stack([np.full(U, np.nan), np.zeros(U), np.full(U, 1e6), np.full(U, -3.0)]).astype(np.float32)
    n_vocab = len(model.vocab)
    odd = np.zeros((5, L), dtype=np.int64)  # empty (x2), one item, full, out of range
    if L:
        odd[2, -1] = 1
        odd[3, :] = (np.arange(L) % max(n_vocab, 1)) + 1
        odd[4, :] = np.array([n_vocab + 7, -4] * L)[:L]
    X = np.ascontiguousarray(np.concatenate([base, half, extra]), dtype=np.float32)
    return X, np.ascontiguousarray(np.concatenate([hx, odd]), dtype=np.int64)


def item_check_inputs(model: TwoTowerModel) -> dict[str, np.ndarray]:
    """Every vocabulary item, the same items content-only, and unknown/out-of-range inputs."""
    known = model.item_inputs(model.vocab)
    content = model.item_inputs(model.vocab, content_only=True)
    n_vocab = len(model.vocab)
    odd = {
        "item_index": np.array([0, 0, n_vocab + 5, -3, 1], dtype=np.int64),
        "topic": np.array([-1, 10_000, 0, -7, -1], dtype=np.int64),
        "creator_bucket": np.array([0, 10**9, -1, 3, 0], dtype=np.int64),
        "duration_s": np.array([0.0, np.nan, -5.0, 1e7, 30.0], dtype=np.float32),
    }
    return {k: np.ascontiguousarray(np.concatenate([known[k], content[k], odd[k]])) for k in ITEM_INPUT_NAMES}


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _compare(name: str, expected: np.ndarray, got: np.ndarray, atol: float) -> float:
    if got.shape != expected.shape:
        raise TowerMismatchError(f"{name}: ONNX output shape {got.shape}, torch {expected.shape}")
    if not np.isfinite(got).all():
        bad = np.flatnonzero(~np.isfinite(got).all(axis=1))
        raise TowerMismatchError(f"{name}: ONNX output is not finite on rows {bad[:10].tolist()}")
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    worst = float(diff.max()) if diff.size else 0.0
    if not worst <= atol:
        row = int(np.unravel_index(np.argmax(diff), diff.shape)[0])
        raise TowerMismatchError(f"{name}: ONNX Runtime differs from torch by {worst:.3g} (> {atol:g}) "
                                 f"at row {row}; the exported graph does different maths, do not ship it")
    return worst


@torch.no_grad()
def check_user_tower(model: TwoTowerModel, path: str | Path, rows: np.ndarray | None = None, atol: float = ATOL,
                     history: np.ndarray | None = None) -> float:
    """Max |torch - ORT| of the user tower on `user_check_rows`; raises TowerMismatchError."""
    X, Hx = user_check_rows(model, rows, history)
    model.user_tower.eval()
    expected = model.user_tower(torch.from_numpy(X), torch.from_numpy(Hx)).numpy()
    (got,) = _session(Path(path)).run([OUTPUT], {USER_INPUT: X, HISTORY_INPUT: Hx})
    return _compare("user tower", expected, got, atol)


@torch.no_grad()
def check_item_tower(model: TwoTowerModel, path: str | Path, inputs: dict[str, np.ndarray] | None = None, atol: float = ATOL) -> float:
    """Max |torch - ORT| of the item tower on `item_check_inputs` (or ``inputs``)."""
    feeds = item_check_inputs(model) if inputs is None else {k: np.ascontiguousarray(inputs[k]) for k in ITEM_INPUT_NAMES}
    model.item_tower.eval()
    expected = model.item_tower(*(torch.from_numpy(feeds[k]) for k in ITEM_INPUT_NAMES)).numpy()
    (got,) = _session(Path(path)).run([OUTPUT], feeds)
    return _compare("item tower", expected, got, atol)


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], path: Path,
            metadata: dict[str, str], dim: int) -> None:
    module.eval()
    axes = {n: {0: "batch"} for n in [*input_names, OUTPUT]}
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning, UserWarning):  # the legacy exporter's notices
                warnings.simplefilter("ignore", category)
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=[OUTPUT],
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    except Exception as e:  # the exporter raises many types; report them as one named error
        raise TowerExportError(f"torch.onnx.export failed for {type(module).__name__}: {e}") from e
    proto = onnx.load(str(path))
    (out,) = proto.graph.output
    out.type.tensor_type.shape.dim[1].Clear()
    out.type.tensor_type.shape.dim[1].dim_value = dim  # the exporter leaves a symbolic name here
    for k, v in metadata.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise TowerExportError(f"the exported {type(module).__name__} is not a valid ONNX model: {e}") from e
    onnx.save(proto, str(path))


def _metadata(model: TwoTowerModel, tower: str) -> dict[str, str]:
    return {"parity.tower": tower, "parity.dim": str(model.dim), "parity.vocab_size": str(len(model.vocab)),
            "parity.user_columns": json.dumps(model.user_columns),
            "parity.creator_buckets": str(model.config.creator_buckets), "parity.seed": str(model.seed),
            "parity.history_len": str(model.config.history_len)}


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def export_user_tower(model: TwoTowerModel, path: str | Path, rows: np.ndarray | None = None, history: np.ndarray | None = None) -> Path:
    """Export, check (checker + torch vs ORT on real and all-NaN rows, empty and full
    histories) and move into ``path``. ``history``: item ids of ``rows``' histories."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        X, Hx = user_check_rows(model, rows, history)
        if Hx.shape[1] == 0:  # a model without history still takes the input (ignored)
            Hx = np.zeros((len(X), 1), dtype=np.int64)
        _export(model.user_tower, (torch.from_numpy(X[:4]), torch.from_numpy(Hx[:4])), [USER_INPUT, HISTORY_INPUT], tmp,
                _metadata(model, "user"), model.dim)
        check_user_tower(model, tmp, rows, history=history)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_item_tower(model: TwoTowerModel, path: str | Path) -> Path:
    """Export, check (checker + torch vs ORT on every vocabulary item and unknown ones) and move into ``path``."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        feeds = item_check_inputs(model)
        args = tuple(torch.from_numpy(feeds[k][:4]) for k in ITEM_INPUT_NAMES)
        _export(model.item_tower, args, list(ITEM_INPUT_NAMES), tmp, _metadata(model, "item"), model.dim)
        check_item_tower(model, tmp, feeds)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_towers(model: TwoTowerModel, directory: str | Path, user_rows: np.ndarray | None = None,
                  user_history: np.ndarray | None = None) -> dict[str, Path]:
    """Both towers (checked) and the item vocabulary into ``directory``: user_tower.onnx,
    item_tower.onnx, item_ids.npy. Returns the paths by file name."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return {
        USER_TOWER_FILE: export_user_tower(model, d / USER_TOWER_FILE, user_rows, user_history),
        ITEM_TOWER_FILE: export_item_tower(model, d / ITEM_TOWER_FILE),
        VOCAB_FILE: save_vocab(d, model.vocab),
    }
