"""The event-log schema: the one table every path (batch, streaming, live) consumes.

Events are columnar (numpy arrays) so the batch path is vectorised and the streaming path
receives the very same structure in small batches. Item attributes that features group by
(topic, creator) are denormalised onto the event at its source, so a feature never needs a
catalogue lookup whose answer could differ between training and serving.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np
import pyarrow as pa

__all__ = ["EventType", "EventBatch", "EVENT_SCHEMA", "MS_PER_DAY", "MS_PER_HOUR", "MS_PER_MINUTE"]

MS_PER_MINUTE = 60_000
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000


class EventType(IntEnum):
    """What happened. Values are stable: they are stored in Parquet."""

    IMPRESSION = 0  # an item was shown; value 1
    PLAY = 1  # the user watched; value = seconds watched
    LIKE = 2  # value 1
    SKIP = 3  # value 1
    RATING = 4  # explicit rating; value = the rating (MovieLens)

    @classmethod
    def parse(cls, name: str) -> "EventType":
        try:
            return cls[name.upper()]
        except KeyError:
            allowed = ", ".join(m.name.lower() for m in cls)
            raise ValueError(f"unknown event type {name!r}; allowed: {allowed}") from None


EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),  # event time, ms since epoch, UTC
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("creator_id", pa.int64(), nullable=False),  # -1: unknown
        pa.field("topic", pa.int32(), nullable=False),  # -1: unknown
        pa.field("session_id", pa.int64(), nullable=False),  # -1: none
        pa.field("type", pa.int8(), nullable=False),  # EventType
        pa.field("value", pa.float64(), nullable=False),
    ]
)

_DTYPES = {f.name: f.type.to_pandas_dtype() for f in EVENT_SCHEMA}


@dataclass(frozen=True)
class EventBatch:
    """A batch of events as parallel numpy arrays (the columns of EVENT_SCHEMA)."""

    event_id: np.ndarray
    ts: np.ndarray
    user_id: np.ndarray
    item_id: np.ndarray
    creator_id: np.ndarray
    topic: np.ndarray
    session_id: np.ndarray
    type: np.ndarray
    value: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.event_id)
        for f in fields(self):
            arr = np.asarray(getattr(self, f.name))
            want = np.dtype(_DTYPES[f.name])
            if arr.dtype != want:
                if arr.dtype.kind not in "iufb" or (want.kind in "iu" and arr.dtype.kind == "f"):
                    raise TypeError(f"event column {f.name!r} must be {want}, got {arr.dtype}")
                arr = arr.astype(want)
            if arr.ndim != 1 or len(arr) != n:
                raise ValueError(f"event column {f.name!r} has shape {arr.shape}, expected ({n},)")
            object.__setattr__(self, f.name, arr)
        if n and not np.all(np.isfinite(self.value)):
            bad = int(np.flatnonzero(~np.isfinite(self.value))[0])
            raise ValueError(f"event value must be finite; event_id {int(self.event_id[bad])} has {self.value[bad]}")
        if n and int(self.ts.min()) < 0:
            raise ValueError("event ts must be >= 0 (ms since the Unix epoch, UTC)")

    def __len__(self) -> int:
        return len(self.event_id)

    @classmethod
    def empty(cls) -> "EventBatch":
        return cls(**{name: np.empty(0, dtype=dt) for name, dt in _DTYPES.items()})

    @classmethod
    def from_arrow(cls, table: pa.Table) -> "EventBatch":
        missing = [f.name for f in EVENT_SCHEMA if f.name not in table.column_names]
        if missing:
            raise ValueError(f"event table lacks columns {missing}")
        return cls(**{f.name: table.column(f.name).to_numpy(zero_copy_only=False) for f in EVENT_SCHEMA})

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "EventBatch":
        """Build from dicts (tests, small live batches). Missing optional ids default to -1."""
        cols: dict[str, list] = {f.name: [] for f in EVENT_SCHEMA}
        for i, row in enumerate(rows):
            for f in EVENT_SCHEMA:
                if f.name in row:
                    v = row[f.name]
                elif f.name in ("creator_id", "topic", "session_id"):
                    v = -1
                else:
                    raise ValueError(f"event row {i} lacks field {f.name!r}")
                if f.name == "type" and isinstance(v, str):
                    v = EventType.parse(v)
                cols[f.name].append(int(v) if f.name != "value" else float(v))
        return cls(**{k: np.asarray(v, dtype=_DTYPES[k]) for k, v in cols.items()})

    def to_arrow(self) -> pa.Table:
        return pa.table({f.name: pa.array(getattr(self, f.name), type=f.type) for f in EVENT_SCHEMA}, schema=EVENT_SCHEMA)

    def take(self, idx: np.ndarray) -> "EventBatch":
        return EventBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def deduplicated(self) -> "EventBatch":
        """First occurrence of each event_id: the log is at-least-once, features are not.

        Remembered on the batch (its columns are never written in place): materialisation and
        the point-in-time join build one engine per feature set from the same log, and each
        asked again: one np.unique over the whole log per set."""
        d = self.__dict__
        if d.get("_unique") or len(self) == 0:
            return self
        if "_deduplicated" in d:
            return d["_deduplicated"]
        _, first = np.unique(self.event_id, return_index=True)
        if len(first) == len(self):
            object.__setattr__(self, "_unique", True)
            return self
        out = self.take(np.sort(first))
        object.__setattr__(out, "_unique", True)
        object.__setattr__(self, "_deduplicated", out)
        return out

    def sorted(self) -> "EventBatch":
        """Events in (ts, event_id) order: the order in which ties are broken everywhere."""
        return self.take(np.lexsort((self.event_id, self.ts)))

    @staticmethod
    def concat(batches: list["EventBatch"]) -> "EventBatch":
        if not batches:
            return EventBatch.empty()
        return EventBatch(**{f.name: np.concatenate([getattr(b, f.name) for b in batches]) for f in fields(EventBatch)})
