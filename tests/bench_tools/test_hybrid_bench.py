"""The hybrid benchmark's measuring core (bench/hybrid.py) against the echo upstream through the
fault proxy, and its --quick smoke run. Small: tens of calls, sub-second deadlines."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.delay_proxy import FaultPlan
from bench.echo_upstream import EchoUpstream
from bench.hybrid import CONCURRENT, SEQUENTIAL, Record, ServerOnlyClient, main, measure, run_hybrid, standin_hybrid, summarize


def test_summary_counts_failures_sources_and_percentiles() -> None:
    recs = [Record(SEQUENTIAL, float(i), "server", None) for i in range(1, 8)] + [Record(SEQUENTIAL, 8.0, "device", None),
            Record(SEQUENTIAL, 1000.0, None, "DEADLINE_EXCEEDED"), Record(SEQUENTIAL, 3.0, None, "ValueError")]
    s = summarize(recs)
    assert (s["calls"], s["ok"], s["failed"]) == (10, 8, 2)
    assert s["failures"] == {"DEADLINE_EXCEEDED": 1, "ValueError": 1}
    assert s["sources"] == {"device": 0.1, "server": 0.7}
    assert s["latency_ms"]["max"] == 1000.0 and s["ok_latency_ms"]["max"] == 8.0
    assert s["ok_latency_ms"]["p50"] == 4.5
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p95"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]
    assert summarize([])["latency_ms"]["p50"] is None


def test_measure_runs_sequential_then_concurrent_and_keeps_failures() -> None:
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def call(user_id: str):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            time.sleep(0.005)
            if int(user_id) % 5 == 0:
                raise KeyError(user_id)
            return ("device" if int(user_id) % 2 else "server"), [user_id]
        finally:
            with lock:
                state["now"] -= 1

    recs = measure(call, [str(i) for i in range(10)], n=20, concurrency=4)
    assert [r.phase for r in recs] == [SEQUENTIAL] * 20 + [CONCURRENT] * 20
    assert state["max"] == 4
    s = summarize(recs)
    assert s["failures"] == {"KeyError": 8} and s["sources"] == {"device": 0.4, "server": 0.4}
    with pytest.raises(ValueError):
        measure(call, [], n=1, concurrency=1)


def test_both_legs_see_the_same_faults_and_the_server_only_client_fails_on_drops() -> None:
    plan = FaultPlan(delay_share=0.2, drop_share=0.1, seed=4)
    n = 20
    with EchoUpstream(record=False) as up:
        opened: list[ServerOnlyClient] = []

        def hybrid(target: str):
            opened.append(ServerOnlyClient(target, 0.3))
            return standin_hybrid(opened[-1], budget_s=0.15)

        try:
            rep = run_hybrid(up.target, [str(i) for i in range(50)], hybrid_call=hybrid, plan=plan, n=n, concurrency=4,
                             deadline_s=0.3, warmup=3, overhead_n=20)
        finally:
            for c in opened:
                c.close()
    expected = [o for o, _ in plan.outcomes(2 * n)]
    so, hy = rep["server_only"], rep["hybrid"]
    for leg in (so, hy):
        c = leg["proxy_counts"]
        assert (c["calls"], c["dropped"], c["delayed"]) == (2 * n, expected.count("dropped"), expected.count("delayed"))
    assert expected.count("dropped") > 0
    # server-only: exactly the dropped calls fail, at its deadline
    assert so["all"]["failures"] == {"DEADLINE_EXCEEDED": expected.count("dropped")}
    assert so["all"]["latency_ms"]["max"] >= 300.0
    assert so["all"]["sources"] == {"server": round(1 - expected.count("dropped") / (2 * n), 4)}
    # the stand-in hybrid answers everything, locally when the server is too slow
    assert hy["all"]["failed"] == 0 and hy["all"]["sources"]["local"] >= round(expected.count("dropped") / (2 * n), 4)
    assert hy["all"]["latency_ms"]["max"] < 300.0
    ov = rep["proxy_overhead"]
    assert ov["n"] == 20 and ov["direct_ms"]["p50"] > 0 and ov["proxy_ms"]["p50"] > 0


def test_quick_smoke_run_writes_the_result_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hybrid.json"
    assert main(["--echo", "--quick", "--out", str(out), "--seed", "2", "--deadline-s", "0.3"]) == 0
    data = json.loads(out.read_text())
    assert data["bench"] == "hybrid" and data["quick"] and data["hybrid_is_standin"]
    assert data["server_only"]["all"]["calls"] == 40 and data["hybrid"]["all"]["calls"] == 40
    assert set(data["server_only"]["all"]["latency_ms"]) == {"p50", "p95", "p99", "max", "mean"}
    assert "added_p50_ms" in data["proxy_overhead"] and data["machine"]["cores"]
    assert "proxy overhead" in capsys.readouterr().out


def test_the_sdk_leg_needs_keys(tmp_path: Path) -> None:
    with EchoUpstream(record=False) as up, pytest.raises(SystemExit) as exc:
        main(["--upstream", up.target, "--bundle", str(tmp_path / "b"), "--out", str(tmp_path / "h.json"), "--quick"])
    assert exc.value.code == 2 and not (tmp_path / "h.json").exists()


def test_the_sdk_leg_against_a_real_server_and_bundle(release_dir: Path, small_sim: Path, tmp_path: Path) -> None:
    """The mobile SDK behind the fault proxy, in front of a real server on a tiny release: every
    call answered (by the server or, when it is slow or dropped, by the device), none failed."""
    from bench.hybrid import run_hybrid, sdk_hybrid_call
    from export.device.bundle import export_device
    from export.device.keys import keygen
    from export.device.tiny_model import build_device_model
    from features.eventlog import EventLog
    from server.app import BackgroundServer
    from server.config import ServerConfig

    keys = keygen(tmp_path / "keys")
    model = build_device_model(release_dir, small_sim, tmp_path / "model", profile="tiny")
    export_device(release_dir, small_sim, keys, tmp_path / "bundle", model)
    users = [int(u) for u in np.unique(EventLog(small_sim / "events").read().user_id)[:4]]
    factory = sdk_hybrid_call(tmp_path / "bundle", keys, users, tmp_path / "devices")
    cfg = ServerConfig(release=release_dir, data_dir=small_sim, host="127.0.0.1", port=0, metrics_port=None, drain_grace_s=1.0)
    with BackgroundServer(cfg) as srv:
        res = run_hybrid(f"127.0.0.1:{srv.port}", [str(u) for u in users], hybrid_call=factory,
                         plan=FaultPlan(delay_share=0.3, drop_share=0.1, seed=1), n=30, concurrency=3, overhead_n=0)
    hy, so = res["hybrid"]["all"], res["server_only"]["all"]
    assert hy["failed"] == 0 and hy["calls"] == 60
    assert hy["sources"].get("server", 0) > 0.3 and any(k.startswith("device:") for k in hy["sources"])
    assert so["failed"] > 0  # the same dropped calls fail a server-only client
    assert hy["latency_ms"]["max"] < so["latency_ms"]["max"]
