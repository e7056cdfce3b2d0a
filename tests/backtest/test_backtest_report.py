"""The tolerance a backtest reports, its JSON and the latency model: pure, no release needed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from backtest.conditions import ALL, FRESH, USER_RECORD, Condition, format_ms, grid
from backtest.latency import LatencyModel
from backtest.replay import BacktestResult, ConditionResult
from backtest.report import to_json, tolerance

H = 3_600_000


def _result(rows: list[tuple[Condition, float]]) -> BacktestResult:
    res = [ConditionResult(c, ndcg, 0.5, float("nan"), 0.0, 0.0, 0.0) for c, ndcg in rows]
    return BacktestResult("r1", "simulated", 100, 10, ("a", "b"), res, 1.0, 0)


def test_tolerance_is_the_largest_level_within_one_percent_with_no_drop_before_it():
    res = _result([
        (Condition(FRESH, "fresh"), 0.200),
        (Condition("a", "staleness", staleness_ms=H), 0.1985),  # -0.75 %: tolerated
        (Condition("a", "staleness", staleness_ms=6 * H), 0.190),  # -5 %: the first drop
        (Condition("a", "staleness", staleness_ms=24 * H), 0.199),  # noise back inside: not tolerated past a drop
        (Condition("a", "missing", missing=0.05), 0.201),
        (Condition("a", "missing", missing=0.2), 0.199),
        (Condition("b", "staleness", staleness_ms=H), 0.150),
        (Condition(USER_RECORD, "missing", missing=0.05), 0.100),
    ])
    tol = tolerance(res)
    assert tol["a"] == {"max_staleness_ms": H, "max_missing": 0.2}
    assert tol["b"] == {"max_staleness_ms": 0, "max_missing": None}  # drops at its first level; missing not tested
    assert tol[USER_RECORD] == {"max_staleness_ms": None, "max_missing": 0.0}
    assert ALL not in tol


def test_the_json_is_strict_json_with_the_tolerance_and_an_undefined_auc_as_null():
    res = _result([(Condition(FRESH, "fresh"), 0.2), (Condition("a", "staleness", staleness_ms=H), 0.1)])
    out = json.loads(json.dumps(to_json(res), allow_nan=False))
    assert out["fresh"]["auc"] is None and out["conditions"][1]["ndcg_change"] == pytest.approx(-0.5)
    assert out["tolerance"]["a"]["max_staleness_ms"] == 0 and out["sets"] == ["a", "b"]


def test_the_grid_varies_one_target_at_a_time_then_all():
    g = grid(["a", "b"], [0, H], [0, 0.1], latency=True)
    assert g[0].kind == "fresh"
    assert [(c.target, c.kind) for c in g[1:]] == [("a", "staleness"), ("a", "missing"), ("b", "staleness"), ("b", "missing"),
                                                   (USER_RECORD, "missing"), (ALL, "staleness"), (ALL, "missing"), (USER_RECORD, "latency")]
    c = Condition(ALL, "staleness", staleness_ms=H)
    assert c.staleness_for("a") == H and c.staleness_for("b") == H and c.missing_for(USER_RECORD) == 0.0
    assert Condition("a", "missing", missing=0.1).missing_for("b") == 0.0
    assert [format_ms(x) for x in (0, 60_000, 15 * 60_000, H, 24 * H, 1500)] == ["0", "1m", "15m", "1h", "1d", "1500ms"]


def test_a_lognormal_latency_has_the_median_and_p99_it_was_given():
    m = LatencyModel.lognormal(2.0, 40.0)
    rng = np.random.default_rng(0)
    x = np.asarray([m.sample(rng) for _ in range(20_000)])
    assert np.quantile(x, 0.5) == pytest.approx(2.0, rel=0.05) and np.quantile(x, 0.99) == pytest.approx(40.0, rel=0.15)
    assert m.share_over(40.0) == pytest.approx(0.01, rel=1e-6) and m.share_over(2.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="p50 <= p99"):
        LatencyModel.lognormal(10.0, 5.0)


def test_observed_latencies_are_read_one_per_line_and_a_bad_line_is_named(tmp_path):
    f = tmp_path / "lat.txt"
    f.write_text("# ms\n1.5\n\n3\n12\n")
    m = LatencyModel.from_file(f)
    assert sorted(m.samples_ms.tolist()) == [1.5, 3.0, 12.0] and m.share_over(2.0) == pytest.approx(2 / 3)
    assert {m.sample(np.random.default_rng(s)) for s in range(50)} <= {1.5, 3.0, 12.0}
    f.write_text("1\nfast\n")
    with pytest.raises(ValueError, match="line 2: 'fast'"):
        LatencyModel.from_file(f)
