"""Hybrid mode against a real gRPC server (Parity's Recommender service, in-process, scripted
to be fast, slow, degraded or failing): the server answers when it can, the device otherwise."""
from __future__ import annotations

import socket
import threading
import time
from concurrent import futures
from typing import Iterator

import grpc
import pytest

from mobile_sdk import Event, GrpcTransport, NoBundle
from parity_api.v1 import recommender_pb2 as pb2
from parity_api.v1 import recommender_pb2_grpc as pb2_grpc

from conftest import NOW_MS, USER

CTX = {"now_ms": NOW_MS}
SERVER_ITEMS = [("501", 0.9), ("502", 0.8), ("503", 0.7)]


class ScriptedRecommender(pb2_grpc.RecommenderServicer):
    def __init__(self) -> None:
        self.mode = "fast"
        self.requests: list[pb2.RecommendRequest] = []
        self.release = threading.Event()

    def Recommend(self, request, context):
        self.requests.append(request)
        if self.mode == "slow":
            self.release.wait(2.0)
        if self.mode == "error":
            context.abort(grpc.StatusCode.INTERNAL, "scripted failure")
        items = [pb2.ScoredItem(item_id=i, score=s, source="ann") for i, s in SERVER_ITEMS[: request.k]]
        return pb2.RecommendResponse(items=items, release_id="rel-1", degraded=self.mode == "degraded",
                                     request_id=request.request_id)


@pytest.fixture
def server() -> Iterator[tuple[ScriptedRecommender, int]]:
    servicer = ScriptedRecommender()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb2_grpc.add_RecommenderServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield servicer, port
    finally:
        servicer.release.set()
        srv.stop(0).wait(5)


@pytest.fixture
def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hybrid_client(world, server):
    servicer, port = server
    c = world.client(transport=GrpcTransport(f"127.0.0.1:{port}"))
    c.sync()
    c.recommend(USER, k=3, deadline_s=2.0, context=CTX)  # connect the channel once
    servicer.requests.clear()
    return c


def test_a_fast_server_answers(hybrid_client, server):
    hybrid_client.record(Event(NOW_MS - 1_000, 12, 1, 4.0))
    r = hybrid_client.recommend(USER, k=2, deadline_s=1.0, context=CTX)
    assert r.source == "server" and r.fallback_reason is None and r.release_id == "rel-1"
    assert r == [(501, pytest.approx(0.9)), (502, pytest.approx(0.8))]
    (req,) = server[0].requests
    assert (req.user_id, req.k, list(req.exclude_item_ids)) == (str(USER), 2, ["12"])  # the session's engaged items
    assert "now_ms" not in req.context


def test_a_slow_server_is_abandoned_at_the_deadline_and_the_device_answers(hybrid_client, server):
    server[0].mode = "slow"
    t0 = time.perf_counter()
    device = hybrid_client.rank(USER, context=CTX, k=5)
    rank_s = time.perf_counter() - t0
    deadline = 0.040
    t0 = time.perf_counter()
    r = hybrid_client.recommend(USER, k=5, deadline_s=deadline, context=CTX)
    elapsed = time.perf_counter() - t0
    assert r.source == "user" and r.fallback_reason == "deadline"
    assert r == device
    assert elapsed < deadline + rank_s + 0.15, f"{elapsed * 1e3:.0f} ms for a {deadline * 1e3:.0f} ms deadline"


def test_a_degraded_answer_is_replaced_by_the_device(hybrid_client, server):
    server[0].mode = "degraded"
    r = hybrid_client.recommend(USER, k=5, deadline_s=1.0, context=CTX)
    assert r.source == "user" and r.fallback_reason == "degraded"


def test_a_server_error_falls_back_to_the_device_and_says_why(hybrid_client, server):
    server[0].mode = "error"
    r = hybrid_client.recommend(USER, k=5, deadline_s=1.0, context=CTX)
    assert r.source == "user" and "INTERNAL" in r.fallback_reason


def test_an_unreachable_server_falls_back_to_the_device(world, free_tcp_port):
    c = world.client(transport=GrpcTransport(f"127.0.0.1:{free_tcp_port}"))
    c.sync()
    r = c.recommend(USER, k=5, deadline_s=0.2, context=CTX)
    assert r.source == "user" and r.fallback_reason


def test_without_a_bundle_and_without_a_server_hybrid_mode_raises_no_bundle(world, free_tcp_port):
    c = world.client(transport=GrpcTransport(f"127.0.0.1:{free_tcp_port}"))
    with pytest.raises(NoBundle):
        c.recommend(USER, k=5, deadline_s=0.1, context=CTX)


def test_a_degraded_answer_is_kept_when_the_device_has_no_bundle(world, server):
    server[0].mode = "degraded"
    c = world.client(transport=GrpcTransport(f"127.0.0.1:{server[1]}"))
    r = c.recommend(USER, k=2, deadline_s=2.0, context=CTX)
    assert r.source == "server" and "no bundle" in r.fallback_reason and r.item_ids == [501, 502]


def test_any_callable_is_a_transport(world):
    def transport(user_id, k, context, exclude, timeout_s):
        raise ConnectionError("offline")

    c = world.client(transport=transport)
    c.sync()
    r = c.recommend(USER, k=3, deadline_s=0.1, context=CTX)
    assert r.source == "user" and "offline" in r.fallback_reason
