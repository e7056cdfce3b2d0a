"""The mode plan for a fixed input: the cheapest mode that keeps quality and latency, with reasons."""
from __future__ import annotations

import json

import pytest

from features.freshness_plan import CADENCES_MS, MINUTE_MS, ModeCost, SetLoad, as_json, load_tolerance, load_trade, plan_modes

COSTS = {
    # light: few events, small state; computing on read is cheap
    "user_activity": {
        "streaming": ModeCost(40e-6, 0.0, 0.0, 2300, 0.01),
        "materialized": ModeCost(0.0, 30e-6, 0.0, 2300, 0.01),
        "on_read": ModeCost(3e-6, 0.0, 0.4, 900, 0.02),
    },
    # heavy: many events per entity; on read it blows the latency budget
    "user_creator": {
        "streaming": ModeCost(25e-6, 0.0, 0.0, 400),
        "materialized": ModeCost(0.0, 20e-6, 0.0, 400),
        "on_read": ModeCost(3e-6, 0.0, 7.5, 4000, 2.0),
    },
    "item_popularity": {
        "streaming": ModeCost(30e-6, 0.0, 0.0, 2000),
        "materialized": ModeCost(0.0, 25e-6, 0.0, 2000),
    },
}


def _per(hourly: float) -> dict[int, float]:
    return {c: hourly * c / (60 * MINUTE_MS) for c in CADENCES_MS}


def test_the_plan_picks_the_cheapest_mode_that_keeps_quality_and_latency_and_says_why():
    loads = {
        "user_activity": SetLoad(events_per_s=200.0, entities_per_window=_per(5000), staleness_tolerance_ms=0.0),
        "user_creator": SetLoad(events_per_s=150.0, entities_per_window=_per(20000), staleness_tolerance_ms=6 * 60 * MINUTE_MS),
        "item_popularity": SetLoad(events_per_s=200.0, entities_per_window=_per(400), staleness_tolerance_ms=2 * MINUTE_MS),
    }
    plan = {c.feature_set: c for c in plan_modes(COSTS, loads, qps=200.0, latency_budget_ms=5.0)}
    # cheap appends beat folding every event, and the read fits: on_read
    assert plan["user_activity"].mode == "on_read" and "inside the budget" in plan["user_activity"].why
    assert "no staleness tolerated" in plan["user_activity"].rejected["materialized"]
    # tolerant of 6 h: materialised every 6 h costs less than streaming 150 events/s
    uc = plan["user_creator"]
    assert (uc.mode, uc.every_ms) == ("materialized", 6 * 60 * MINUTE_MS)
    assert "7.50 ms" in uc.rejected["on_read"]
    assert uc.cpu_s_per_s == pytest.approx((20000 * 6) * 20e-6 / (6 * 3600))  # the entities a 6-hour run rewrites
    # 2 minutes of tolerance is shorter than any cadence, on_read not measured: streaming
    ip = plan["item_popularity"]
    assert ip.mode == "streaming" and ip.rejected["on_read"] == "not measured"
    doc = json.loads(as_json(list(plan.values())))
    assert {c["feature_set"]: c["mode"] for c in doc["plan"]} == {"user_activity": "on_read", "user_creator": "materialized", "item_popularity": "streaming"}


def test_a_set_without_measurements_or_with_no_fitting_mode_keeps_streaming_and_says_so():
    loads = {"other": SetLoad(1.0, _per(1.0), 0.0), "user_creator": SetLoad(1.0, _per(1.0), 0.0)}
    choices = plan_modes(COSTS, loads, qps=10.0, latency_budget_ms=0.0)
    plan = {c.feature_set: c for c in choices}
    assert plan["other"].mode == "streaming" and "no measured costs" in plan["other"].why
    assert {c["feature_set"]: c["cpu_s_per_s"] for c in json.loads(as_json(choices))["plan"]}["other"] is None  # strict JSON: no NaN
    assert plan["user_creator"].mode == "streaming"


def test_the_inputs_parse_from_the_benchmark_and_backtest_documents():
    trade = {"sets": {"s": {"streaming": {"write_s_per_event": 1e-5, "materialize_s_per_entity": 0, "read_p99_added_ms": 0, "bytes_per_entity": 100}}}}
    assert load_trade(trade)["s"]["streaming"] == ModeCost(1e-5, 0.0, 0.0, 100.0)
    assert load_tolerance({"tolerance": {"s": {"max_staleness_ms": 60000, "max_missing": 0.05}}}) == {"s": (60000.0, 0.05)}
