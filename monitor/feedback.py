"""Feedback joined to what was served: business metrics per request and per arm.

Why a log of its own: live events reach the online store and are gone from the server's point
of view; to know whether a canary's answers were watched, impressions, plays, likes and skips
are kept beside the served log (DIR/feedback/dt=YYYY-MM-DD/part-*.parquet, written by the same
part writer, server/served_log.py) and joined to the requests that served the item:

- by `request_id` when the event carries one (the client echoes the Recommend response's id);
  the request must be the same user's (a client cannot credit another user's request);
- else by (user, item) to the latest logged request at or before the event time that returned
  the item, within a horizon (default 1 h).

Shadow requests are never shown to anyone, so they are no join target and have no metrics.
Ingest is at-least-once (a resent stream reaches the feedback log again), so readers dedupe
by event_id: the effect is exactly-once, as in the feature store.

The served log is sampled (every error and degraded answer kept, the rest by request id), so
per-arm figures over it over-represent errors and degraded answers the same way in every arm;
compare arms with each other, not with an unsampled total.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.events import EventBatch, EventType
from monitor.served_log import FEEDBACK_DIR, SCHEMA, ServedBatch

__all__ = ["FEEDBACK_SCHEMA", "FEEDBACK_TYPES", "DEFAULT_HORIZON_MS", "feedback_mask", "feedback_table", "feedback_files",
           "read_feedback", "served_rows", "join_feedback", "FeedbackJoin", "ArmMetrics", "REQUEST_METRICS"]

FEEDBACK_SCHEMA = pa.schema([
    pa.field("event_id", pa.int64(), nullable=False),
    pa.field("ts_ms", pa.int64(), nullable=False),  # event time
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("item_id", pa.int64(), nullable=False),
    pa.field("type", pa.string(), nullable=False),  # EventType name, lower case
    pa.field("value", pa.float64(), nullable=False),  # seconds watched for a play, 1 for counted events
    pa.field("request_id", pa.string()),  # null: the client did not say which request served the item
])
FEEDBACK_TYPES = ("impression", "play", "like", "skip")
DEFAULT_HORIZON_MS = 3_600_000
REQUEST_METRICS = ("impressions", "plays", "watch_s", "likes", "skips")

_TYPE_NAMES = np.asarray([t.name.lower() for t in sorted(EventType, key=int)], dtype=object)
_FEEDBACK_CODES = np.asarray([int(EventType[t.upper()]) for t in FEEDBACK_TYPES], dtype=np.int8)


def feedback_mask(events: EventBatch, request_ids: Sequence[str | None]) -> np.ndarray:
    """Which events belong in the feedback log: any that names its request, and every
    impression, play, like and skip (ratings without a request id are not feedback on a list)."""
    has_id = np.fromiter((bool(r) for r in request_ids), dtype=bool, count=len(request_ids))
    return has_id | np.isin(events.type, _FEEDBACK_CODES)


def feedback_table(events: EventBatch, request_ids: Sequence[str | None]) -> pa.Table:
    """Rows of FEEDBACK_SCHEMA for events and their request ids ('' or None: none)."""
    if len(request_ids) != len(events):
        raise ValueError(f"{len(request_ids)} request ids for {len(events)} events")
    rid = pa.array([r or None for r in request_ids], type=pa.string())
    return pa.table({
        "event_id": pa.array(events.event_id, pa.int64()),
        "ts_ms": pa.array(events.ts, pa.int64()),
        "user_id": pa.array(events.user_id, pa.int64()),
        "item_id": pa.array(events.item_id, pa.int64()),
        "type": pa.array(_TYPE_NAMES[events.type.astype(np.int64)], pa.string()),
        "value": pa.array(events.value, pa.float64()),
        "request_id": rid,
    }, schema=FEEDBACK_SCHEMA)


def feedback_files(root: str | Path) -> list[Path]:
    """Finished feedback parts under a served-log folder (DIR/feedback/), oldest first."""
    base = Path(root) / FEEDBACK_DIR
    if not base.is_dir():
        return []
    return sorted((p for p in base.rglob("part-*.parquet") if p.is_file()), key=lambda p: (p.name, str(p)))


def read_feedback(root: str | Path, *, since_ms: int | None = None, until_ms: int | None = None) -> pa.Table:
    """Every finished feedback row (since_ms <= ts_ms < until_ms), one per event_id (the first
    written: a resent event is the same event), in event-time order."""
    tables = [pq.read_table(p, schema=FEEDBACK_SCHEMA) for p in feedback_files(root)]
    t = pa.concat_tables(tables) if tables else FEEDBACK_SCHEMA.empty_table()
    if since_ms is not None:
        t = t.filter(pc.greater_equal(t["ts_ms"], since_ms))
    if until_ms is not None:
        t = t.filter(pc.less(t["ts_ms"], until_ms))
    if t.num_rows:
        _, first = np.unique(t.column("event_id").to_numpy(), return_index=True)
        t = t.take(pa.array(np.sort(first))).sort_by([("ts_ms", "ascending"), ("event_id", "ascending")])
    return t


def served_rows(batches: Sequence[ServedBatch]) -> pa.Table:
    """The served log's rows of every release without the feature lists (what joins need)."""
    keep = ["request_id", "ts_ms", "user_id", "release_id", "arm", "method", "status", "item_id", "position"]
    tables = [b.table.select(keep) for b in batches]
    if not tables:
        return pa.schema([SCHEMA.field(n) for n in keep]).empty_table()
    return pa.concat_tables(tables)


@dataclass(frozen=True)
class ArmMetrics:
    """Business figures of one arm over its logged (non-shadow) requests."""

    arm: str
    requests: int
    impressions: int
    plays: int
    watch_s: float
    likes: int
    skips: int

    @property
    def click_through(self) -> float:
        """Plays per impression (NaN without impressions)."""
        return self.plays / self.impressions if self.impressions else float("nan")

    @property
    def watch_s_per_request(self) -> float:
        return self.watch_s / self.requests if self.requests else float("nan")

    def summary(self) -> dict:
        return {"arm": self.arm, "requests": self.requests, "impressions": self.impressions, "plays": self.plays,
                "watch_s": self.watch_s, "likes": self.likes, "skips": self.skips, "click_through": self.click_through,
                "watch_s_per_request": self.watch_s_per_request}


@dataclass(frozen=True)
class FeedbackJoin:
    """Per logged request: its feedback counts (`requests`: request_id, ts_ms, user_id,
    release_id, arm, status, impressions, plays, watch_s, likes, skips); per arm: the sums; and
    how each feedback event was matched."""

    requests: pa.Table
    arms: tuple[ArmMetrics, ...]
    events: int
    by_request_id: int
    by_user_item: int
    unmatched: int

    def arm(self, name: str) -> ArmMetrics:
        for a in self.arms:
            if a.arm == name:
                return a
        return ArmMetrics(name, 0, 0, 0, 0.0, 0, 0)

    def summary(self) -> dict:
        return {"events": self.events, "by_request_id": self.by_request_id, "by_user_item": self.by_user_item,
                "unmatched": self.unmatched, "arms": [a.summary() for a in self.arms]}


_MATCH_SQL = """
CREATE TEMP TABLE matched AS
WITH
req AS (SELECT DISTINCT request_id, user_id FROM served WHERE arm <> 'shadow'),
shown AS (  -- fallback targets: items a request returned, one request per (user, item, ts)
  SELECT user_id, item_id, ts_ms, max(request_id) AS request_id
  FROM served WHERE arm <> 'shadow' AND position >= 0 AND item_id >= 0 GROUP BY user_id, item_id, ts_ms
),
by_ui AS (
  SELECT f.event_id, s.request_id, f.user_id, f.ts_ms - s.ts_ms AS lag
  FROM (SELECT * FROM fb WHERE request_id IS NULL) f
  ASOF JOIN shown s ON f.user_id = s.user_id AND f.item_id = s.item_id AND f.ts_ms >= s.ts_ms
)
SELECT f.event_id, r.request_id, r.user_id, 'id' AS how
FROM fb f JOIN req r ON f.request_id = r.request_id AND f.user_id = r.user_id
UNION ALL
SELECT event_id, request_id, user_id, 'user_item' AS how FROM by_ui WHERE lag <= $horizon
"""

_REQUESTS_SQL = """
WITH
req AS (  -- one row per logged request: a reused id keeps its latest request
  SELECT request_id, user_id, max(ts_ms) AS ts_ms, arg_max(release_id, ts_ms) AS release_id,
         arg_max(arm, ts_ms) AS arm, arg_max(status, ts_ms) AS status
  FROM served WHERE arm <> 'shadow' GROUP BY request_id, user_id
),
per_req AS (
  SELECT m.request_id, m.user_id,
         count(*) FILTER (WHERE f.type = 'impression') AS impressions,
         count(*) FILTER (WHERE f.type = 'play') AS plays,
         coalesce(sum(f.value) FILTER (WHERE f.type = 'play'), 0.0) AS watch_s,
         count(*) FILTER (WHERE f.type = 'like') AS likes,
         count(*) FILTER (WHERE f.type = 'skip') AS skips
  FROM matched m JOIN fb f USING (event_id) GROUP BY m.request_id, m.user_id
)
SELECT r.request_id, r.ts_ms, r.user_id, r.release_id, r.arm, r.status,
       coalesce(p.impressions, 0)::BIGINT AS impressions, coalesce(p.plays, 0)::BIGINT AS plays,
       coalesce(p.watch_s, 0.0)::DOUBLE AS watch_s, coalesce(p.likes, 0)::BIGINT AS likes, coalesce(p.skips, 0)::BIGINT AS skips
FROM req r LEFT JOIN per_req p ON p.request_id = r.request_id AND p.user_id = r.user_id
ORDER BY r.ts_ms, r.request_id
"""


def join_feedback(served: pa.Table, feedback: pa.Table, *, horizon_ms: int = DEFAULT_HORIZON_MS) -> FeedbackJoin:
    """Feedback events joined to the logged requests (see the module docstring).

    `served`: rows with request_id, ts_ms, user_id, release_id, arm, status, item_id, position
    (`served_rows(read_served_log(DIR))`); `feedback`: FEEDBACK_SCHEMA rows (`read_feedback(DIR)`,
    already one per event_id). Every logged non-shadow request gets a row, with zeros when
    nothing was joined to it, so watch time per request averages over everything served."""
    if isinstance(horizon_ms, bool) or not isinstance(horizon_ms, (int, np.integer)):
        raise TypeError(f"horizon_ms must be an int, got {horizon_ms!r}")
    if horizon_ms < 0:
        raise ValueError(f"horizon_ms must be >= 0, got {horizon_ms}")
    con = duckdb.connect()
    try:
        con.register("served", served)
        con.register("fb", feedback)
        con.execute(_MATCH_SQL, {"horizon": int(horizon_ms)})
        how = dict(con.execute("SELECT how, count(*) FROM matched GROUP BY how").fetchall())
        requests = con.sql(_REQUESTS_SQL).to_arrow_table()
    finally:
        con.close()
    arms = _arm_metrics(requests)
    n, by_id, by_ui = feedback.num_rows, int(how.get("id", 0)), int(how.get("user_item", 0))
    return FeedbackJoin(requests, arms, n, by_id, by_ui, n - by_id - by_ui)


def _arm_metrics(requests: pa.Table) -> tuple[ArmMetrics, ...]:
    if requests.num_rows == 0:
        return ()
    arm = np.asarray(requests.column("arm").to_pylist(), dtype=object)
    cols = {m: requests.column(m).to_numpy() for m in REQUEST_METRICS}
    out = []
    for a in sorted(set(arm.tolist())):
        sel = arm == a
        out.append(ArmMetrics(a, int(sel.sum()), int(cols["impressions"][sel].sum()), int(cols["plays"][sel].sum()),
                              float(cols["watch_s"][sel].sum()), int(cols["likes"][sel].sum()), int(cols["skips"][sel].sum())))
    return tuple(out)
