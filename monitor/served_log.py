"""The served log's format: one Parquet row per (request, logged item), shared by the writer
(server/served_log.py) and every reader (drift, skew, feedback joins, erasure).

Why one row per item rather than per request: drift, skew and feedback joins all work per
item, and Parquet's dictionary and run-length encodings make the repeated request fields cheap.
A request that returned nothing (an error) is one row with item_id -1.

Logged items are the k returned ones (position 0..k-1) and a few candidates drawn uniformly
from the whole candidate list (`sampled`; position -1 when not returned). Drift compares the
sampled rows with the release's reference, which was built over candidate rows too; the
returned ones are a biased sample (the ranker chose them) and serve skew checks and joins.

`features` holds the ranker's raw inputs for the item in the release's column order (NaN:
missing); the column names are in the file's metadata (`parity.columns`), one release per
file, since releases may read different columns.

No raw PII: the user id is the platform's internal numeric id (needed to join feedback,
recompute features and erase a user); request context, client addresses and metadata are
never logged.

Layout: DIR/dt=YYYY-MM-DD/<release_id>/part-<first ts_ms>-<pid>-<seq>.parquet. A part being
written is named `*.parquet.inprogress` and renamed when rotated; readers skip those. Ingested
feedback (monitor/feedback.py) lives beside it in DIR/feedback/dt=YYYY-MM-DD/part-*.parquet,
which the served-log readers skip. The names are built here (`day_partition`, `release_folder`,
`part_name`) so the writer and every reader agree on one layout.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["SCHEMA", "ARMS", "METHODS", "ServedRecord", "ServedBatch", "records_to_table", "part_files", "read_served_log",
           "COLUMNS_KEY", "RELEASE_KEY", "INPROGRESS", "FEEDBACK_DIR", "day_partition", "release_folder", "part_name"]

ARMS = ("primary", "canary", "shadow")
METHODS = ("Recommend", "Rank")
COLUMNS_KEY = b"parity.columns"
RELEASE_KEY = b"parity.release_id"
INPROGRESS = ".inprogress"
FEEDBACK_DIR = "feedback"  # DIR/feedback/: the feedback part log beside the served log
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def day_partition(ts_ms: int) -> str:
    """`dt=YYYY-MM-DD` of an event-time instant (UTC): the folder its rows go to."""
    return "dt=" + _dt.datetime.fromtimestamp(int(ts_ms) / 1000.0, tz=_dt.timezone.utc).strftime("%Y-%m-%d")


def release_folder(release_id: str) -> str:
    """A release id as one safe folder name (the id itself is kept exactly in the file metadata)."""
    name = _UNSAFE.sub("_", release_id or "")
    return name if name.strip(".") else "_unknown"


def part_name(first_ts_ms: int, pid: int, seq: int) -> str:
    """The finished name of a part; a part being written carries INPROGRESS after it."""
    return f"part-{int(first_ts_ms)}-{int(pid)}-{int(seq)}.parquet"

SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("ts_ms", pa.int64()),  # the request's as-of time (the server clock: event time when replaying)
    ("user_id", pa.int64()),
    ("release_id", pa.string()),
    ("arm", pa.string()),
    ("method", pa.string()),
    ("status", pa.string()),  # ok | degraded | error:<grpc code name>
    ("degraded_reason", pa.string()),  # null unless degraded
    ("latency_ms", pa.float32()),
    ("n_candidates", pa.int32()),
    ("item_id", pa.int64()),  # -1: the request logged no item (an error)
    ("position", pa.int32()),  # 0..k-1 in the response; -1: a sampled candidate that was not returned
    ("score", pa.float32()),
    ("source", pa.string()),  # candidate source: ann, content, fresh, popular, request
    ("sampled", pa.bool_()),  # drawn uniformly from the candidate list (drift reads these)
    ("features", pa.list_(pa.float32())),  # the ranker's raw inputs, release column order; NaN = missing
])


@dataclass(frozen=True)
class ServedRecord:
    """One request as the server saw it. Items are parallel arrays (may be empty)."""

    request_id: str
    ts_ms: int
    user_id: int
    release_id: str
    arm: str
    method: str
    status: str
    degraded_reason: str | None
    latency_ms: float
    n_candidates: int
    item_ids: np.ndarray  # int64
    positions: np.ndarray  # int32
    scores: np.ndarray  # float32
    sources: Sequence[str]
    sampled: np.ndarray  # bool
    features: np.ndarray | None  # (n items, n columns) float32, or None when no features were computed
    columns: tuple[str, ...]


def records_to_table(records: Sequence[ServedRecord]) -> pa.Table:
    """Rows of SCHEMA for records of ONE release (the columns of `features` must agree)."""
    if not records:
        return SCHEMA.empty_table()
    cols = {f.name: [] for f in SCHEMA}
    for r in records:
        n = len(r.item_ids)
        m = max(n, 1)
        for name, v in (("request_id", r.request_id), ("ts_ms", r.ts_ms), ("user_id", r.user_id), ("release_id", r.release_id),
                        ("arm", r.arm), ("method", r.method), ("status", r.status), ("degraded_reason", r.degraded_reason),
                        ("latency_ms", r.latency_ms), ("n_candidates", r.n_candidates)):
            cols[name].extend([v] * m)
        if n == 0:
            cols["item_id"].append(-1)
            cols["position"].append(-1)
            cols["score"].append(None)
            cols["source"].append(None)
            cols["sampled"].append(False)
            cols["features"].append(None)
            continue
        cols["item_id"].extend(np.asarray(r.item_ids, dtype=np.int64).tolist())
        cols["position"].extend(np.asarray(r.positions, dtype=np.int32).tolist())
        cols["score"].extend(np.asarray(r.scores, dtype=np.float32).tolist())
        cols["source"].extend(list(r.sources))
        cols["sampled"].extend(np.asarray(r.sampled, dtype=bool).tolist())
        if r.features is None:
            cols["features"].extend([None] * n)
        else:
            cols["features"].extend(list(np.asarray(r.features, dtype=np.float32)))
    return pa.table({name: pa.array(v, type=SCHEMA.field(name).type) for name, v in cols.items()}, schema=SCHEMA)


@dataclass(frozen=True)
class ServedBatch:
    """The logged rows of one release, with the names of its feature columns."""

    release_id: str
    columns: tuple[str, ...]
    table: pa.Table

    def feature_matrix(self, mask: np.ndarray | None = None) -> np.ndarray:
        """(rows, columns) float32; rows without features are all NaN."""
        t = self.table if mask is None else self.table.filter(pa.array(mask))
        out = np.full((t.num_rows, len(self.columns)), np.nan, dtype=np.float32)
        feats = t.column("features").to_pylist()
        for i, f in enumerate(feats):
            if f is not None and len(f) == len(self.columns):
                out[i] = f
        return out


def part_files(root: str | Path) -> list[Path]:
    """The finished parts under a served-log folder, oldest first (in-progress parts and the
    feedback log in DIR/feedback/ skipped)."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"served log folder {base} does not exist")
    feedback = base / FEEDBACK_DIR
    return sorted((p for p in base.rglob("part-*.parquet") if p.is_file() and feedback not in p.parents),
                  key=lambda p: (p.name, str(p)))


def _meta(path: Path) -> tuple[str, tuple[str, ...]]:
    md = pq.read_schema(path).metadata or {}
    cols = tuple(json.loads(md.get(COLUMNS_KEY, b"[]")))
    return md.get(RELEASE_KEY, b"").decode(), cols


def read_served_log(root: str | Path, *, since_ms: int | None = None, until_ms: int | None = None,
                    files: Iterable[Path] | None = None) -> list[ServedBatch]:
    """Every finished part, grouped by release, rows with since_ms <= ts_ms < until_ms."""
    groups: dict[tuple[str, tuple[str, ...]], list[pa.Table]] = {}
    for path in (part_files(root) if files is None else files):
        rid, cols = _meta(path)
        t = pq.read_table(path, schema=SCHEMA)
        if since_ms is not None:
            t = t.filter(pc.greater_equal(t["ts_ms"], since_ms))
        if until_ms is not None:
            t = t.filter(pc.less(t["ts_ms"], until_ms))
        if t.num_rows:
            groups.setdefault((rid, cols), []).append(t)
    return [ServedBatch(rid, cols, pa.concat_tables(ts)) for (rid, cols), ts in sorted(groups.items())]
