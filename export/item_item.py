"""The item-item model's files in a release (`features.item_item`), sparse, under retrieval/:

    item_item_ids.npy      (n,) int64     the item ids, sorted (the model's vocabulary)
    item_item_indptr.npy   (n + 1,) int64 row r's neighbours are at indptr[r]:indptr[r + 1]
    item_item_nbr.npy      (nnz,) int32   the vocabulary rows each row points at
    item_item.npy          (nnz,) float32 the weights

float32 as fitted: training, `parity eval` and the server all score with these same numbers,
so their item-item columns agree to the bit. The size grows with n x neighbours (16 bytes a
weight), not n^2. Loading checks dtypes and shapes here and the structure in ItemItem; a file
from an older release (the dense n x n matrix) is refused with a message saying so. Pure numpy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from features.item_item import DEFAULT_NEIGHBOURS, ItemItem

__all__ = ["save_item_item", "load_item_item", "ItemItemFileError", "WEIGHTS_FILE", "IDS_FILE", "INDPTR_FILE", "NBR_FILE", "FILES"]

IDS_FILE = "item_item_ids.npy"
INDPTR_FILE = "item_item_indptr.npy"
NBR_FILE = "item_item_nbr.npy"
WEIGHTS_FILE = "item_item.npy"
FILES = (IDS_FILE, INDPTR_FILE, NBR_FILE, WEIGHTS_FILE)
_DTYPES = {IDS_FILE: np.int64, INDPTR_FILE: np.int64, NBR_FILE: np.int32, WEIGHTS_FILE: np.float32}


class ItemItemFileError(ValueError):
    """The item-item files of a release are missing, of the wrong type or inconsistent."""


def save_item_item(model: ItemItem, directory: str | Path) -> None:
    d = Path(directory)
    for name, arr in ((IDS_FILE, model.vocab), (INDPTR_FILE, model.indptr), (NBR_FILE, model.nbr), (WEIGHTS_FILE, model.weights)):
        np.save(d / name, np.ascontiguousarray(arr, dtype=_DTYPES[name]), allow_pickle=False)


def load_item_item(directory: str | Path, l2: float, history_len: int, neighbours: int = DEFAULT_NEIGHBOURS) -> ItemItem:
    """Read and check the files: each 1-D of its dtype, then ItemItem checks how they fit together."""
    d = Path(directory)
    arrs = {}
    for name in FILES:
        try:
            a = np.load(d / name, allow_pickle=False)
        except FileNotFoundError:
            raise ItemItemFileError(f"{d}: the item-item file {name} is missing (a release from before the sparse "
                                    "item-item model has only item_item.npy and item_item_ids.npy: retrain it)") from None
        except ValueError as exc:
            raise ItemItemFileError(f"{d / name}: not a readable .npy array ({exc})") from None
        if a.dtype != _DTYPES[name] or a.ndim != 1:
            hint = " (an n x n matrix: the dense item-item model of an older release; retrain it)" if name == WEIGHTS_FILE and a.ndim == 2 else ""
            raise ItemItemFileError(f"{d / name}: must be 1-D {np.dtype(_DTYPES[name])}, got {a.ndim}-D {a.dtype}{hint}")
        arrs[name] = a
    try:
        return ItemItem(arrs[IDS_FILE], arrs[INDPTR_FILE], arrs[NBR_FILE], arrs[WEIGHTS_FILE], float(l2), int(history_len), int(neighbours))
    except ValueError as exc:
        raise ItemItemFileError(f"{d}: the item-item files do not fit together: {exc}") from None
