"""Feedback joins to the request that served the item: by request id when the event names it
(the same user's request only), else by (user, item) to the latest logged request at or before
the event that returned the item, within the horizon; shadow answers are never credited."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from features.events import EventBatch
from monitor.feedback import FEEDBACK_SCHEMA, join_feedback, read_feedback, served_rows
from monitor.served_log import ServedRecord, read_served_log
from server.served_log import FeedbackLogWriter, ServedLogWriter

T0 = 1_767_225_600_000
H = 3_600_000


def _served(rows: list[tuple[str, int, int, str, int, int]]) -> pa.Table:
    """(request_id, ts offset, user, arm, item, position) rows."""
    cols = list(zip(*rows, strict=True))
    return pa.table({"request_id": list(cols[0]), "ts_ms": [T0 + t for t in cols[1]], "user_id": list(cols[2]),
                     "release_id": ["rel-canary" if a == "canary" else "rel-1" for a in cols[3]], "arm": list(cols[3]),
                     "method": ["Recommend"] * len(rows), "status": ["ok"] * len(rows), "item_id": list(cols[4]),
                     "position": pa.array(cols[5], pa.int32())})


def _feedback(rows: list[tuple[int, int, int, int, str, float, str | None]]) -> pa.Table:
    """(event_id, ts offset, user, item, type, value, request_id) rows."""
    cols = list(zip(*rows, strict=True))
    return pa.table({"event_id": list(cols[0]), "ts_ms": [T0 + t for t in cols[1]], "user_id": list(cols[2]), "item_id": list(cols[3]),
                     "type": list(cols[4]), "value": list(cols[5]), "request_id": list(cols[6])}, schema=FEEDBACK_SCHEMA)


SERVED = _served([
    ("a", 1000, 1, "primary", 10, 0), ("a", 1000, 1, "primary", 11, 1),
    ("b", 5000, 1, "canary", 10, 0), ("b", 5000, 1, "canary", 12, 1),
    ("s", 5000, 1, "shadow", 10, 0), ("s", 5500, 1, "shadow", 11, 0),  # a shadow answer is never shown
    ("c", 2000, 2, "primary", 10, 0), ("c", 2000, 2, "primary", 99, -1),  # 99: sampled, not returned
])


def test_feedback_joins_by_request_id_else_by_user_item_and_time_within_the_horizon():
    fb = _feedback([
        (1, 6000, 1, 10, "impression", 1.0, "a"),  # names request a: credited there, not to the later b
        (2, 6000, 1, 10, "play", 30.0, None),  # latest request of user 1 that returned item 10 before 6000: b
        (3, 5600, 1, 11, "play", 20.0, None),  # only a returned 11 (the shadow's later answer does not count)
        (4, 500, 1, 10, "like", 1.0, None),  # before any request
        (5, 2000 + H + 1, 2, 10, "impression", 1.0, None),  # past the 1 h horizon
        (6, 2500, 2, 99, "impression", 1.0, None),  # a sampled candidate was not shown
        (7, 2500, 2, 10, "skip", 1.0, "a"),  # another user's request id
        (8, 2500, 2, 10, "impression", 1.0, "zzz"),  # an unlogged request: no fallback to another request
        (9, 5000, 1, 12, "impression", 1.0, None),  # at the request time: "at or before"
    ])
    j = join_feedback(SERVED, fb)
    assert (j.events, j.by_request_id, j.by_user_item, j.unmatched) == (9, 1, 3, 5)
    got = {r["request_id"]: r for r in j.requests.to_pylist()}
    assert set(got) == {"a", "b", "c"}  # every logged non-shadow request, feedback or not
    metrics = ("impressions", "plays", "watch_s", "likes", "skips")
    assert {k: tuple(got[k][m] for m in metrics) for k in got} == {"a": (1, 1, 20.0, 0, 0), "b": (1, 1, 30.0, 0, 0), "c": (0, 0, 0.0, 0, 0)}
    primary, canary = j.arm("primary"), j.arm("canary")
    assert (primary.requests, primary.impressions, primary.plays, primary.watch_s) == (2, 1, 1, 20.0)
    assert primary.click_through == 1.0 and primary.watch_s_per_request == 10.0
    assert (canary.requests, canary.watch_s_per_request) == (1, 30.0)
    assert [a.arm for a in j.arms] == ["canary", "primary"]
    assert np.isnan(j.arm("shadow").click_through)


def test_the_horizon_bounds_the_fallback():
    fb = _feedback([(1, 1000 + 10, 1, 11, "play", 5.0, None)])
    assert join_feedback(SERVED, fb, horizon_ms=10).by_user_item == 1
    assert join_feedback(SERVED, fb, horizon_ms=9).unmatched == 1
    with pytest.raises(ValueError, match="horizon_ms must be >= 0"):
        join_feedback(SERVED, fb, horizon_ms=-1)


def test_written_logs_join_and_a_resent_event_counts_once(tmp_path):
    n = 3
    rec = ServedRecord("req-1", T0, 7, "rel-1", "primary", "Recommend", "ok", None, 2.0, 50, np.arange(n, dtype=np.int64) + 100,
                       np.arange(n, dtype=np.int32), np.ones(n, np.float32), ["ann"] * n, np.zeros(n, bool),
                       np.zeros((n, 1), np.float32), ("user_activity.plays_1h",))
    with ServedLogWriter(tmp_path) as w:
        w.offer(rec)
    ev = EventBatch.from_rows([dict(event_id=1, ts=T0 + 5, user_id=7, item_id=101, type="impression", value=1.0),
                               dict(event_id=2, ts=T0 + 9, user_id=7, item_id=101, type="play", value=12.5)])
    with FeedbackLogWriter(tmp_path) as fw:
        fw.on_feedback(ev, ("req-1", None))
        fw.on_feedback(ev, ("req-1", None))  # at-least-once delivery
    j = join_feedback(served_rows(read_served_log(tmp_path)), read_feedback(tmp_path))
    assert (j.events, j.by_request_id, j.by_user_item) == (2, 1, 1)
    assert j.arm("primary").summary() == {"arm": "primary", "requests": 1, "impressions": 1, "plays": 1, "watch_s": 12.5, "likes": 0,
                                          "skips": 0, "click_through": 1.0, "watch_s_per_request": 12.5}


def test_no_feedback_yet_gives_every_request_zeros():
    j = join_feedback(SERVED, FEEDBACK_SCHEMA.empty_table())
    assert j.requests.num_rows == 3 and sum(j.requests.column("plays").to_pylist()) == 0
    assert (j.events, j.unmatched) == (0, 0)
