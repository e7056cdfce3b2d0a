"""Teacher and student rankers: training, distillation, prediction.

Both models take the raw ranker inputs (float32 (N, F), NaN = missing; see
`features.assemble`) and return the click/watch probability (N,). The fitted
`FeatureTransform` is the first module of each, so the exported ONNX graph holds the whole
maths from raw numbers to score.

- Teacher: DCN-v2 (Wang et al., 2021), parallel form: a cross network
  x_{l+1} = x_0 * (W_l x_l + b_l) + x_l  (W_l full-rank d×d, or low-rank U_l V_l)
  beside a deep ReLU MLP; both outputs concatenated into a linear logit.
- Student: a small ReLU MLP (e.g. 32-16) on the same transformed inputs, distilled from the
  teacher with  alpha * BCE(s, y) + (1 - alpha) * BCE(s / T, sigmoid(t / T)),  optionally on
  extra augmented rows (training rows with noise in normalised space) that carry only the
  soft target.

Training: Adam, mini-batches, early stopping on validation AUC (the best epoch's weights are
kept). Everything random draws from the seed (torch RNG forked, numpy Generator), so the same
data, config and seed give identical weights on the same machine and thread count (results
differ in the last bits between 1 and 2 threads). The transform is fitted once and the
networks train on the transformed matrix (the transform has no trainable parameters).

Threads: training runs with `cfg.threads` torch threads (restored afterwards). The default is
1: on the 2-core build machine, shared with other jobs, the default teacher on MovieLens took
2.5 s/epoch with 1 thread and 4.2-11.7 s/epoch with 2 (OpenMP threads wait on a core another
process holds; these matrices are too small to gain from a second thread).

Distillation defaults (alpha 0.1, T 1, student 32-16) were chosen on validation NDCG@10 and
the student-teacher Kendall tau on the simulated data and MovieLens 100K: alpha 0.3 / T 2
left the student 2 % below the teacher's NDCG@10 on MovieLens; a wider student (64-32), T 2
or noisy extra rows (augment_ratio 1) did not do better than alpha 0.1 / T 1 within the
noise of either data set.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.metrics import auc
from models.transforms import FeatureTransform

__all__ = [
    "RankerConfig",
    "FitInfo",
    "TeacherRanker",
    "StudentRanker",
    "train_teacher",
    "train_student",
    "predict",
    "save_ranker",
    "load_ranker",
    "PROFILES",
]

PROFILES = ("tiny", "small", "default")


@dataclass(frozen=True)
class RankerConfig:
    """Architecture and training settings of the teacher and the student of one profile."""

    profile: str = "default"
    z_max: float = 8.0  # bound of the transform's normalised values (see models.transforms)
    # teacher: DCN-v2, cross network in parallel with a deep MLP
    cross_layers: int = 3
    cross_rank: int | None = None  # None: full-rank W (d×d); else low-rank U (d×r) V (r×d)
    deep_hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.1
    teacher_lr: float = 1e-3
    # student and distillation
    student_hidden: tuple[int, ...] = (32, 16)
    student_lr: float = 3e-3
    alpha: float = 0.1  # weight of the hard-label BCE; 1 - alpha on the teacher's soft targets
    temperature: float = 1.0  # tuned on validation NDCG@10 (see the module docstring)
    augment_ratio: float = 0.0  # extra soft-target-only rows per epoch, as a share of training rows
    augment_noise: float = 0.3  # std of the gaussian noise added to normalised values of those rows
    # optimisation
    batch_size: int = 512
    max_epochs: int = 30
    patience: int = 4  # epochs without a better validation AUC before stopping
    weight_decay: float = 1e-6
    # keep the most recent rows (tiny profile). Not the default profile's: on the serving study's 1M-event simulated
    # log (2.7M candidate-list training rows, an uncapped release 22 min) a 1M cap lowered the validation lists'
    # NDCG@10 0.1834 -> 0.1755 without the trend inputs, 0.1793 -> 0.1768 with, and int8 test AUC 0.8240 -> 0.8122
    max_train_rows: int | None = None
    threads: int = 1  # torch intra-op threads while training; see the module docstring

    def __post_init__(self) -> None:
        if self.profile not in PROFILES and not self.profile.startswith("custom"):
            raise ValueError(f"profile must be one of {PROFILES} (or 'custom...'), got {self.profile!r}")
        for name in ("cross_layers", "batch_size", "max_epochs", "patience", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < (0 if name == "cross_layers" else 1):
                raise ValueError(f"{name} out of range: {v}")
        if self.cross_rank is not None and self.cross_rank < 1:
            raise ValueError(f"cross_rank must be None or >= 1, got {self.cross_rank}")
        for name in ("deep_hidden", "student_hidden"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not all(isinstance(h, int) and h > 0 for h in v):
                raise TypeError(f"{name} must be a tuple of positive ints, got {v!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.z_max > 0:
            raise ValueError(f"z_max must be > 0, got {self.z_max}")
        if self.augment_ratio < 0 or self.augment_noise < 0:
            raise ValueError("augment_ratio and augment_noise must be >= 0")
        if self.max_train_rows is not None and self.max_train_rows < 1:
            raise ValueError(f"max_train_rows must be None or >= 1, got {self.max_train_rows}")

    @classmethod
    def for_profile(cls, profile: str) -> "RankerConfig":
        """tiny: seconds, for tests; small: a quick look; default: the release models."""
        if profile == "tiny":
            return cls(profile="tiny", cross_layers=2, cross_rank=None, deep_hidden=(64, 32), dropout=0.0,
                       student_hidden=(16,), batch_size=256, max_epochs=8, patience=3, teacher_lr=3e-3,
                       student_lr=5e-3, max_train_rows=20_000)
        if profile == "small":
            return cls(profile="small", cross_layers=2, cross_rank=None, deep_hidden=(128, 64), dropout=0.1,
                       student_hidden=(32,), max_epochs=15, patience=3)
        if profile == "default":
            return cls(profile="default")
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")

    def replace(self, **changes) -> "RankerConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FitInfo:
    """How a training run went (kept on the model as `.fit_info`)."""

    epochs_run: int
    best_epoch: int  # 1-based
    best_valid_auc: float
    seconds: float  # the whole train_* call
    valid_auc_history: tuple[float, ...]
    seed: int
    n_train_rows: int


class _CrossNetwork(nn.Module):
    def __init__(self, d: int, layers: int, rank: int | None) -> None:
        super().__init__()
        if rank is None or rank >= d:
            self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(layers)])
        else:
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, d)) for _ in range(layers)])

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


def _mlp(d_in: int, hidden: tuple[int, ...], dropout: float) -> tuple[nn.Sequential, int]:
    mods: list[nn.Module] = []
    for h in hidden:
        mods += [nn.Linear(d_in, h), nn.ReLU()]
        if dropout > 0:
            mods.append(nn.Dropout(dropout))
        d_in = h
    return nn.Sequential(*mods), d_in


class _Ranker(nn.Module):
    transform: FeatureTransform
    fit_info: FitInfo | None = None

    def head(self, z: torch.Tensor) -> torch.Tensor:  # transformed inputs -> logit (N,)
        raise NotImplementedError

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.transform(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw float32 inputs (N, F), NaN = missing → probability (N,), exported as "score"."""
        return torch.sigmoid(self.logit(x))

    @property
    def columns(self) -> tuple[str, ...]:
        return self.transform.columns

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class TeacherRanker(_Ranker):
    def __init__(self, transform: FeatureTransform, cfg: RankerConfig) -> None:
        super().__init__()
        self.config = cfg
        d = transform.out_features
        self.transform = transform
        self.cross = _CrossNetwork(d, cfg.cross_layers, cfg.cross_rank)
        self.deep, d_deep = _mlp(d, cfg.deep_hidden, cfg.dropout)
        self.out = nn.Linear(d + d_deep, 1)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.cross(z), self.deep(z)], dim=1)).squeeze(-1)


class StudentRanker(_Ranker):
    def __init__(self, transform: FeatureTransform, cfg: RankerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transform = transform
        self.mlp, d = _mlp(transform.out_features, cfg.student_hidden, 0.0)
        self.out = nn.Linear(d, 1)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(z)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# training


def _train_rows(td, cfg: RankerConfig) -> tuple[np.ndarray, np.ndarray]:
    X, y = td.train.X, td.train.label
    if cfg.max_train_rows is not None and len(y) > cfg.max_train_rows:
        X, y = X[-cfg.max_train_rows:], y[-cfg.max_train_rows:]  # rows are in time order: keep the most recent
    return X, y


def _check_data(td) -> None:
    for s in (td.train, td.valid):
        if len(s) == 0:
            raise ValueError(f"the {s.name} split is empty: need training and validation rows")
    if td.train.X.shape[1] != len(td.columns):
        raise ValueError(f"X has {td.train.X.shape[1]} columns but the data names {len(td.columns)}")
    if len(np.unique(td.train.label)) < 2:
        raise ValueError("the training labels have one class only")


@torch.no_grad()
def _transform(transform: FeatureTransform, X: np.ndarray) -> torch.Tensor:
    return transform(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))


@torch.no_grad()
def _head_logits(model: _Ranker, Z: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model.head(Z[i:i + batch]) for i in range(0, len(Z), batch)]) if len(Z) else torch.zeros(0)
    model.train(was)
    return out


def _valid_auc(model: _Ranker, Zva: torch.Tensor, yva: np.ndarray) -> float:
    a = auc(yva, _head_logits(model, Zva).numpy())
    return 0.5 if np.isnan(a) else a  # a one-class validation split cannot rank epochs


BatchLoss = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], torch.Tensor]


def _fit(model: _Ranker, Ztr: torch.Tensor, n_rows: int, batch_loss: BatchLoss, Zva: torch.Tensor, yva: np.ndarray,
         lr: float, cfg: RankerConfig, seed: int, valid_score: Callable[[np.ndarray], float] | None = None,
         epochs: int | None = None) -> FitInfo:
    """Mini-batch Adam on model.head; keeps the weights of the best validation epoch (AUC, or
    `valid_score(validation logits)`). `n_rows` is what batches index: rows, or lists for a
    listwise loss (`batch_loss` gets the indices of a batch). `epochs`: a refit, exactly that
    many epochs and the last weights kept (the count was chosen on validation before)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("transform.")], lr=lr,
                           weight_decay=cfg.weight_decay)
    best_auc, best_epoch, best_state, history, bad = -1.0, 0, None, [], 0
    for epoch in range(1, (epochs or cfg.max_epochs) + 1):
        model.train()
        perm = torch.from_numpy(rng.permutation(n_rows))
        for i in range(0, n_rows, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(idx, Ztr, rng)
            loss.backward()
            opt.step()
        if epochs is not None:
            continue
        a = _valid_auc(model, Zva, yva) if valid_score is None else valid_score(_head_logits(model, Zva).numpy())
        history.append(a)
        if a > best_auc:
            best_auc, best_epoch, bad = a, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if epochs is not None:
        model.eval()
        return FitInfo(epochs, epochs, float("nan"), time.perf_counter() - t0, (), seed, n_rows)
    model.load_state_dict(best_state)
    model.eval()
    return FitInfo(len(history), best_epoch, best_auc, time.perf_counter() - t0, tuple(history), seed, n_rows)


class _Threads:
    def __init__(self, n: int) -> None:
        self.n, self.prev = n, None

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


def train_teacher(td, cfg: RankerConfig | None = None, seed: int = 0, *, epochs: int | None = None) -> TeacherRanker:
    """Fit the transform on the training rows, then the DCN-v2 teacher with BCE. `epochs`: a
    refit of exactly that many epochs (no early stopping; see `_fit`)."""
    t0 = time.perf_counter()
    cfg = cfg or RankerConfig.for_profile("default")
    _check_data(td)
    X, y = _train_rows(td, cfg)
    with _Threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transform = FeatureTransform.fit(X, td.columns, z_max=cfg.z_max)
        model = TeacherRanker(transform, cfg)
        Ztr, Zva = _transform(transform, X), _transform(transform, td.valid.X)
        ytr = torch.from_numpy(y.astype(np.float32))

        def loss(idx, Z, rng):
            return F.binary_cross_entropy_with_logits(model.head(Z[idx]), ytr[idx])

        info = _fit(model, Ztr, len(y), loss, Zva, td.valid.label, cfg.teacher_lr, cfg, seed, epochs=epochs)
        model.fit_info = dataclasses.replace(info, seconds=time.perf_counter() - t0)
    return model


def train_student(td, teacher: TeacherRanker, cfg: RankerConfig | None = None, seed: int = 0, *,
                  epochs: int | None = None) -> StudentRanker:
    """Distil a small MLP from the teacher (same transform, copied from the teacher).

    loss = alpha * BCE(s, y) + (1 - alpha) * BCE(s / T, sigmoid(t / T)) on the training rows,
    plus (1 - alpha) * the soft term on `augment_ratio * n` noisy copies of training rows.
    """
    t0 = time.perf_counter()
    cfg = cfg or RankerConfig.for_profile("default")
    _check_data(td)
    X, y = _train_rows(td, cfg)
    if tuple(teacher.columns) != tuple(td.columns):
        raise ValueError("the teacher was trained on other input columns than this training data: "
                         f"{len(teacher.columns)} vs {len(td.columns)} columns")
    T, alpha = cfg.temperature, cfg.alpha
    with _Threads(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transform = copy.deepcopy(teacher.transform)
        model = StudentRanker(transform, cfg)
        teacher.eval()
        Ztr, Zva = _transform(transform, X), _transform(transform, td.valid.X)
        ytr = torch.from_numpy(y.astype(np.float32))
        soft = torch.sigmoid(_head_logits(teacher, Ztr) / T)
        n_values = transform.in_features  # noise only on normalised values, never on missing flags
        n_aug = int(round(cfg.batch_size * cfg.augment_ratio))

        def loss(idx, Z, rng):
            s = model.head(Z[idx])
            out = alpha * F.binary_cross_entropy_with_logits(s, ytr[idx])
            if alpha < 1.0:
                out = out + (1 - alpha) * F.binary_cross_entropy_with_logits(s / T, soft[idx])
                if n_aug > 0:
                    z = Z[torch.from_numpy(rng.integers(0, len(Z), n_aug))].clone()
                    z[:, :n_values] += cfg.augment_noise * torch.from_numpy(rng.standard_normal((n_aug, n_values), dtype=np.float32))
                    with torch.no_grad():
                        t = torch.sigmoid(teacher.head(z) / T)
                    out = out + (1 - alpha) * F.binary_cross_entropy_with_logits(model.head(z) / T, t)
            return out

        info = _fit(model, Ztr, len(y), loss, Zva, td.valid.label, cfg.student_lr, cfg, seed, epochs=epochs)
        model.fit_info = dataclasses.replace(info, seconds=time.perf_counter() - t0)
    return model


@torch.no_grad()
def predict(model: _Ranker, X: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Probabilities (N,) float32 for raw inputs (N, F) in eval mode."""
    was = model.training
    model.eval()
    X = np.ascontiguousarray(X, dtype=np.float32)
    out = [model(torch.from_numpy(X[i:i + batch])).numpy() for i in range(0, len(X), batch)]
    model.train(was)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


_KINDS = {"teacher": TeacherRanker, "student": StudentRanker}


def save_ranker(model: _Ranker, path) -> None:
    """The torch model as a plain checkpoint (config, transform statistics, weights): loadable
    with `torch.load(weights_only=True)`, so reading it never runs pickled code. The release
    keeps the teacher this way so benchmarks can serve the torch baseline from the release."""
    kind = next(k for k, cls in _KINDS.items() if type(model) is cls)
    cfg = dataclasses.asdict(model.config)
    torch.save({"kind": kind, "config": cfg, "transform": model.transform.stats_dict(), "state_dict": model.state_dict()}, str(path))


def load_ranker(path) -> _Ranker:
    """The model `save_ranker` wrote, in eval mode."""
    ck = torch.load(str(path), map_location="cpu", weights_only=True)
    try:
        cls = _KINDS[ck["kind"]]
        cfg = RankerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"].items()})
        model = cls(FeatureTransform.from_stats_dict(ck["transform"]), cfg)
        model.load_state_dict(ck["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a ranker checkpoint ({type(exc).__name__}: {exc})") from None
    return model.eval()
