"""The overload benchmark's pieces: the recovery rule, the health probe against a real server,
and the generated RESULTS.md section."""
from __future__ import annotations


from bench.reliability import HealthProbe, recovery_s
from bench.reliability_report import END, START, render
from server.app import BackgroundServer


def _w(ok, errors, p99):
    return {"t_s": 0.0, "ok": ok, "errors": errors, "p50_ms": p99, "p99_ms": p99}


def test_recovery_is_the_first_window_after_which_every_window_is_healthy():
    w = [_w(10, 3, 80.0), _w(10, 0, 60.0), _w(10, 0, 20.0), _w(10, 1, 20.0), _w(10, 0, 10.0), _w(10, 0, 9.0)]
    assert recovery_s(w, 0.5) == 2.0  # window 3 had an error: healthy for good from window 4
    assert recovery_s([_w(10, 0, 5.0)], 0.5) == 0.0
    assert recovery_s([_w(10, 0, 5.0), _w(0, 0, None)], 0.5) is None  # an empty last window is not health


def test_the_health_probe_counts_answers_and_failures(release_dir, small_sim):
    import socket

    from server.config import ServerConfig

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    with BackgroundServer(ServerConfig(release=release_dir, data_dir=small_sim, port=0, metrics_port=None)) as s:
        with HealthProbe({"main": f"127.0.0.1:{s.port}", "dead": dead}, every_s=0.05, timeout_s=0.2) as probe:
            import time

            time.sleep(0.5)
    out = probe.summary()
    assert out["main"]["checks"] >= 3 and out["main"]["failed"] == 0 and out["main"]["p99_ms"] > 0
    assert out["dead"]["failed"] == out["dead"]["checks"] >= 1


def test_the_report_renders_both_tables_and_names_the_commands():
    overload = {"started_at": "t0", "finished_at": "t1", "machine": {"cpu": "X", "cores": 2}, "pinned": True,
                "setup": {"profile": "default", "sim": {}},
                "stores": [{"store": "memory", "capacity_qps": 300.0,
                            "multiples": [{"multiple": 10.0, "qps": 3000.0, "offered_achieved": 2900.0, "qps_achieved": 280.0, "goodput_ratio": 0.93,
                                           "p50_ms": 20.0, "p99_ms": 45.0, "errors_by_code": {"CANCELLED": 100},
                                           "health": {"main": {"p99_ms": 3.0, "failed": 0, "checks": 50}, "ops": {"p99_ms": 2.0, "failed": 0, "checks": 50}}}],
                            "recovery": {"after_multiple": 10.0, "gap_s": 0.1, "recovery_s": 0.0, "p99_ms": 9.0, "errors_by_code": {}},
                            "server_metrics": {'parity_admission_total{lane="serve",outcome="admitted"}': 5.0}}]}
    faults = {"started_at": "t2", "machine": {"cpu": "X"}, "rows": [
        {"fault": "redis_down", "scenario": "stop 3 s", "requests": 300, "requests_failed": 0, "requests_degraded": 12, "events_sent": 0,
         "events_lost": 0, "events_double_counted": 0, "seconds": 6.0, "notes": "a | b"}]}
    text = render(overload, faults)
    assert text.startswith(START) and text.endswith(END)
    assert "| 10x = 3000/s | 2,900.0/s | 280.0 | 0.93 |" in text and "CANCELLED 100" in text
    assert "| redis_down | stop 3 s | 300 | 0 | 12 |" in text and "a / b" in text
    assert "python -m bench.reliability " in text and "python -m bench.reliability_faults" in text
    assert "no bench/results/reliability_faults.json" in render(overload, None)
