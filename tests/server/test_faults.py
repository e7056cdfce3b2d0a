"""Faults: the online store down or slow → answers within the deadline, degraded and counted,
never a hang or a crash; client deadlines honoured."""
from __future__ import annotations

import time

import grpc
import pytest
import redis

from features.datasets import load_info
from features.eventlog import EventLog
from features.materialize import materialize
from features.online import open_store
from features.repo import feature_sets
from redis_server import RedisServer
from server.app import BackgroundServer
from server.client import ParityClient, ParityRpcError


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _metric(server: BackgroundServer, name: str, **labels) -> float:
    v = server.service.metrics.registry.get_sample_value(name, labels)
    return v or 0.0


@pytest.mark.redis
def test_a_store_that_is_down_from_the_start_gives_degraded_answers_fast(release_dir, small_sim, server_config, admin_token, free_port):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with BackgroundServer(server_config(release_dir, small_sim, store=dead)) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=1.0, admin_token=admin_token) as c:
        for user in (1, 2, 3):
            rec, took = _timed(lambda: c.recommend(user, k=5))
            assert rec.degraded and len(rec.items) == 5
            assert took < 0.5
        assert c.health() == "SERVING"
        assert c.rank(1, ["1", "2"]).degraded
        with pytest.raises(ParityRpcError) as e:
            c.get_features("user", 1)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert _metric(s, "parity_degraded_responses_total", reason="store_unavailable") + _metric(s, "parity_degraded_responses_total", reason="store_breaker_open") >= 3


@pytest.mark.redis
def test_store_outage_and_slowness_mid_flight(release_dir, small_sim, server_config, admin_token):
    info = load_info(small_sim)
    with RedisServer() as rs:
        with open_store(rs.url, namespace="faults", socket_timeout_s=30.0) as store:
            materialize(EventLog(small_sim / "events"), store, feature_sets(info.kind, info.n_topics))
        cfg = server_config(release_dir, small_sim, store=rs.url, namespace="faults", breaker_open_s=0.2, response_cache_ttl_s=0.0, feature_cache_ttl_s=0.0)
        with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=1.0, admin_token=admin_token) as c:
            healthy = c.recommend(10, k=5)
            assert not healthy.degraded

            # Slow: every command blocks for 1.5 s. Answers come within the 300 ms deadline, degraded.
            admin = redis.Redis.from_url(rs.url)
            admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
            t0 = time.perf_counter()
            for user in (11, 12, 13):
                rec, took = _timed(lambda: c.recommend(user, k=5, timeout_s=0.3))
                assert rec.degraded and len(rec.items) == 5 and took < 0.3
            time.sleep(max(0.0, 1.7 - (time.perf_counter() - t0)))
            admin.execute_command("CLIENT", "UNPAUSE")
            # Recovered: the breaker lets a probe through and closes.
            deadline = time.monotonic() + 3
            while c.recommend(14, k=5).degraded:
                assert time.monotonic() < deadline, "never recovered after the store came back"
                time.sleep(0.05)
            admin.close()

            # Down: a user served before gets their last-read features (stale), everyone gets an answer.
            rs.stop()
            for user in (10, 15):
                rec, took = _timed(lambda: c.recommend(user, k=5, timeout_s=0.5))
                assert rec.degraded and len(rec.items) == 5 and took < 0.5
            assert c.health() == "SERVING"
            assert s.service.stale.get(f"{s.service.state.current.plan.plan_id}:10") is not None
            assert _metric(s, "parity_store_errors_total", op="get_many", kind="timeout") + _metric(s, "parity_store_errors_total", op="get_many", kind="unavailable") >= 1


def test_client_deadlines_are_honoured(client):
    with pytest.raises(ParityRpcError) as e:
        client.recommend(5, k=5, timeout_s=0.0005)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(client.recommend(5, k=5).items) == 5  # and the server carries on


def test_an_unexpected_error_is_internal_with_an_incident_id_and_the_server_carries_on(memory_server, client, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(memory_server.service, "_recommend_job", boom)
    with pytest.raises(ParityRpcError) as e:
        client.recommend(123, k=5, exclude=["9"])
    assert e.value.code == grpc.StatusCode.INTERNAL and "incident" in e.value.details
    monkeypatch.undo()
    assert len(client.recommend(123, k=5, exclude=["9"]).items) == 5
    assert _metric(memory_server, "parity_requests_total", rpc="Recommend", code="INTERNAL") >= 1


def test_the_client_retries_unavailable_until_its_deadline(release_dir, small_sim, server_config, free_port):
    port = free_port()
    with ParityClient(f"127.0.0.1:{port}", timeout_s=0.5, retries=3, backoff_s=0.01) as c:
        with pytest.raises(ParityRpcError) as e:
            c.recommend(1, k=3)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.attempts == 4
    # A server that comes up while the client is retrying is reached within the deadline.
    with ParityClient(f"127.0.0.1:{port}", timeout_s=20.0, retries=100, backoff_s=0.05) as c:
        import threading

        box = {}
        t = threading.Thread(target=lambda: box.update(rec=c.recommend(1, k=3)))
        t.start()
        time.sleep(0.3)
        with BackgroundServer(server_config(release_dir, small_sim, port=port)):
            t.join(20)
        assert len(box["rec"].items) == 3


def test_work_past_the_client_deadline_is_abandoned_with_deadline_exceeded(memory_server, client, monkeypatch):
    """Request work runs inline on the event loop (the default), so it cannot be interrupted:
    the late result must be discarded, not sent, cached or counted as OK."""
    real = memory_server.service._recommend_job
    used = []

    def slow(*args, **kwargs):
        time.sleep(0.8)
        out = real(*args, **kwargs)
        used.append(out)
        return out

    before = _metric(memory_server, "parity_requests_total", rpc="Recommend", code="DEADLINE_EXCEEDED") + \
        _metric(memory_server, "parity_requests_total", rpc="Recommend", code="CANCELLED")
    monkeypatch.setattr(memory_server.service, "_recommend_job", slow)
    t = time.perf_counter()
    with pytest.raises(ParityRpcError) as e:
        client.recommend(321, k=5, exclude=["8"], timeout_s=0.2)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.perf_counter() - t < 0.6
    deadline = time.monotonic() + 3.0
    while True:  # the server finishes the (uninterruptible) inline work 0.8 s in, then discards it
        after = _metric(memory_server, "parity_requests_total", rpc="Recommend", code="DEADLINE_EXCEEDED") + \
            _metric(memory_server, "parity_requests_total", rpc="Recommend", code="CANCELLED")
        if after > before or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert after == before + 1
    assert used  # the work did finish, and its result was thrown away
    monkeypatch.setattr(memory_server.service, "_recommend_job", real)
    assert client.recommend(321, k=5, exclude=["8"]).item_ids  # and the server goes on


def test_work_in_the_thread_pool_past_the_deadline_is_abandoned(release_dir, small_sim, server_config, monkeypatch):
    from server.app import BackgroundServer
    from server.client import ParityClient

    def slow(*args, **kwargs):
        time.sleep(0.8)
        raise AssertionError("the result of abandoned work must never be used")

    with BackgroundServer(server_config(release_dir, small_sim, request_compute="thread")) as srv:
        with ParityClient(f"127.0.0.1:{srv.port}", timeout_s=5.0) as c:
            assert len(c.recommend(5, k=3).item_ids) == 3  # the pool path serves
            monkeypatch.setattr(srv.service, "_recommend_job", slow)
            t = time.perf_counter()
            with pytest.raises(ParityRpcError) as e:
                c.recommend(321, k=5, timeout_s=0.2)
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.perf_counter() - t < 0.6


def test_a_budget_too_small_for_anything_is_refused_before_any_work(memory_server):
    from parity_api.v1 import recommender_pb2 as pb
    from server.errors import DeadlineExceeded
    from server.validation import validate_recommend

    svc = memory_server.service
    q = validate_recommend(pb.RecommendRequest(user_id="1", k=3), svc.cfg)
    with pytest.raises(DeadlineExceeded):
        memory_server.run(svc.recommend(q, 0.0005))
