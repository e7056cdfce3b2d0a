"""The item-item model's files in a release (`features.item_item`): retrieval/item_item.npy
(the float32 weights) and retrieval/item_item_ids.npy (their item ids, sorted). Pure numpy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from features.item_item import ItemItem

__all__ = ["save_item_item", "load_item_item", "WEIGHTS_FILE", "IDS_FILE"]

WEIGHTS_FILE = "item_item.npy"
IDS_FILE = "item_item_ids.npy"


def save_item_item(model: ItemItem, directory: str | Path) -> None:
    d = Path(directory)
    np.save(d / WEIGHTS_FILE, np.ascontiguousarray(model.weights, dtype=np.float32), allow_pickle=False)
    np.save(d / IDS_FILE, np.ascontiguousarray(model.vocab, dtype=np.int64), allow_pickle=False)


def load_item_item(directory: str | Path, l2: float, history_len: int) -> ItemItem:
    """Read and check the files (ItemItem checks the shapes and the id order)."""
    d = Path(directory)
    ids = np.load(d / IDS_FILE, allow_pickle=False)
    w = np.load(d / WEIGHTS_FILE, allow_pickle=False)
    if ids.dtype != np.int64 or w.dtype != np.float32:
        raise ValueError(f"{d}: item-item files must be int64 ids and float32 weights, got {ids.dtype} and {w.dtype}")
    return ItemItem(ids, w, float(l2), int(history_len))
