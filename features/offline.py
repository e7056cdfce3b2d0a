"""The offline store: per feature-set views of the event log on Parquet, read with DuckDB.

Each feature set version gets `ROOT/{set}/{version}/events.parquet`: only the events it
consumes (its sources, valid entity), sorted by entity and time, plus `view.json` with the
lineage (definition, source event types, the log fingerprint it was built from). The
point-in-time join reads these views, not the whole log.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.atomic import write_atomic
from features.definitions import FeatureSet
from features.eventlog import EventLog
from features.events import EVENT_SCHEMA, EventBatch

__all__ = ["OfflineStore", "ViewInfo", "log_fingerprint"]


@dataclass(frozen=True)
class ViewInfo:
    feature_set: str
    version: str
    rows: int
    min_ts: int
    max_ts: int
    source_event_types: list[str]
    log_fingerprint: str
    built_at_ms: int


def log_fingerprint(events: EventBatch) -> str:
    """A content hash of an event batch (order-independent: sorted by event id)."""
    h = hashlib.sha256()
    order = np.lexsort((events.ts, events.event_id))
    for name in EVENT_SCHEMA.names:
        h.update(np.ascontiguousarray(getattr(events, name)[order]).tobytes())
    return h.hexdigest()[:16]


class OfflineStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _dir(self, fs: FeatureSet) -> Path:
        return self.root / fs.name / fs.version

    def build(self, log: EventLog, sets: Sequence[FeatureSet], until_ts: int | None = None) -> list[ViewInfo]:
        """(Re)build the views from the log; atomic per view (temp file, then rename)."""
        events = log.read(end_ts=until_ts, must_exist=True)
        fp = log_fingerprint(events)
        out = []
        for fs in sets:
            sub = events.take(np.flatnonzero(fs.event_mask(events)))
            codes = fs.entity.codes(sub)[0]
            sub = sub.take(np.lexsort((sub.event_id, sub.ts, codes)))
            d = self._dir(fs)
            d.mkdir(parents=True, exist_ok=True)
            table = sub.to_arrow()
            write_atomic(d / "events.parquet", lambda f: pq.write_table(table, f))
            info = ViewInfo(
                fs.name,
                fs.version,
                len(sub),
                int(sub.ts.min()) if len(sub) else -1,
                int(sub.ts.max()) if len(sub) else -1,
                sorted({t.name.lower() for s in fs.sources for t in s.event_types}),
                fp,
                int(time.time() * 1000),
            )
            (d / "view.json").write_text(
                json.dumps({"info": info.__dict__, "definition": fs.definition()}, indent=2, sort_keys=True)
            )
            out.append(info)
        return out

    def has(self, fs: FeatureSet) -> bool:
        return (self._dir(fs) / "events.parquet").exists()

    def info(self, fs: FeatureSet) -> ViewInfo:
        p = self._dir(fs) / "view.json"
        if not p.exists():
            raise FileNotFoundError(f"no offline view for {fs.name} {fs.version} under {self.root}; run `parity features materialize --offline`")
        return ViewInfo(**json.loads(p.read_text())["info"])

    def events(self, fs: FeatureSet, end_ts: int | None = None) -> EventBatch:
        p = self._dir(fs) / "events.parquet"
        if not p.exists():
            raise FileNotFoundError(f"no offline view for {fs.name} {fs.version} under {self.root}; run `parity features materialize --offline`")
        con = duckdb.connect()
        try:
            where = f" WHERE ts < {int(end_ts)}" if end_ts is not None else ""
            table = con.sql(f"SELECT * FROM read_parquet('{p.as_posix()}'){where}").to_arrow_table()
        finally:
            con.close()
        return EventBatch.from_arrow(table.cast(EVENT_SCHEMA)) if table.num_rows else EventBatch.empty()

    def delete_user(self, user_id: int) -> int:
        """Remove one user's rows from every view; returns rows removed."""
        removed = 0
        for p in sorted(self.root.glob("*/*/events.parquet")):
            table = pq.read_table(p)
            keep = pa.compute.not_equal(table["user_id"], pa.scalar(int(user_id), pa.int64()))
            n_keep = pa.compute.sum(keep.cast(pa.int64())).as_py() or 0
            if n_keep == table.num_rows:
                continue
            removed += table.num_rows - n_keep
            kept = table.filter(keep)
            write_atomic(p, lambda f: pq.write_table(kept, f))
        return removed

    def retire(self, fs: FeatureSet) -> bool:
        d = self._dir(fs)
        if not d.exists():
            return False
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
        return True
