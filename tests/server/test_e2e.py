"""End to end over a real port: the memory store (materialised from the data dir at start-up)
and a Redis store materialised beforehand, health, reflection and metrics."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from features.eventlog import EventLog
from features.materialize import materialize
from features.online import open_store
from features.repo import feature_sets
from features.datasets import load_info
from server.app import BackgroundServer
from server.client import ParityClient

STAGES = {"response_cache", "features", "decode", "embed", "ann", "cold_start", "assemble", "rank", "post_process", "total"}


def _active_user(data_dir: Path) -> int:
    ev = EventLog(data_dir / "events").read()
    return int(np.bincount(ev.user_id).argmax())


def test_recommend_for_a_known_user_returns_k_ranked_items_with_the_release_and_stage_latency(client, small_sim, release_dir):
    user = _active_user(small_sim)
    rec = client.recommend(user, k=10, include_latency=True, request_id="req-1")
    assert len(rec.items) == 10
    assert len(set(rec.item_ids)) == 10
    assert rec.release_id == release_dir.name
    assert rec.request_id == "req-1"
    assert not rec.degraded
    scores = [i.score for i in rec.items]
    assert all(np.isfinite(scores))
    assert {i.source for i in rec.items} <= {"ann", "content", "fresh", "popular"}
    assert STAGES - {"response_cache"} <= set(rec.latency_ms) or set(rec.latency_ms) == {"response_cache", "total"}
    assert rec.latency_ms["total"] > 0
    # Seen items (engaged before) are never recommended.
    ev = EventLog(small_sim / "events").read(user_ids=[user])
    engaged = set(ev.item_id[(ev.type == 1) | (ev.type == 2)].tolist())
    assert engaged, "the most active user has engaged items"
    assert not engaged & {int(i) for i in rec.item_ids}


def test_the_response_cache_answers_a_repeat_with_the_same_items(client, small_sim):
    user = _active_user(small_sim) + 1
    a = client.recommend(user, k=5, exclude=["1"])
    b = client.recommend(user, k=5, exclude=["1"], include_latency=True)
    assert a.item_ids == b.item_ids
    assert set(b.latency_ms) == {"response_cache", "total"}
    assert "1" not in a.item_ids


def test_exclusions_are_honoured_and_k_is_capped_by_the_catalogue(client):
    full = client.recommend(7, k=200)
    assert 0 < len(full.items) <= 60
    excluded = full.item_ids[:3]
    again = client.recommend(7, k=200, exclude=excluded)
    assert not set(excluded) & set(again.item_ids)


def test_an_unknown_user_gets_popular_and_content_results_not_an_error(client):
    rec = client.recommend(2_000_000_000, k=10)
    assert len(rec.items) == 10
    assert not rec.degraded


def test_rank_scores_the_given_items_in_request_order(client):
    r = client.rank(3, ["5", "1", "999999", "5"])
    assert [i.item_id for i in r.items] == ["5", "1", "999999", "5"]
    assert r.items[0].score == pytest.approx(r.items[3].score)
    # An item the catalogue does not hold gets no made-up score: flagged, NaN.
    assert [i.unknown for i in r.items] == [False, False, True, False]
    assert np.isnan(r.items[2].score) and all(np.isfinite([r.items[i].score for i in (0, 1, 3)]))


def test_get_features_returns_values_with_timestamps_and_staleness(client, small_sim):
    user = _active_user(small_sim)
    sets = client.get_features("user", user)
    assert [s.feature_set for s in sets] == ["user_activity"]
    s = sets[0]
    assert s.found and s.feature_ts_ms > 0 and s.staleness_ms >= 0
    assert s.values["impressions_7d"] > 0
    pair = client.get_features("user_topic", f"{user}|0")
    assert pair[0].feature_set == "user_topic"
    missing = client.get_features("user", 2_000_000_000)[0]
    assert not missing.found and missing.feature_ts_ms == -1 and missing.staleness_ms == -1
    assert missing.missing == frozenset(missing.values)


def test_health_reflection_and_metrics_are_served(memory_server, client):
    assert client.health() == "SERVING"
    assert client.health("parity.v1.Recommender") == "SERVING"
    with grpc.insecure_channel(f"127.0.0.1:{memory_server.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert {"parity.v1.Recommender", "parity.v1.Admin", "grpc.health.v1.Health"} <= names
    client.recommend(11, k=3)
    body = urllib.request.urlopen(f"http://127.0.0.1:{memory_server.server.metrics_port}/metrics", timeout=5).read().decode()
    for name in ("parity_requests_total", "parity_request_seconds_bucket", "parity_stage_seconds_bucket", "parity_cache_requests_total",
                 "parity_feature_missing_ratio_bucket", "parity_feature_staleness_seconds_bucket", "parity_release_info"):
        assert name in body, name
    assert 'parity_requests_total{code="OK",rpc="Recommend"}' in body


@pytest.mark.redis
def test_end_to_end_on_a_redis_store_materialised_from_the_data_dir(release_dir, small_sim, redis_url, server_config, admin_token):
    info = load_info(small_sim)
    sets = feature_sets(info.kind, info.n_topics)
    with open_store(redis_url, namespace="e2e", socket_timeout_s=30.0) as store:
        reps = materialize(EventLog(small_sim / "events"), store, sets)
        assert all(r.entities_written > 0 for r in reps)
    cfg = server_config(release_dir, small_sim, store=redis_url, namespace="e2e")
    user = _active_user(small_sim)
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=5.0, admin_token=admin_token) as c:
        rec = c.recommend(user, k=10, include_latency=True)
        assert len(rec.items) == 10 and not rec.degraded
        assert c.get_features("user", user)[0].found
        st = c.status()
        assert st.store == redis_url and st.release_id == release_dir.name
        assert len(c.rank(user, rec.item_ids).items) == 10
