"""Closed loop through a real server: a slow canary, a canary with broken features and a canary
with a worse model are each rolled back by the guard within a bounded number of requests, for
the expected reason; a canary identical to the primary is not rolled back over a longer run.

Each scenario: a fresh server (BackgroundServer, real gRPC) on a tiny release trained on the
bench's simulated world, whose releases root holds the canaries derived from it
(bench/canary_releases.py);
Admin SetRollout with a fixed salt and the study's thresholds (bench/canary.py THRESHOLDS,
the same for every scenario); Recommend for simulator users, feedback from
features.closed_loop.FeedbackModel ingested with the request ids, a guard decision every 50
requests. Salts and seeds are fixed; latency is real, so the slow canary's margin is large
(~+40 ms per request against a p99 of a few ms).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.canary import THRESHOLDS, LoopConfig, Scenario, Study, _Admin, run_scenario, server_config
from bench.canary_releases import derive
from export.release import load_release


# Bounds: the guard judges health once each arm has min_requests (100) in its window and
# business once each has min_feedback (100) requests with feedback; at 30 % that is ~330
# requests. A bad canary must be rolled back within 4x that.
BOUND = 1300
GOOD_RUN = 1500
LOOP = LoopConfig(percent=30.0, check_every=50, ingest_every=25, cap_requests=BOUND)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, release): the bench's world (bench.canary.Study().sim), a tiny release on it.

    Not the session's 150-user `small_sim`: there 60 items leave the ranker little to order
    (the worse canary's CTR is only ~25 % lower) and its training reference sits far from the
    served candidates (the primary's own prediction PSI ~0.5), so PSI noise between two user
    groups rolls canaries back before the business tests can speak."""
    from features.simulator import simulate
    from pipeline.train import train_release

    data = tmp_path_factory.mktemp("canary-world") / "data"
    simulate(data, **Study().sim)
    return data, train_release(data, data.parent / "trained", profile="tiny", seed=0).path


@pytest.fixture(scope="module")
def canary_root(world, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(releases root, primary path, kind -> canary release id)."""
    import shutil

    base = load_release(world[1])
    root = tmp_path_factory.mktemp("canary-root")
    primary = root / base.release_id
    shutil.copytree(base.path, primary)
    # 200 layers of tanh(128x512 @ 512x512) is ~40-60 ms per ranker call on this machine's cores
    ids = {k: derive(base, root, k, slow_layers=200).release_id for k in ("good", "slow", "broken_features", "worse")}
    return root, primary, ids


@pytest.fixture(scope="module")
def feedback(world):
    from features.closed_loop import FeedbackModel

    return FeedbackModel.from_data_dir(world[0], seed=11)


def _run(kind: str, canary_root, world, feedback, cap: int) -> dict:
    from server.app import BackgroundServer
    from server.client import ParityClient

    root, primary, ids = canary_root
    with BackgroundServer(server_config(primary, world[0], root)) as srv:
        target = f"127.0.0.1:{srv.port}"
        admin = _Admin(target, "canary-study-token")
        try:
            with ParityClient(target, timeout_s=5.0, admin_token="canary-study-token") as client:
                return run_scenario(srv, client, admin, feedback, feedback.user_ids, Scenario(kind, ids[kind], "test-salt", 11),
                                    LoopConfig(**{**LOOP.__dict__, "cap_requests": cap}))
        finally:
            admin.close()


def _explain(r: dict) -> str:
    return f"{r['kind']}: rolled back {r['rolled_back']}, {r.get('decision') or r.get('final')}"


def test_the_thresholds_are_one_set_for_every_scenario():
    assert LOOP.thresholds == THRESHOLDS
    assert THRESHOLDS == {"window_s": 30.0, "bucket_s": 2.0, "min_requests": 100, "min_feedback": 100}


def test_a_slow_canary_is_rolled_back_for_its_latency(canary_root, world, feedback):
    r = _run("slow", canary_root, world, feedback, BOUND)
    assert r["rolled_back"] and r["requests"] <= BOUND, _explain(r)
    assert r["category"] == "latency", _explain(r)
    d = r["decision"]
    assert d["canary"]["p99_ms"] > 1.5 * d["primary"]["p99_ms"] and d["canary"]["p99_ms"] > 25
    assert r["after_rollback"]["arm"] == "primary" and r["state_after"] == "rolled_back"


def test_a_canary_fed_the_wrong_columns_is_rolled_back_for_drift_or_business(canary_root, world, feedback):
    r = _run("broken_features", canary_root, world, feedback, BOUND)
    assert r["rolled_back"] and r["requests"] <= BOUND, _explain(r)
    assert r["category"] in ("prediction drift", "CTR", "watch time"), _explain(r)
    assert r["after_rollback"]["arm"] == "primary"


def test_a_canary_with_a_worse_model_is_rolled_back_by_a_business_metric(canary_root, world, feedback):
    r = _run("worse", canary_root, world, feedback, BOUND)
    assert r["rolled_back"] and r["requests"] <= BOUND, _explain(r)
    assert r["category"] in ("CTR", "watch time"), _explain(r)
    d = r["decision"]
    assert d["canary"]["ctr"] < d["primary"]["ctr"]
    assert r["after_rollback"]["arm"] == "primary"


def test_a_canary_identical_to_the_primary_is_not_rolled_back(canary_root, world, feedback):
    r = _run("good", canary_root, world, feedback, GOOD_RUN)
    assert not r["rolled_back"], _explain(r)
    assert r["requests_sent"] == GOOD_RUN and r["arm_requests"]["canary"] >= 300
    assert r["final"]["reason"] == "healthy" and r["state_after"] == "canary"
    assert r["ingest"]["accepted"] > 0.99 * r["ingest"]["events"], r["ingest"]
