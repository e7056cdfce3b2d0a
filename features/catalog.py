"""The item catalogue as columnar arrays: what training, eval and the server know of items."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from features.sorted_lookup import sorted_positions

__all__ = ["ItemCatalog"]


@dataclass(frozen=True)
class ItemCatalog:
    item_id: np.ndarray  # int64, sorted
    topic: np.ndarray  # int32, -1 unknown
    creator_id: np.ndarray  # int64, -1 unknown
    duration_s: np.ndarray  # float64, 0 unknown
    publish_ts: np.ndarray  # int64 ms, 0 unknown

    @classmethod
    def from_table(cls, t: pa.Table) -> "ItemCatalog":
        t = t.sort_by("item_id")
        col = lambda n: t.column(n).to_numpy(zero_copy_only=False)  # noqa: E731
        return cls(col("item_id").astype(np.int64), col("topic").astype(np.int32), col("creator_id").astype(np.int64),
                   col("duration_s").astype(np.float64), col("publish_ts").astype(np.int64))

    def index(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each item id; -1 for unknown ids."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        i = sorted_positions(self.item_id, item_ids)
        return np.where(self.item_id[i] == item_ids, i, -1)

    def __len__(self) -> int:
        return len(self.item_id)
