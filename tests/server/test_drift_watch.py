"""The server's live drift watch: gauges over a sliding window, alert events when a feature
crosses a threshold and when it clears, never any work on the request beyond an append."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from export.reference import column_references, histogram_reference
from monitor.drift import DriftThresholds
from server.app import BackgroundServer
from server.client import ParityClient
from server.drift_watch import DriftSettings, DriftWatch
from server.metrics import Metrics
from server.observe import Observation

COLS = ("a.x", "a.y")
HOUR = 3_600_000


class _State:
    def __init__(self, reference):
        snap = SimpleNamespace(release_id="r1", runtime=SimpleNamespace(release=SimpleNamespace(manifest={"reference": reference})))
        self._arms = {"primary": snap}

    def arm(self, name):
        return self._arms.get(name)

    def arms(self):
        return dict(self._arms)


def _obs(X, ts, scores=None):
    s = np.zeros(len(X), np.float32) if scores is None else scores
    return Observation("primary", "r1", "Recommend", 1, "q", ts, "ok", 1.0, 0.0, s, X.astype(np.float32), s, COLS)


@pytest.fixture
def watch(tmp_path):
    rng = np.random.default_rng(0)
    ref_X = rng.normal(size=(5000, 2))
    reference = {"features": column_references(ref_X, COLS), "prediction": histogram_reference(rng.normal(size=5000), bins=20)}
    clock = {"now": 10 * HOUR}
    m = Metrics()
    w = DriftWatch(m, _State(reference), lambda: clock["now"], settings=DriftSettings(window_ms=HOUR, buckets=12, max_pending=500, max_requests_per_s=1e9,
                   thresholds=DriftThresholds(min_rows=200)), alerts_dir=tmp_path / "alerts")
    return w, clock, m, tmp_path / "alerts" / "drift.jsonl"


def _feed(w, clock, shift_y: float, n_req: int = 300, seed: int = 1):
    rng = np.random.default_rng(seed)
    for i in range(n_req):
        X = rng.normal(size=(8, 2))
        X[:, 1] += shift_y
        w.listener(_obs(X, clock["now"] - HOUR // 2 + i * (HOUR // 2 // n_req), rng.normal(size=8).astype(np.float32)))
        if len(w._pending) >= 400:
            w.step()


def test_a_shifted_feature_alerts_once_the_stable_one_never_and_the_alert_clears(watch):
    w, clock, m, alerts = watch
    _feed(w, clock, 0.0)
    w.step()
    assert not w.last["primary"].new_alerts and not alerts.exists()  # same distribution: no alert
    assert m.drift_rows.labels("primary")._value.get() == 2400
    clock["now"] += 2 * HOUR
    _feed(w, clock, 1.0, seed=2)
    poll = w.step()["primary"]
    assert poll.new_alerts == ("a.y",)
    events = [json.loads(x) for x in alerts.read_text().splitlines()]
    assert [(e["feature"], e["state"]) for e in events] == [("a.y", "alerting")] and events[0]["psi"] > 0.2
    assert m.drift_drifted.labels("primary", "a.y")._value.get() == 1.0 and m.drift_drifted.labels("primary", "a.x")._value.get() == 0.0
    assert m.drift_alerts.labels("primary", "a.y")._value.get() == 1.0
    w.step()  # still drifting: no second event
    assert len(alerts.read_text().splitlines()) == 1
    clock["now"] += 2 * HOUR
    _feed(w, clock, 0.0, seed=3)
    w.step()
    events = [json.loads(x) for x in alerts.read_text().splitlines()]
    assert [(e["feature"], e["state"]) for e in events] == [("a.y", "alerting"), ("a.y", "cleared")]


def test_the_request_side_only_appends_and_drops_when_full(watch):
    w, clock, m, _ = watch
    for _ in range(600):
        w.listener(_obs(np.zeros((8, 2)), clock["now"]))
    assert len(w._pending) == 500 and w.dropped == 100 and m.drift_dropped._value.get() == 100
    w.listener(Observation("primary", "r1", "Recommend", 1, "q", 0, "error:INTERNAL", 1.0, float("nan"), np.empty(0), None, np.empty(0), COLS))
    assert len(w._pending) == 500  # errors carry no rows


def test_the_intake_is_capped_per_second_so_the_fold_costs_the_same_at_any_traffic(tmp_path):
    w = DriftWatch(Metrics(), _State({"features": column_references(np.zeros((10, 2)), COLS)}), lambda: 0,
                   settings=DriftSettings(max_requests_per_s=25))
    for _ in range(200):  # far more than 25 within one second
        w.listener(_obs(np.zeros((8, 2)), 0))
    assert 25 <= len(w._pending) <= 50  # 25 per second (a second boundary may fall inside the loop)


def test_a_release_no_longer_served_loses_its_window(watch):
    w, clock, _, _ = watch
    _feed(w, clock, 0.0, n_req=50)
    w.step()
    assert ("primary", "r1") in w._windows
    w.state._arms["primary"] = SimpleNamespace(release_id="r2", runtime=w.state._arms["primary"].runtime)
    w.step()
    assert ("primary", "r1") not in w._windows


def test_a_live_server_fills_the_drift_window_from_its_requests(release_dir, small_sim, server_config, admin_token):
    cfg = server_config(release_dir, small_sim, drift_interval_s=3600.0)  # folded by hand below
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        for u in range(1, 30):
            c.recommend(u, k=5)
        polls = s.run(_step(s.service.drift))
    rep = polls["primary"].report
    assert rep.rows == 29 * 8  # 8 candidates sampled per request
    assert {f.name for f in rep.features} == set(s.service.state.current.runtime.inputs.columns)
    assert all(f.rows == rep.rows for f in rep.features)
    assert any(f.test == "ks" for f in rep.features)  # the release's raw reference samples reached the server


async def _step(w):
    return w.step()


def test_the_pacer_keeps_a_background_thread_to_its_share():
    import time as _t

    from server.drift_watch import Pacer

    p = Pacer(0.25)
    t0 = _t.perf_counter()
    busy = 0.0
    for _ in range(10):
        s = _t.perf_counter()
        while _t.perf_counter() - s < 0.005:  # 5 ms of work
            pass
        busy += _t.perf_counter() - s
        p()
    share = busy / (_t.perf_counter() - t0)
    assert 0.15 < share < 0.3
