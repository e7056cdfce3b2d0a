"""The serving benchmark's pure parts: how the capacity is searched and what counts as a pass,
per-window soak figures; and the baseline server process starting and answering for real."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.latency import window_figures
from bench.serving import ServerProcess, ServingBenchConfig, _variant_argv, capacity_search, passes

CFG = ServingBenchConfig(ladder_start=100, ladder_factor=2.0, ladder_max=3200, bisect_steps=3, p99_limit_ms=50)


def _server_with_capacity(cap: float, calls: list[float]):
    """A fake server: p99 is 5 ms below `cap` req/s and 500 ms above it."""
    def measure(q: float) -> dict:
        calls.append(q)
        ok = q <= cap
        return {"p50_ms": 2.0, "p99_ms": 5.0 if ok else 500.0, "errors": 0, "qps_achieved": q if ok else cap}
    return measure


@pytest.mark.parametrize("cap", [130, 250, 399, 1000, 2500])
def test_capacity_search_brackets_the_true_capacity(cap: float) -> None:
    calls: list[float] = []
    found, steps = capacity_search(_server_with_capacity(cap, calls), CFG)
    assert found <= cap
    failing = [s.qps for s in steps if not s.passed]
    assert failing and min(failing) > cap  # the first rate above the capacity was seen failing
    # three bisections between the last pass (x) and the first fail (2x) leave at most x/8 unexplored
    last_pass = max(s.qps for s in steps if s.passed and s.qps <= cap)
    assert cap - found <= max(1.0, min(failing) - last_pass)
    assert found >= cap * 0.85
    assert [s.qps for s in steps] == calls


def test_capacity_search_goes_below_the_first_rate_when_it_fails() -> None:
    found, steps = capacity_search(_server_with_capacity(30, []), CFG)
    assert 12.5 <= found <= 30
    assert steps[0].qps == 100 and not steps[0].passed


def test_a_pass_needs_no_errors_p99_within_the_limit_and_keeping_up() -> None:
    good = {"p99_ms": 20.0, "errors": 0, "qps_achieved": 199.0}
    assert passes(good, 200, CFG)
    assert not passes({**good, "errors": 1}, 200, CFG)
    assert not passes({**good, "p99_ms": 50.1}, 200, CFG)
    assert not passes({**good, "qps_achieved": 150.0}, 200, CFG)  # the server fell behind the offered rate
    assert not passes({**good, "p99_ms": None}, 200, CFG)  # nothing succeeded


def test_window_figures_split_by_due_time_and_count_errors() -> None:
    lat = np.array([1.0, 2.0, np.nan, 4.0, 10.0, 20.0, 30.0, np.nan, np.nan])
    w = window_figures(lat, qps=2.0, window_s=2.0)  # 4 requests per window
    assert [x["t_s"] for x in w] == [0.0, 2.0, 4.0]
    assert [x["ok"] for x in w] == [3, 3, 0]
    assert [x["errors"] for x in w] == [1, 1, 1]
    assert w[0]["p50_ms"] == 2.0 and math.isclose(w[1]["p99_ms"], float(np.percentile([10, 20, 30], 99)), rel_tol=1e-3)
    assert w[2]["p99_ms"] is None


def test_the_baseline_server_process_serves_and_reports_its_rss(release_dir: Path, small_sim: Path, tmp_path: Path) -> None:
    from server.client import ParityClient

    with ServerProcess(_variant_argv("baseline", release_dir, small_sim, "memory"), tmp_path / "server.log").start(timeout_s=120) as srv:
        with ParityClient(srv.target, timeout_s=5.0) as c:
            rec = c.recommend(3, k=5)
        assert len(rec.item_ids) == 5 and not rec.degraded
        assert srv.rss_mb() > 50
        maps = Path(f"/proc/{srv.proc.pid}/maps").read_text()
        assert "libtorch" in maps  # it ranks with the torch teacher (the product server never loads torch)
    assert srv.proc is None  # stopped
