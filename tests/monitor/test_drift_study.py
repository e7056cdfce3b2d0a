"""A small run of bench/drift_study.py (one seed, 800 users, one 24 h window): the planted
topic-trend shift is found through the served log and the batch path, and a reference over the
served population alarms far less on traffic without the shift than the release's own."""
from __future__ import annotations

from pathlib import Path

from bench.drift_study import StudyConfig, run_seed
from monitor.drift import PREDICTION


def test_the_planted_shift_is_detected_and_a_serving_reference_alarms_less_without_it(tmp_path: Path):
    res = run_seed(0, tmp_path, StudyConfig(users=800, items=200, windows_h=(24,)))
    drift_topics = res["drift_topics"]
    shifted = res["shifted_columns"]
    # the truth is the planted mechanism: a shifted topic's share of the user's plays moved
    assert any(c == f"user_activity.topic_affinity[{t}]" for t in drift_topics for c in shifted)
    assert len(shifted) < res["columns"] // 4  # most columns did not move
    serving, release = res["references"]["serving/24h"], res["references"]["release/24h"]
    assert serving["missed"] == [] and sorted(serving["detected"]) == sorted(shifted)
    for d in serving["delays"].values():
        assert 0 < d["hours"] <= 72 and d["requests"] > 0
    assert serving["false_alarms"]["windows"] == 3 and serving["false_alarms"]["columns"] == res["columns"]
    assert PREDICTION in res["truth"]
    assert serving["false_alarms"]["rate"] < release["false_alarms"]["rate"]
