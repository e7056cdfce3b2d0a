"""Item-tower inputs built from the catalogue: the one numpy path shared by training and serving.

The two-tower item tower takes four columns per item (ONNX input names):

- ``item_index`` int64: 1 + the item's position in the training vocabulary, 0 when the item
  was not in it (a new item: the tower then uses its content alone);
- ``topic`` int64: the catalogue topic, -1 unknown (the graph maps out-of-range to unknown);
- ``creator_bucket`` int64: the creator id hashed into ``n_buckets - 1`` buckets, 0 unknown;
- ``duration_s`` float32: seconds, 0 unknown.

Training (models.two_tower), the release exporter and the server all call
`item_tower_inputs`, so an item gets the same numbers everywhere. The vocabulary (item ids in
index order) is saved beside the towers with `save_vocab` and read back with `load_vocab`.

Pure numpy: the server imports this module, so it must never import torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from features.sorted_lookup import sorted_positions

if TYPE_CHECKING:  # a type only
    from features.catalog import ItemCatalog

__all__ = [
    "DEFAULT_CREATOR_BUCKETS",
    "VOCAB_FILE",
    "ITEM_INPUT_NAMES",
    "VocabError",
    "creator_bucket",
    "vocab_index",
    "VocabIndex",
    "history_index",
    "item_tower_inputs",
    "save_vocab",
    "load_vocab",
]

DEFAULT_CREATOR_BUCKETS = 1024
VOCAB_FILE = "item_ids.npy"
ITEM_INPUT_NAMES = ("item_index", "topic", "creator_bucket", "duration_s")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class VocabError(ValueError):
    """An item vocabulary that is not a 1-D array of unique int64 item ids."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrapping arithmetic): a fixed, platform-independent hash."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def creator_bucket(creator_ids: np.ndarray, n_buckets: int = DEFAULT_CREATOR_BUCKETS) -> np.ndarray:
    """int64 bucket per creator id: 1 .. n_buckets-1 by a fixed hash, 0 for unknown (negative) ids."""
    if not isinstance(n_buckets, (int, np.integer)) or n_buckets < 2:
        raise ValueError(f"n_buckets must be an int >= 2, got {n_buckets!r}")
    c = np.asarray(creator_ids, dtype=np.int64)
    h = _splitmix64(c.astype(np.uint64))  # two's complement view; negatives are masked below
    b = (h % np.uint64(n_buckets - 1)).astype(np.int64) + 1
    return np.where(c < 0, 0, b).astype(np.int64)


def _check_vocab(vocab: np.ndarray) -> np.ndarray:
    v = np.asarray(vocab)
    if v.ndim != 1 or not np.issubdtype(v.dtype, np.integer):
        raise VocabError(f"an item vocabulary is a 1-D integer array of item ids, got dtype {v.dtype} shape {v.shape}")
    v = v.astype(np.int64, copy=False)
    if len(np.unique(v)) != len(v):
        raise VocabError("the item vocabulary holds duplicate item ids")
    return v


class VocabIndex:
    """`vocab_index` for one vocabulary, checked and sorted once. The server maps every
    request's history through it; re-checking the vocabulary per call (np.unique over every
    item) was 8 % of a request's CPU."""

    def __init__(self, vocab: np.ndarray) -> None:
        self.vocab = _check_vocab(vocab)
        self._order = np.argsort(self.vocab, kind="stable")
        self._sorted = self.vocab[self._order]

    def __call__(self, item_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(item_ids, dtype=np.int64)
        if len(self._sorted) == 0:
            return np.zeros(ids.shape, dtype=np.int64)
        pos = sorted_positions(self._sorted, ids)
        return np.where(self._sorted[pos] == ids, self._order[pos] + 1, 0).astype(np.int64)


def vocab_index(vocab: "np.ndarray | VocabIndex", item_ids: np.ndarray) -> np.ndarray:
    """int64 ``item_index`` per item id: 1 + position in ``vocab``, 0 for ids not in it."""
    return (vocab if isinstance(vocab, VocabIndex) else VocabIndex(vocab))(item_ids)


def history_index(vocab: "np.ndarray | VocabIndex", history: np.ndarray, n: int) -> np.ndarray:
    """The user tower's ``history`` input (rows, n) int64 from history item ids (rows, L), most
    recent last, PAD (-1) for empty slots (features.history): the last n columns (left-padded
    when L < n), each id mapped by `vocab_index`; empty slots and ids outside the training
    vocabulary give 0, which the tower ignores."""
    h = np.asarray(history, dtype=np.int64)
    if h.ndim != 2:
        raise ValueError(f"history must be (rows, L) item ids, got shape {h.shape}")
    if h.shape[1] >= n:
        h = h[:, h.shape[1] - n:]
    else:
        h = np.concatenate([np.full((len(h), n - h.shape[1]), -1, dtype=np.int64), h], axis=1)
    return np.where(h >= 0, vocab_index(vocab, h), 0).astype(np.int64)


def item_tower_inputs(
    catalog: "ItemCatalog",
    item_ids: np.ndarray,
    *,
    vocab: "np.ndarray | VocabIndex",
    n_creator_buckets: int = DEFAULT_CREATOR_BUCKETS,
    content_only: bool = False,
) -> dict[str, np.ndarray]:
    """The item tower's inputs for ``item_ids``, in the order given.

    ``vocab`` is the TRAINING vocabulary (the model's, or `load_vocab` of a release), not the
    current catalogue: positions must not shift when new items arrive. Ids missing from the
    catalogue get unknown content (topic -1, creator 0, duration 0); ids missing from the
    vocabulary get item_index 0, and so does every item when ``content_only``.
    """
    ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    row = catalog.index(ids) if len(catalog) else np.full(len(ids), -1, dtype=np.int64)
    ok = row >= 0
    r = np.maximum(row, 0)
    pick = (lambda a, missing: np.where(ok, a[r], missing)) if len(catalog) else (lambda a, missing: np.full(len(ids), missing))
    topic = pick(catalog.topic, -1).astype(np.int64)
    creator = pick(catalog.creator_id, -1).astype(np.int64)
    duration = pick(catalog.duration_s, 0.0).astype(np.float32)
    index = np.zeros(len(ids), dtype=np.int64) if content_only else vocab_index(vocab, ids)
    return {
        "item_index": index,
        "topic": topic,
        "creator_bucket": creator_bucket(creator, n_creator_buckets),
        "duration_s": duration,
    }


def save_vocab(directory: str | Path, item_ids: np.ndarray) -> Path:
    """Write the vocabulary (item ids in index order) to ``directory/item_ids.npy``."""
    v = _check_vocab(item_ids)
    path = Path(directory) / VOCAB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, v, allow_pickle=False)
    return path


def load_vocab(directory: str | Path) -> np.ndarray:
    """Read ``directory/item_ids.npy`` (or a path to the .npy itself) and check it."""
    path = Path(directory)
    if path.is_dir():
        path = path / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no item vocabulary at {path}: a release writes it with save_vocab()")
    return _check_vocab(np.load(path, allow_pickle=False))
