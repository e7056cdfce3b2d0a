"""The device input matrix: BUNDLE_FORMAT.md's column order and formulas, on hand-made rows;
and the int8 embedding quantisation."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from export.device.inputs import list_rank_gap, DeviceFeatureSource, DeviceRows, device_columns, device_matrix, stat_columns
from export.device.quant import dequantize_rows, int8_round_trip, quantize_rows
from features.catalog import ItemCatalog
from features.events import EventBatch
from features.session import session_columns

FORMAT = Path(__file__).resolve().parents[2] / "mobile_sdk" / "BUNDLE_FORMAT.md"
T0 = 1_767_571_200_000  # 2026-01-05T00:00Z


def _format_column_patterns() -> list[str]:
    """The first cell of each row of the tiny ranker's column table, in order."""
    text = FORMAT.read_text()
    table = text[text.index("| column | value for candidate item i"):].split("\n\n")[0]
    return [re.findall(r"`([^`]+)`", line.split("|")[1]) for line in table.splitlines()[2:]]


def _pattern(col: str) -> str:
    if col.startswith("emb.prod["):
        return "emb.prod[j]"
    if col.startswith("session."):
        return "session.<entity>.<name>"
    if col.startswith("item.") and col[5:] in stat_columns("simulated"):
        return "item.<stat>"
    return col


def test_columns_follow_the_bundle_format_order():
    cols = device_columns("simulated", 4, item_item=True)
    want = [p for cell in _format_column_patterns() for p in cell]
    seen = list(dict.fromkeys(_pattern(c) for c in cols))
    assert seen == want
    assert "item.item_item" not in device_columns("simulated", 4)  # only for releases with an item-item model
    cols = device_columns("simulated", 4)
    assert cols[:8] == ("emb.dot", "emb.rank", "emb.gap", "emb.prod[0]", "emb.prod[1]", "emb.prod[2]", "emb.prod[3]", "item.plays_1d")
    assert cols[-len(session_columns("simulated")):] == session_columns("simulated")
    assert stat_columns("movielens") == ("ratings_7d", "ratings_30d", "rating_mean_30d", "ratings_decayed_30d")


def test_a_hand_made_row_has_the_hand_computed_values():
    u = np.array([[0.5, -1.0, 2.0], [np.nan] * 3], dtype=np.float32)
    e = np.array([[1.0, 0.25, -0.5], [1.0, 1.0, 1.0]], dtype=np.float32)
    now = T0 + 6 * 3_600_000  # 06:00 UTC
    stats = np.array([[1, 2, 3, 4, 5, 6, np.nan]] * 2, dtype=np.float32)
    session = np.zeros((2, len(session_columns("simulated"))))
    rows = DeviceRows(u, e, stats, np.array([now - 90 * 60_000, 0]), np.array([30.0, 0.0]), np.array([now, now]), session,
                      np.array([5, 6]), np.array([0, 0]))
    X = device_matrix("simulated", rows)
    c = {name: j for j, name in enumerate(device_columns("simulated", 3))}
    assert X.dtype == np.float32 and X.shape == (2, len(c))
    assert X[0, c["emb.dot"]] == np.float32(0.5 - 0.25 - 1.0)
    assert [X[0, c[f"emb.prod[{j}]"]] for j in range(3)] == [0.5, -0.25, -1.0]
    assert X[0, c["emb.rank"]] == 0.0 and X[0, c["emb.gap"]] == 0.0  # the only row of its list with a dot
    assert np.isnan(X[1, c["emb.dot"]]) and np.isnan(X[1, c["emb.prod[2]"]])  # no user embedding
    assert np.isnan(X[1, c["emb.rank"]]) and np.isnan(X[1, c["emb.gap"]])
    assert X[0, c["item.age_h"]] == np.float32(1.5) and np.isnan(X[1, c["item.age_h"]])
    assert X[0, c["item.duration_s"]] == 30.0 and np.isnan(X[1, c["item.duration_s"]])
    assert abs(X[0, c["context.hour_sin"]] - 1.0) < 1e-7 and abs(X[0, c["context.hour_cos"]]) < 1e-7  # a quarter day
    assert X[0, c["item.plays_1d"]] == 1.0 and np.isnan(X[0, c["item.plays_decayed_6h"]])


def test_rank_and_gap_are_relative_to_each_list():
    dot = np.array([0.5, 0.9, 0.5, np.nan, 0.2, 0.7], dtype=np.float32)
    item = np.array([9, 3, 4, 1, 8, 2])
    lists = np.array([0, 0, 0, 0, 1, 1])
    rank, gap = list_rank_gap(dot, item, lists)
    assert rank[:3].tolist() == [2.0, 0.0, 1.0]  # 0.9 first; the two 0.5 ties by item id (4 before 9)
    assert np.isnan(rank[3]) and np.isnan(gap[3])
    assert rank[4:].tolist() == [1.0, 0.0]
    assert gap.tolist()[:3] == [np.float32(0.5) - np.float32(0.9), 0.0, np.float32(0.5) - np.float32(0.9)]
    assert gap[4] == np.float32(0.2) - np.float32(0.7) and gap[5] == 0.0


def test_session_and_stat_columns_come_point_in_time_from_the_log():
    ev = lambda i, ts, typ, item=7, topic=2, value=1.0: dict(event_id=i, ts=ts, user_id=1, item_id=item, creator_id=3,  # noqa: E731
                                                           topic=topic, session_id=5, type=typ, value=value)
    now = T0 + 10 * 3_600_000
    rows = [ev(1, now - 40 * 60_000, 1, value=50.0),  # a play outside the session window
            ev(2, now - 10 * 60_000, 0), ev(3, now - 9 * 60_000, 1, value=20.0), ev(4, now - 8 * 60_000, 2),
            ev(5, now - 5 * 60_000, 1, item=8, topic=4, value=5.0), ev(6, now, 1, value=99.0)]  # the last one is not before now
    items = ItemCatalog(np.array([7, 8]), np.array([2, 4], np.int32), np.array([3, 3]), np.array([60.0, 0.0]), np.array([T0, T0]))
    src = DeviceFeatureSource("simulated", 20, EventBatch.from_rows(rows), items)
    u = np.ones((1, 2), np.float32)
    X = src.matrix(u, u, np.array([1]), np.array([7]), now, np.array([0]))
    c = {name: j for j, name in enumerate(device_columns("simulated", 2))}
    assert X[0, c["session.user.engaged"]] == 3.0  # plays 3 and 5, like 4
    assert X[0, c["session.user.watch_s"]] == 25.0
    assert X[0, c["session.topic.engaged"]] == 2.0  # topic 2: play 3 and like 4
    assert X[0, c["session.item.impressions"]] == 1.0
    assert X[0, c["session.user.skips"]] == 0.0
    assert X[0, c["item.plays_1d"]] == 2.0  # item 7's plays 1 and 3 (not the one at now)
    assert X[0, c["item.watch_s_mean_7d"]] == 35.0
    assert X[0, c["item.age_h"]] == 10.0


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)),
                  elements=st.floats(-1e3, 1e3, allow_nan=False, width=32)))
def test_int8_round_trip_is_within_half_a_step(e):
    r = quantize_rows(e)
    assert r.q.dtype == np.int8 and r.scale.dtype == np.float32 and np.all(np.abs(r.q.astype(int)) <= 127)
    m = np.abs(e).max(axis=1)
    np.testing.assert_array_equal(r.scale, np.where(m > 1e-30, m / np.float32(127), 1).astype(np.float32))
    deq = dequantize_rows(r.q, r.scale)
    err = np.abs(deq.astype(np.float64) - e)
    assert np.all(err <= r.scale[:, None] / 2 * (1 + 1e-5) + 1e-30)
    assert np.all(np.abs(r.q[m > 1e-30]).max(axis=1) == 127)


def test_a_row_too_small_for_a_float32_scale_is_a_zero_row():
    """Hypothesis found it: max |e| = 1.2e-42 made a subnormal scale and a largest q of 121."""
    r = quantize_rows(np.array([[1.19e-42, 0.0], [1e-3, -2e-3]], dtype=np.float32))
    assert r.scale[0] == 1.0 and not r.q[0].any()
    assert np.abs(r.q[1]).max() == 127


def test_zero_rows_have_scale_one_and_missing_rows_stay_missing():
    r = quantize_rows(np.zeros((2, 3)))
    assert r.scale.tolist() == [1.0, 1.0] and not r.q.any()
    out = int8_round_trip(np.array([[1.0, -2.0], [np.nan, np.nan]]))
    assert np.isnan(out[1]).all() and math.isclose(float(out[0, 1]), -2.0, rel_tol=1e-6)
