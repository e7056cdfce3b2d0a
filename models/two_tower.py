"""Two-tower retrieval: a user tower over user features and an item tower over id + content.

User tower. Its inputs are the user feature set's columns of the ranker input matrix, raw, NaN
for missing (`TwoTowerModel.user_columns`), and the user's engagement history: the last
`history_len` distinct items engaged with strictly before the row's time, most recent last
(`features.history`, the same list the server's seen record holds), as vocabulary indices
(0 = empty slot or unknown item). The transforms live inside the module, so they are inside
the exported ONNX graph: missing flags (isnan), missing -> 0, signed log1p, normalisation
with the training rows' mean/std (buffers), clip to +-5; the history's item embeddings (a
table of their own) are mean-pooled over the known items and joined by log1p(count); then an
MLP and L2 normalisation. There is no user id: a new user (no history, or no features at all,
an all-NaN row) gets an embedding from whatever exists; `history_dropout` hides the whole
history of a share of training rows so that path is trained too.

Item tower. Inputs as built by `features.item_inputs.item_tower_inputs` (the same numpy path
the server uses): item_index (1 + position in the training vocabulary, 0 = unknown/new),
topic, creator bucket, duration. An id embedding (zero-initialised, row 0 fixed at zero)
concatenated with topic and creator embeddings and the log duration -> MLP -> L2 normalised.
During training the id is dropped (index 0) with probability `id_dropout`, so the content path
alone gives a useful embedding for a brand-new item. Items of the vocabulary that had no
training positive keep an all-zero id row, so their embedding is exactly the content one.

Training. Positives are the train split's label-1 rows: (user features and history at the
row's time, item). In-batch sampled softmax at temperature T with the logQ correction (Yi et al., 2019):
each logit has log(frequency of its item among the positives) subtracted, so popular items
are not over-penalised for appearing as negatives more often; other rows of the batch that
hold the same item are masked out as negatives. After each epoch the valid split's recall@k
is measured and training stops `patience` epochs after the best, keeping the best weights
(on both datasets the towers overfit the training period after a handful of epochs).
Deterministic given the seed: parameters, data order and dropout masks all come from seeded
generators (and the result does not depend on the thread count).

The item-input builder lives in features/item_inputs.py, a torch-free module, because the
server must build the very same inputs: one implementation below both.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.item_inputs import DEFAULT_CREATOR_BUCKETS, history_index, item_tower_inputs
from features.history import HISTORY_LEN
from models.data import ItemCatalog, Split, TrainingData

__all__ = [
    "TwoTowerConfig",
    "TwoTowerModel",
    "UserTower",
    "ItemTower",
    "train_two_tower",
    "user_columns",
    "retrieval_recall",
    "popularity_recall",
    "recall_from_embeddings",
]

_PROFILES = ("tiny", "small", "default")


@dataclass(frozen=True)
class TwoTowerConfig:
    dim: int = 32
    epochs: int = 25
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    id_dropout: float = 0.3
    temperature: float = 0.05
    user_hidden: tuple[int, ...] = (128, 64)
    item_hidden: tuple[int, ...] = (64,)
    id_dim: int = 32
    content_dim: int = 16
    creator_buckets: int = DEFAULT_CREATOR_BUCKETS
    logq_correction: bool = True
    patience: int = 3  # epochs without a better valid recall@k before stopping; 0 = no early stopping
    early_stopping_k: int = 100  # capped at a quarter of the catalogue
    threads: int = 1  # measured: these small matmuls run faster on 1 thread than 2 (and results are identical)
    history_len: int = HISTORY_LEN  # last engaged items the user tower reads (0: no history input)
    history_dim: int = 32  # their embedding size (a table of its own, mean-pooled)
    history_dropout: float = 0.1  # share of training rows whose whole history is hidden (new users)

    def __post_init__(self) -> None:
        for name in ("dim", "epochs", "batch_size", "id_dim", "content_dim", "creator_buckets", "threads", "early_stopping_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"TwoTowerConfig.{name} must be an int, got {v!r}")
            if v < 1:
                raise ValueError(f"TwoTowerConfig.{name} must be >= 1, got {v}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {self.patience!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for in-batch negatives, got {self.batch_size}")
        if self.creator_buckets < 2:
            raise ValueError(f"creator_buckets must be >= 2 (bucket 0 is 'unknown'), got {self.creator_buckets}")
        for name in ("history_len", "history_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TwoTowerConfig.{name} must be an int >= 0, got {v!r}")
        if (self.history_len == 0) != (self.history_dim == 0):
            raise ValueError("history_len and history_dim must both be 0 (no history) or both > 0")
        if not 0.0 <= self.history_dropout < 1.0:
            raise ValueError(f"history_dropout must be in [0, 1), got {self.history_dropout}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("user_hidden", "item_hidden"):
            h = getattr(self, name)
            if not isinstance(h, tuple) or not all(isinstance(x, int) and x > 0 for x in h):
                raise ValueError(f"TwoTowerConfig.{name} must be a tuple of positive ints, got {h!r}")

    @classmethod
    def for_profile(cls, profile: str) -> "TwoTowerConfig":
        """"tiny": ~0.2 s on a tiny data dir (tests); "small"; "default": ~3-4 s on the default
        simulated data or MovieLens 100K (early stopping ends it after 6-11 epochs)."""
        if profile == "tiny":
            return cls(dim=16, epochs=12, batch_size=128, lr=5e-3, user_hidden=(32,), item_hidden=(32,), id_dim=16, content_dim=8,
                       history_len=20, history_dim=16)
        if profile == "small":
            return cls(dim=32, epochs=10, batch_size=256, lr=3e-3, user_hidden=(64,), item_hidden=(64,), id_dim=32, content_dim=16)
        if profile == "default":
            return cls()
        raise ValueError(f"unknown profile {profile!r}; choose one of {list(_PROFILES)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["user_hidden"], d["item_hidden"] = list(self.user_hidden), list(self.item_hidden)
        return d


def user_columns(td: TrainingData) -> list[str]:
    """The ranker input columns of the user feature set, in matrix order."""
    return [c for c in td.columns if c.startswith(td.inputs.user_set + ".")]


def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        n_in = h
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _signed_log1p(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(torch.abs(x))


def _signed_log1p_np(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


class UserTower(nn.Module):
    """[N, U] float32 raw user features (NaN = missing) and [N, L] int64 history (vocabulary
    indices of the user's last engaged items, 0 = empty or unknown) -> [N, dim] unit-norm."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: tuple[int, ...], dim: int,
                 n_vocab: int = 0, history_dim: int = 0, history_len: int = 1) -> None:
        super().__init__()
        self.n_features = int(len(mean))
        self.n_vocab, self.history_dim, self.history_len = int(n_vocab), int(history_dim), int(history_len)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        if self.history_dim:
            self.history_embedding = nn.Embedding(self.n_vocab + 1, self.history_dim, padding_idx=0)
            with torch.no_grad():
                self.history_embedding.weight.normal_(0.0, 0.1)
                self.history_embedding.weight[0].zero_()
        self.mlp = _mlp(2 * self.n_features + (self.history_dim + 1 if self.history_dim else 0), hidden, dim)

    def pooled_history(self, history: torch.Tensor) -> torch.Tensor:
        """[N, history_dim + 1]: the mean embedding of the known history items, and how many
        there are (log1p, scaled by the configured length). An empty history gives zeros."""
        idx = torch.where((history > 0) & (history <= self.n_vocab), history, torch.zeros_like(history))
        known = (idx > 0).to(torch.float32)
        n = known.sum(dim=1, keepdim=True)
        pooled = (self.history_embedding(idx) * known.unsqueeze(2)).sum(dim=1) / torch.clamp(n, min=1.0)
        return torch.cat([pooled, torch.log1p(n) / float(np.log1p(max(self.history_len, 1)))], dim=1)

    def forward(self, user_features: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        missing = torch.isnan(user_features)
        x = torch.where(missing, torch.zeros_like(user_features), user_features)
        x = torch.clamp((_signed_log1p(x) - self.mean) / self.std, -5.0, 5.0)
        parts = [x, missing.to(torch.float32)]
        if self.history_dim:
            if history is None:
                history = torch.zeros((user_features.shape[0], 1), dtype=torch.int64)
            parts.append(self.pooled_history(history))
        return F.normalize(self.mlp(torch.cat(parts, dim=1)), p=2.0, dim=1, eps=1e-12)


class ItemTower(nn.Module):
    """item_index, topic, creator_bucket [N] int64 and duration_s [N] float32 -> [N, dim] unit-norm."""

    def __init__(self, n_vocab: int, n_topics: int, creator_buckets: int, duration_mean: float, duration_std: float,
                 id_dim: int, content_dim: int, hidden: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.n_vocab, self.n_topics, self.creator_buckets = int(n_vocab), int(n_topics), int(creator_buckets)
        self.id_embedding = nn.Embedding(self.n_vocab + 1, id_dim, padding_idx=0)
        nn.init.zeros_(self.id_embedding.weight)  # untrained ids stay at zero: their embedding is the content one
        self.topic_embedding = nn.Embedding(self.n_topics + 1, content_dim)  # row 0: unknown topic
        self.creator_embedding = nn.Embedding(self.creator_buckets, content_dim)  # bucket 0: unknown creator
        self.register_buffer("duration_mean", torch.tensor(float(duration_mean), dtype=torch.float32))
        self.register_buffer("duration_std", torch.tensor(float(duration_std), dtype=torch.float32))
        self.mlp = _mlp(id_dim + 2 * content_dim + 2, hidden, dim)

    def forward(self, item_index: torch.Tensor, topic: torch.Tensor, creator_bucket: torch.Tensor, duration_s: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(item_index)
        idx = torch.where((item_index >= 0) & (item_index <= self.n_vocab), item_index, zero)
        t = torch.where((topic >= 0) & (topic < self.n_topics), topic + 1, torch.zeros_like(topic))
        c = torch.where((creator_bucket >= 0) & (creator_bucket < self.creator_buckets), creator_bucket, torch.zeros_like(creator_bucket))
        known = duration_s > 0  # NaN compares False: unknown
        d = torch.log1p(torch.where(known, duration_s, torch.zeros_like(duration_s)))
        d = torch.where(known, torch.clamp((d - self.duration_mean) / self.duration_std, -5.0, 5.0), torch.zeros_like(d))
        h = torch.cat([self.id_embedding(idx), self.topic_embedding(t), self.creator_embedding(c),
                       d.unsqueeze(1), known.to(torch.float32).unsqueeze(1)], dim=1)
        return F.normalize(self.mlp(h), p=2.0, dim=1, eps=1e-12)


def _item_batch(inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(np.ascontiguousarray(inputs["item_index"], dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(inputs["topic"], dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(inputs["creator_bucket"], dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(inputs["duration_s"], dtype=np.float32)))


@dataclass
class TwoTowerModel:
    config: TwoTowerConfig
    user_tower: UserTower
    item_tower: ItemTower
    user_columns: list[str]
    vocab: np.ndarray  # int64 item ids in index order (item_index = position + 1)
    items: ItemCatalog  # the catalogue the model was trained with
    seed: int
    loss_history: list[float] = field(default_factory=list)  # mean training loss per epoch
    valid_recall_history: list[float] = field(default_factory=list)  # valid recall@k per epoch (early stopping)
    best_epoch: int = 0  # 1-based epoch whose weights were kept
    train_seconds: float = 0.0
    n_positives: int = 0
    sample_user_features: np.ndarray | None = None  # up to 256 raw training rows [N, U], for export checks
    sample_history: np.ndarray | None = None  # their history item ids [N, L] (PAD = -1)

    @property
    def dim(self) -> int:
        return self.config.dim

    def user_inputs(self, X: np.ndarray, columns: tuple[str, ...] | list[str]) -> np.ndarray:
        """The user tower's input [N, U] float32 from a ranker input matrix with named columns."""
        pos = {c: j for j, c in enumerate(columns)}
        missing = [c for c in self.user_columns if c not in pos]
        if missing:
            raise KeyError(f"user tower inputs {missing[:3]}... are not among the matrix columns")
        return np.ascontiguousarray(np.asarray(X, dtype=np.float32)[:, [pos[c] for c in self.user_columns]])

    def history_inputs(self, history: np.ndarray | None, n: int) -> np.ndarray:
        """The user tower's history input [n, L] int64 (vocabulary indices, 0 = empty) from item
        ids [n, >=0] (features.history layout: most recent last, PAD = -1); None = no history."""
        L = self.config.history_len
        if history is None:
            return np.zeros((n, L), dtype=np.int64)
        return history_index(self.vocab, history, L)

    @torch.no_grad()
    def user_embeddings(self, user_features: np.ndarray, history: np.ndarray | None = None, batch: int = 8192) -> np.ndarray:
        """(N, dim) float32 from raw user features [N, U] (NaN = missing) and the users' history
        as item ids [N, L'] (most recent last, PAD = -1; None = every history empty)."""
        U = np.asarray(user_features, dtype=np.float32)
        if U.ndim != 2 or U.shape[1] != len(self.user_columns):
            raise ValueError(f"user features must be (N, {len(self.user_columns)}), got {U.shape}")
        Hx = self.history_inputs(history, len(U))
        self.user_tower.eval()
        out = [self.user_tower(torch.from_numpy(np.ascontiguousarray(U[a : a + batch])), torch.from_numpy(Hx[a : a + batch])).numpy()
               for a in range(0, len(U), batch)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def item_inputs(self, item_ids: np.ndarray, catalog: ItemCatalog | None = None, *, content_only: bool = False) -> dict[str, np.ndarray]:
        return item_tower_inputs(self.items if catalog is None else catalog, item_ids, vocab=self.vocab,
                                 n_creator_buckets=self.config.creator_buckets, content_only=content_only)

    @torch.no_grad()
    def _item_forward(self, inputs: dict[str, np.ndarray], batch: int = 8192) -> np.ndarray:
        self.item_tower.eval()
        n = len(inputs["item_index"])
        out = [self.item_tower(*_item_batch({k: v[a : a + batch] for k, v in inputs.items()})).numpy() for a in range(0, n, batch)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def item_embeddings(self, item_ids: np.ndarray | None = None, catalog: ItemCatalog | None = None) -> np.ndarray:
        """(n, dim) float32 for item ids (default: the training catalogue, in its order).

        Ids in the training vocabulary use their id embedding; others (new items) the content path.
        """
        ids = (self.items if catalog is None else catalog).item_id if item_ids is None else item_ids
        return self._item_forward(self.item_inputs(ids, catalog))

    def content_embeddings(self, item_ids: np.ndarray, catalog: ItemCatalog | None = None) -> np.ndarray:
        """(n, dim) float32 from content alone (item_index 0), as for items never seen in training."""
        return self._item_forward(self.item_inputs(item_ids, catalog, content_only=True))


def _user_stats(U: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = _signed_log1p_np(np.where(np.isnan(U), 0.0, U).astype(np.float64))
    mean = x.mean(axis=0) if len(x) else np.zeros(U.shape[1])
    std = x.std(axis=0) if len(x) else np.ones(U.shape[1])
    std = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def _duration_stats(duration_s: np.ndarray) -> tuple[float, float]:
    d = np.log1p(duration_s[duration_s > 0].astype(np.float64))
    if len(d) == 0:
        return 0.0, 1.0
    s = float(d.std())
    return float(d.mean()), s if s > 1e-6 else 1.0


def train_two_tower(td: TrainingData, cfg: TwoTowerConfig | None = None, seed: int = 0) -> TwoTowerModel:
    """Train both towers on the train split's positives (see the module docstring)."""
    cfg = TwoTowerConfig() if cfg is None else cfg
    t0 = time.perf_counter()
    ucols = user_columns(td)
    if not ucols:
        raise ValueError(f"no columns of the user feature set {td.inputs.user_set!r} among the ranker inputs")
    cidx = [td.columns.index(c) for c in ucols]
    train = td.train
    pos = np.flatnonzero(train.label > 0.5)
    if len(pos) < 2:
        raise ValueError(f"the train split has {len(pos)} positive rows; the two-tower needs at least 2")
    U_all = np.ascontiguousarray(train.X[:, cidx], dtype=np.float32)
    mean, std = _user_stats(U_all)
    U = U_all[pos]

    vocab = td.items.item_id.astype(np.int64)
    L = cfg.history_len
    Hx = history_index(vocab, train.H[pos], L)
    vin = item_tower_inputs(td.items, vocab, vocab=vocab, n_creator_buckets=cfg.creator_buckets)  # row r = vocab item r
    row = td.items.index(train.item_id[pos])
    if (row < 0).any():
        raise ValueError(f"{int((row < 0).sum())} positive rows name items missing from the catalogue")
    counts = np.bincount(row, minlength=len(vocab)).astype(np.float64)
    logq = np.log(counts[row] / counts.sum()).astype(np.float32)

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(seed)
        np_rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        d_mean, d_std = _duration_stats(td.items.duration_s)
        user_tower = UserTower(mean, std, cfg.user_hidden, cfg.dim, len(vocab), cfg.history_dim, L)
        item_tower = ItemTower(len(vocab), td.info.n_topics, cfg.creator_buckets, d_mean, d_std,
                               cfg.id_dim, cfg.content_dim, cfg.item_hidden, cfg.dim)
        params = list(user_tower.parameters()) + list(item_tower.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        U_t = torch.from_numpy(U)
        H_t = torch.from_numpy(Hx)
        row_t = torch.from_numpy(row.astype(np.int64))
        logq_t = torch.from_numpy(logq)
        item_t = _item_batch(vin)
        valid = _valid_set(td, cidx, vocab, L) if cfg.patience > 0 else None
        stop_k = max(1, min(cfg.early_stopping_k, len(vocab) // 4))  # k ~ the catalogue size says nothing
        history: list[float] = []
        valid_history: list[float] = []
        best = (-1.0, 0, None)  # (valid recall, epoch, state)
        n = len(pos)
        for epoch in range(1, cfg.epochs + 1):
            user_tower.train(), item_tower.train()
            order = torch.from_numpy(np_rng.permutation(n))
            total, batches = 0.0, 0
            for a in range(0, n, cfg.batch_size):
                b = order[a : a + cfg.batch_size]
                if len(b) < 2:
                    continue
                r = row_t[b]
                idx = item_t[0][r]
                if cfg.id_dropout > 0:
                    drop = torch.rand(len(b), generator=gen) < cfg.id_dropout
                    idx = torch.where(drop, torch.zeros_like(idx), idx)
                h = H_t[b]
                if cfg.history_dropout > 0 and L:
                    hide = torch.rand(len(b), generator=gen) < cfg.history_dropout
                    h = torch.where(hide.unsqueeze(1), torch.zeros_like(h), h)
                u = user_tower(U_t[b], h)
                v = item_tower(idx, item_t[1][r], item_t[2][r], item_t[3][r])
                logits = u @ v.T / cfg.temperature
                if cfg.logq_correction:
                    logits = logits - logq_t[b].unsqueeze(0)
                same = (r.unsqueeze(1) == r.unsqueeze(0)) & ~torch.eye(len(b), dtype=torch.bool)
                logits = logits.masked_fill(same, float("-inf"))
                loss = F.cross_entropy(logits, torch.arange(len(b)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                batches += 1
            history.append(total / max(batches, 1))
            if valid is not None:
                rec = _tower_recall(user_tower, item_tower, item_t, valid, stop_k)
                valid_history.append(rec)
                if rec > best[0]:
                    best = (rec, epoch, _state(user_tower, item_tower))
                elif epoch - best[1] >= cfg.patience:
                    break
        if best[2] is not None:
            user_tower.load_state_dict(best[2][0])
            item_tower.load_state_dict(best[2][1])
        best_epoch = best[1] if best[2] is not None else len(history)
        with torch.no_grad():  # ids never seen as positives: exactly the content embedding
            item_tower.id_embedding.weight[1:][torch.from_numpy(counts == 0)] = 0.0
        user_tower.eval(), item_tower.eval()
    finally:
        torch.set_num_threads(prev_threads)
    pick = np.sort(np.random.default_rng(seed).choice(len(U_all), size=min(256, len(U_all)), replace=False))
    return TwoTowerModel(cfg, user_tower, item_tower, ucols, vocab, td.items, seed, history, valid_history,
                         best_epoch, time.perf_counter() - t0, int(len(pos)), U_all[pick], train.H[pick][:, -L:] if L else None)


def _state(*modules: nn.Module) -> tuple[dict[str, torch.Tensor], ...]:
    return tuple({k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules)


def _valid_set(td: TrainingData, cidx: list[int], vocab: np.ndarray, L: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray] | None:
    """Valid positives (user features, history, catalogue row of the item), or None when there are none."""
    m = td.valid.label > 0.5
    if not m.any():
        return None
    return (torch.from_numpy(np.ascontiguousarray(td.valid.X[m][:, cidx], dtype=np.float32)),
            torch.from_numpy(history_index(vocab, td.valid.H[m], L)), td.items.index(td.valid.item_id[m]))


@torch.no_grad()
def _tower_recall(user_tower: UserTower, item_tower: ItemTower, item_t: tuple[torch.Tensor, ...],
                  valid: tuple[torch.Tensor, torch.Tensor, np.ndarray], k: int) -> float:
    user_tower.eval(), item_tower.eval()
    u = user_tower(valid[0], valid[1]).numpy()
    v = item_tower(*item_t).numpy()
    return recall_from_embeddings(u, v, valid[2], k)


# ---- evaluation -----------------------------------------------------------------------------


def recall_from_embeddings(user_emb: np.ndarray, item_emb: np.ndarray, target_rows: np.ndarray, k: int = 100, *, batch: int = 2048) -> float:
    """Fraction of rows whose target item (row of item_emb; -1 = not in the catalogue, a miss)
    is among the k highest dot products of the full catalogue (exact search; ties count for the target)."""
    if len(user_emb) != len(target_rows):
        raise ValueError(f"{len(user_emb)} user embeddings for {len(target_rows)} targets")
    if len(target_rows) == 0:
        return float("nan")
    hits = 0
    for a in range(0, len(user_emb), batch):
        s = user_emb[a : a + batch] @ item_emb.T
        t = target_rows[a : a + batch]
        ok = t >= 0
        ts = s[np.arange(len(t)), np.maximum(t, 0)]
        rank = (s > ts[:, None]).sum(axis=1)
        hits += int(((rank < k) & ok).sum())
    return hits / len(target_rows)


def _split(td: TrainingData, split: Split | str) -> Split:
    if isinstance(split, Split):
        return split
    if split not in ("train", "valid", "test"):
        raise ValueError(f"unknown split {split!r}; choose 'train', 'valid' or 'test'")
    return getattr(td, split)


def retrieval_recall(model: TwoTowerModel, td: TrainingData, split: Split | str = "test", k: int = 100,
                     catalog: ItemCatalog | None = None) -> float:
    """Full-catalogue recall@k of the two-tower on a split's positive rows.

    Each positive row's user features (at the row's time) go through the user tower; a hit is
    the row's item among the exact top-k dot products over every item of ``catalog`` (default
    td.items; items outside the training vocabulary use their content embedding).
    """
    s = _split(td, split)
    cat = td.items if catalog is None else catalog
    pos = s.label > 0.5
    U = model.user_inputs(s.X[pos], td.columns)
    return recall_from_embeddings(model.user_embeddings(U, s.H[pos]), model.item_embeddings(cat.item_id, cat), cat.index(s.item_id[pos]), k)


def popularity_recall(td: TrainingData, split: Split | str = "test", k: int = 100) -> float:
    """Recall@k of one list for everyone: the k items with most train positives (ties: lower id)."""
    s = _split(td, split)
    pos = s.label > 0.5
    if not pos.any():
        return float("nan")
    rows = td.items.index(td.train.item_id[td.train.label > 0.5])
    counts = np.bincount(rows[rows >= 0], minlength=len(td.items))
    top = np.argsort(-counts, kind="stable")[:k]
    return float(np.isin(td.items.index(s.item_id[pos]), top).mean())
