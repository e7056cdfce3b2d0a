"""Point-in-time join: each spine row gets every feature as of its own timestamp.

"As of t" means events with ts < t only, TTL respected, missing policy applied: a training
row for an impression at t never sees that impression or anything later. The join runs the
batch engine, which ends in the same `read_features` as online serving.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from features.definitions import FeatureSet
from features.engines import LOCAL, Engine
from features.events import EventBatch
from features.state import StateLayout

__all__ = ["point_in_time_join", "PitJoiner", "spine_codes"]


def spine_codes(fs: FeatureSet, spine: pa.Table) -> np.ndarray:
    """Entity codes of the spine rows for a set; -1 where an id is missing or invalid."""
    cols = []
    for k in fs.entity.keys:
        if k not in spine.column_names:
            raise ValueError(f"spine lacks column {k!r} needed by feature set {fs.name!r} (entity {fs.entity.name})")
        cols.append(spine.column(k).to_numpy(zero_copy_only=False).astype(np.int64))
    if len(cols) == 1:
        return np.where(cols[0] >= 0, cols[0], -1)
    a, b = cols
    ok = (a >= 0) & (b >= 0) & (a < (1 << 31)) & (b < (1 << 31))
    return np.where(ok, (a << 32) | np.where(ok, b, 0), -1)


class PitJoiner:
    """Holds one batch engine per feature set so many spines can be joined cheaply."""

    def __init__(self, sets: Sequence[FeatureSet], events: EventBatch | Mapping[str, EventBatch], engine: Engine | None = None) -> None:
        """`engine` (features.engines; default: this process) builds each set's batch engine: on
        Ray, partitions of the set's events by entity hash, and the same joined rows."""
        self.sets = list(sets)
        engine = engine or LOCAL
        self.engines = {
            fs.name: engine.batch_engine(StateLayout(fs), events[fs.name] if isinstance(events, Mapping) else events) for fs in self.sets
        }

    def close(self) -> None:
        """Free the engines' partitions where they live remotely (Ray); nothing to do locally."""
        for e in self.engines.values():
            if hasattr(e, "close"):
                e.close()

    def join(self, spine: pa.Table, ts_column: str = "ts", only: Sequence[str] | None = None) -> pa.Table:
        """Append every set's features (or only the named sets') as of each row's time."""
        if ts_column not in spine.column_names:
            raise ValueError(f"spine lacks its timestamp column {ts_column!r}")
        t = spine.column(ts_column).to_numpy(zero_copy_only=False).astype(np.int64)
        out = spine
        for fs in self.sets:
            if only is not None and fs.name not in only:
                continue
            frame = self.engines[fs.name].features_asof(spine_codes(fs, spine), t)
            for j, col in enumerate(frame.columns):
                out = out.append_column(f"{fs.name}.{col}", pa.array(frame.values[:, j]))
            j = 0
            for f in fs.features:  # one missing flag per feature (a vector shares one)
                out = out.append_column(f"{fs.name}.{f.name}.missing", pa.array(frame.missing[:, j]))
                j += f.dim
            out = out.append_column(f"{fs.name}.feature_ts", pa.array(frame.feature_ts))
        return out


def point_in_time_join(spine: pa.Table, sets: Sequence[FeatureSet], events: EventBatch, ts_column: str = "ts",
                       engine: Engine | None = None) -> pa.Table:
    return PitJoiner(sets, events, engine).join(spine, ts_column)
