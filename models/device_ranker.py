"""The on-device tiny ranker: a small MLP distilled from a release's teacher on device inputs.

Same machinery as the server's student (`models.ranker`: `StudentRanker`, the fitted
`FeatureTransform` as first module), but the inputs are the device columns
(`export.device.inputs`) and the teacher's scores are its probabilities on its OWN inputs for
the same rows (precomputed with the release's ONNX teacher). Two losses:

- listwise (default; candidate lists, the only thing a device ranks): per list, softmax over
  the list's scores, (1 - alpha) T^2 KL(teacher's list distribution || student's) + alpha *
  cross-entropy with the list's positives; early stopping on the validation lists' mean
  NDCG@10, the figure the device path is judged by (stopping and choosing on within-list AUC,
  which weighs the whole list, gave 0.92-1.24x the server's two-stage NDCG@10 over 3
  distillation seeds x 3 data sets; on NDCG@10, 0.95-1.34x); Pointwise BCE against teacher probabilities was dominated by differences
  between users (how active each is), which device inputs barely see: measured NDCG@10 on the
  simulator 0.057 pointwise vs 0.093 listwise (seed 0), below the two-tower's own order before;
- pointwise: alpha * BCE(s, y) + (1 - alpha) * BCE(s / T, sigmoid(logit(p_teacher) / T)),
  for labelled rows without lists.

A share `blank_embedding` (10 %) of the training rows (listwise: of the lists) get NaN in every
`emb.*` column before the transform is fitted: the transform only makes a missing flag for
columns missing in training, and a device without a user file must still rank (popular/newest).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from models.metrics import list_index as _list_index, within_list_ndcg
from models.ranker import RankerConfig, StudentRanker, _fit, _Threads, _transform
from models.transforms import FeatureTransform

__all__ = ["DeviceRankerConfig", "train_device_ranker", "blank_embeddings"]


@dataclass(frozen=True)
class DeviceRankerConfig:
    hidden: tuple[int, ...] = (32, 16)
    alpha: float = 0.6  # weight of the hard labels; 1 - alpha on the teacher's soft targets (chosen on validation lists)
    temperature: float = 1.0
    blank_embedding: float = 0.1  # share of training rows with every emb.* column NaN
    lr: float = 3e-3
    batch_size: int = 512
    max_epochs: int = 20
    patience: int = 3
    weight_decay: float = 1e-6
    max_train_rows: int | None = None  # keep the most recent training rows
    threads: int = 1
    loss: str = "listwise"  # "listwise": softmax over each candidate list; "pointwise": BCE per row
    lists_per_batch: int = 16

    def __post_init__(self) -> None:
        if not self.hidden or not all(isinstance(h, int) and h > 0 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty tuple of positive ints, got {self.hidden!r}")
        if self.loss not in ("listwise", "pointwise"):
            raise ValueError(f"loss must be 'listwise' or 'pointwise', got {self.loss!r}")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0 or not 0.0 <= self.blank_embedding < 1.0:
            raise ValueError("alpha in [0, 1], temperature > 0, blank_embedding in [0, 1)")

    def ranker_config(self) -> RankerConfig:
        return RankerConfig(profile="custom-device", student_hidden=tuple(self.hidden), student_lr=self.lr, alpha=self.alpha,
                            temperature=self.temperature, batch_size=self.batch_size, max_epochs=self.max_epochs,
                            patience=self.patience, weight_decay=self.weight_decay, threads=self.threads)

    def replace(self, **changes) -> "DeviceRankerConfig":
        return dataclasses.replace(self, **changes)


def blank_embeddings(X: np.ndarray, columns: tuple[str, ...], share: float, rng: np.random.Generator,
                     rows: np.ndarray | None = None) -> np.ndarray:
    """A copy of X with every `emb.*` column NaN on ~`share` of the rows (or on `rows`)."""
    X = np.array(X, dtype=np.float32, copy=True)
    emb = [j for j, c in enumerate(columns) if c.startswith("emb.")]
    rows = np.flatnonzero(rng.random(len(X)) < share) if rows is None else rows
    if emb and len(rows):
        X[np.ix_(rows, emb)] = np.nan
    return X


def _soft(p: np.ndarray, T: float) -> torch.Tensor:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return torch.from_numpy((1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p)) / T))).astype(np.float32))


def train_device_ranker(X: np.ndarray, y: np.ndarray, teacher_p: np.ndarray, X_valid: np.ndarray, y_valid: np.ndarray,
                        columns: tuple[str, ...], cfg: DeviceRankerConfig | None = None, seed: int = 0, *,
                        groups: np.ndarray | None = None, groups_valid: np.ndarray | None = None) -> StudentRanker:
    """Distil the tiny ranker (raw device inputs → probability); `.fit_info` says how it went.
    `groups` / `groups_valid`: the candidate list of each row (rows of a list contiguous), needed
    by the listwise loss, whose early stopping reads the validation lists' mean within-list AUC."""
    t0 = time.perf_counter()
    cfg = cfg or DeviceRankerConfig()
    listwise = cfg.loss == "listwise"
    if listwise and (groups is None or groups_valid is None):
        raise ValueError("the listwise loss needs the candidate list of every row (groups, groups_valid)")
    X, y, teacher_p = np.asarray(X, np.float32), np.asarray(y, np.float32), np.asarray(teacher_p)
    if X.shape[1] != len(columns) or np.asarray(X_valid).shape[1] != len(columns):
        raise ValueError(f"X has {X.shape[1]} columns, valid {np.asarray(X_valid).shape[1]}, names {len(columns)}")
    if not (len(X) == len(y) == len(teacher_p)) or len(X) == 0 or len(X_valid) == 0:
        raise ValueError("need non-empty training and validation rows with one label and one teacher score each")
    if not listwise and cfg.max_train_rows is not None and len(y) > cfg.max_train_rows:
        X, y, teacher_p = X[-cfg.max_train_rows:], y[-cfg.max_train_rows:], teacher_p[-cfg.max_train_rows:]
    rcfg = cfg.ranker_config()
    rng = np.random.default_rng(seed)
    T, alpha = cfg.temperature, cfg.alpha
    if listwise:  # blank whole lists: a device without a user file ranks a list with no embeddings at all
        idx = _list_index(groups)
        blank = idx[rng.random(len(idx)) < cfg.blank_embedding]
        X = blank_embeddings(X, tuple(columns), 1.0, rng, rows=blank[blank >= 0])
        rcfg = dataclasses.replace(rcfg, batch_size=cfg.lists_per_batch)
    else:
        X = blank_embeddings(X, tuple(columns), cfg.blank_embedding, rng)
    with _Threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transform = FeatureTransform.fit(X, columns, z_max=rcfg.z_max)
        model = StudentRanker(transform, rcfg)
        Ztr, Zva = _transform(transform, X), _transform(transform, X_valid)
        ytr = torch.from_numpy(y)
        if listwise:
            I, t_logit = torch.from_numpy(idx), _logit(teacher_p)
            loss = _listwise_loss(model, I, ytr, t_logit, alpha, T)
            info = _fit(model, Ztr, len(idx), loss, Zva, np.asarray(y_valid), cfg.lr, rcfg, seed,
                        valid_score=lambda s: within_list_ndcg(s, np.asarray(y_valid), groups_valid))
        else:
            soft = _soft(teacher_p, T)

            def loss(b, Z, _rng):
                s = model.head(Z[b])
                out = alpha * F.binary_cross_entropy_with_logits(s, ytr[b])
                if alpha < 1.0:
                    out = out + (1 - alpha) * F.binary_cross_entropy_with_logits(s / T, soft[b])
                return out

            info = _fit(model, Ztr, len(y), loss, Zva, np.asarray(y_valid), cfg.lr, rcfg, seed)
        model.fit_info = dataclasses.replace(info, seconds=time.perf_counter() - t0)
    return model


def _logit(p: np.ndarray) -> torch.Tensor:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return torch.from_numpy((np.log(p) - np.log1p(-p)).astype(np.float32))


def _listwise_loss(model: StudentRanker, I: torch.Tensor, y: torch.Tensor, t_logit: torch.Tensor, alpha: float, T: float):
    """Per batch of lists (rows of `I`, -1 padded): (1 - alpha) T^2 KL(softmax(teacher / T) ||
    softmax(student / T)) + alpha * cross-entropy of softmax(student) with the list's positives."""

    def loss(b, Z, _rng):
        bi = I[b]
        mask = bi >= 0
        flat = bi.clamp(min=0)
        s = model.head(Z[flat.reshape(-1)]).reshape(flat.shape)
        neg_inf = torch.finfo(s.dtype).min
        log_ps = torch.log_softmax(torch.where(mask, s / T, neg_inf), dim=1)
        pt = torch.softmax(torch.where(mask, t_logit[flat] / T, neg_inf), dim=1)
        kl = (pt * (torch.log(pt.clamp_min(1e-12)) - log_ps)).where(mask, 0.0).sum(1).mean()
        yy = torch.where(mask, y[flat], 0.0)
        has = yy.sum(1) > 0
        if not has.any():
            return (1 - alpha) * T * T * kl
        log_p1 = torch.log_softmax(torch.where(mask, s, neg_inf), dim=1)
        ce = -(yy[has] / yy[has].sum(1, keepdim=True) * log_p1[has].where(mask[has], 0.0)).sum(1).mean()
        return alpha * ce + (1 - alpha) * T * T * kl
    return loss
