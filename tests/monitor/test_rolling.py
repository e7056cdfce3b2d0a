"""The rolling drift reference: yesterday's served rows, not the release's training-time ones."""
from __future__ import annotations

import numpy as np

from export.reference import column_references, histogram_reference
from monitor.drift import DriftThresholds, drift_report
from monitor.rolling import RollingRows, rolling_report

H = 3_600_000
COLS = ("a.x", "a.y")
TH = DriftThresholds()


def _feed(rows: RollingRows, rng, start_h: int, hours: int, per_hour: int, shift_y: float) -> None:
    for h in range(start_h, start_h + hours):
        X = rng.normal(size=(per_hour, 2))
        X[:, 1] += shift_y
        rows.add(X, rng.normal(size=per_hour), np.full(per_hour, h * H + 1))


def test_a_settled_change_alarms_against_the_release_but_not_against_the_rolling_reference():
    rng = np.random.default_rng(0)
    release = {"features": column_references(rng.normal(size=(5000, 2)), COLS), "prediction": histogram_reference(rng.normal(size=5000), 20)}
    rows = RollingRows(COLS)
    _feed(rows, rng, 0, 60, 500, 0.8)  # the world moved before these 60 h and stayed there
    now = 59 * H + 10
    rep, _ = rolling_report(rows, now, window_ms=6 * H, reference_ms=48 * H, thresholds=TH)
    assert rep.drifted == ()
    X, p, _ = rows.rows(now - 6 * H + H, now + H)
    assert "a.y" in drift_report(release, list(COLS), X, p, TH).drifted


def test_a_fresh_shift_in_the_window_alarms_against_the_rolling_reference():
    rng = np.random.default_rng(1)
    rows = RollingRows(COLS)
    _feed(rows, rng, 0, 54, 500, 0.0)
    _feed(rows, rng, 54, 6, 500, 1.0)
    rep, ref = rolling_report(rows, 59 * H + 10, window_ms=6 * H, reference_ms=48 * H, thresholds=TH)
    assert rep.drifted == ("a.y",)
    assert abs(ref["features"]["a.y"]["edges"][len(ref["features"]["a.y"]["edges"]) // 2]) < 0.2  # built on the unshifted days


def test_no_rolling_reference_until_enough_history():
    rng = np.random.default_rng(2)
    rows = RollingRows(COLS)
    _feed(rows, rng, 0, 8, 100, 0.0)  # 2 h before the window: 200 rows < 2000
    assert rolling_report(rows, 7 * H + 10, window_ms=6 * H, reference_ms=48 * H, thresholds=TH) is None


def test_hours_are_pooled_in_proportion_to_what_they_served_and_old_hours_expire():
    rows = RollingRows(COLS, per_bucket=100, keep_ms=10 * H)
    rows.add(np.zeros((1000, 2)), np.zeros(1000), np.full(1000, 0 * H + 1))  # a busy hour: 1000 rows, 100 kept
    rows.add(np.ones((100, 2)), np.ones(100), np.full(100, 1 * H + 1))  # a quiet one: 100 rows, all kept
    X, _, seen = rows.rows(0, 2 * H)
    assert seen == 1100 and (X[:, 0] == 0).sum() == 10 * (X[:, 0] == 1).sum()
    rows.add(np.ones((1, 2)), np.ones(1), np.array([12 * H]))
    assert rows.rows(0, 2 * H)[2] == 0  # gone after keep_ms


def test_the_rolling_reference_is_rebuilt_only_when_the_window_moves_a_bucket():
    rng = np.random.default_rng(3)
    rows = RollingRows(COLS)
    _feed(rows, rng, 0, 60, 500, 0.0)
    cache: dict = {}
    _, a = rolling_report(rows, 59 * H + 10, window_ms=6 * H, reference_ms=48 * H, thresholds=TH, cache=cache)
    _, b = rolling_report(rows, 59 * H + 20 * 60_000, window_ms=6 * H, reference_ms=48 * H, thresholds=TH, cache=cache)
    assert a is b  # same hour: the same reference object
    _feed(rows, rng, 60, 1, 500, 0.0)
    _, c = rolling_report(rows, 60 * H + 10, window_ms=6 * H, reference_ms=48 * H, thresholds=TH, cache=cache)
    assert c is not a and list(cache) == [61 * H - 6 * H]
