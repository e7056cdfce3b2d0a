"""A small run of bench/drift_study.py (one seed, 600 users, 24 h windows): the release's own
reference (served candidate rows) finds the planted topic-trend shift through the served log,
and the figures the calibration grid re-decides equal what drift_report decides."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.drift_study import MS_H, StudyConfig, alarms, evaluate, make_world, world_stats
from monitor.drift import PREDICTION, DriftThresholds, drift_report


def test_the_planted_shift_is_detected_and_the_grid_decides_as_drift_report_does(tmp_path: Path):
    w = make_world(0, tmp_path, StudyConfig(users=600, items=150, pre_hours=0))
    assert w.meta["reference_population"]["rows"] == "served_candidates"
    planted = [n for n, t in w.truth.items() if t.get("planted")]
    assert len(planted) == len(w.meta["drift_topics"]) == 3
    assert sum(t["shifted"] for t in w.truth.values()) < len(w.truth) // 4 and PREDICTION in w.truth
    st = world_stats(w, "release", 24, step_h=6)  # the study slides hourly; every 6 h keeps the test short
    th = DriftThresholds()
    res = evaluate(w, st, th)
    assert res["detected"], res  # at least one drifting topic's affinity alarms within the 3 days
    for d in res["delays"].values():
        assert d is None or (0 < d["hours"] <= 72 and d["hours"] % 6 == 0 and d["requests"] > 0)
    assert res["false_alarms"]["windows"] == 3 and res["false_alarms"]["columns"] == len(w.columns) + 1
    # the vectorised re-decision equals drift_report's own, window by window
    rows = w.rows["stable"]
    grid = alarms(st["fa"], th)
    for i, end in enumerate(st["fa"]["ends"].tolist()):
        X, p = rows.window(end - 24 * MS_H, end)
        rep = drift_report(w.reference, w.columns, X, p, th)
        assert set(rep.drifted) == {n for n, a in zip(st["fa"]["names"], grid[i]) if a}
    # a stricter threshold never alarms more
    assert alarms(st["fa"], DriftThresholds(psi=9, js=0.9)).sum() <= grid.sum()
    assert np.isfinite(st["slide"]["psi"]).any()
