"""Fuzzing the wire: arbitrary field values and arbitrary bytes for every request message.
The server answers each with OK or a clear refusal, never UNKNOWN or INTERNAL, and stays up."""
from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ids = st.one_of(st.text(max_size=30), st.integers(-(2**70), 2**70).map(str), st.sampled_from(["", "0", "1", "42", "9" * 25, "1|2", "-1"]))
doubles = st.floats(allow_nan=True, allow_infinity=True)
context = st.dictionaries(st.text(max_size=70), doubles, max_size=8)


@pytest.fixture(scope="module")
def channel(memory_server):
    with grpc.insecure_channel(f"127.0.0.1:{memory_server.port}") as ch:
        yield ch


def _code(fn, req, **kw) -> grpc.StatusCode:
    try:
        fn(req, timeout=5, **kw)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert len(exc.details() or "") <= 512
        return exc.code()


@FUZZ
@given(user=ids, k=st.integers(-(2**31), 2**31 - 1), ctx=context, exclude=st.lists(ids, max_size=20), rid=st.text(max_size=200),
       lat=st.booleans())
def test_recommend_fields(channel, user, k, ctx, exclude, rid, lat):
    req = pb.RecommendRequest(user_id=user, k=k, context=ctx, exclude_item_ids=exclude, request_id=rid, include_latency=lat)
    assert _code(pb_grpc.RecommenderStub(channel).Recommend, req) in ALLOWED


@FUZZ
@given(user=ids, items=st.lists(ids, max_size=30), ctx=context)
def test_rank_fields(channel, user, items, ctx):
    assert _code(pb_grpc.RecommenderStub(channel).Rank, pb.RankRequest(user_id=user, item_ids=items, context=ctx)) in ALLOWED


@FUZZ
@given(etype=st.one_of(st.text(max_size=40), st.sampled_from(["user", "item", "user_topic", "user_creator"])), eid=ids,
       sets=st.lists(st.one_of(st.text(max_size=40), st.sampled_from(["user_activity", "item_popularity"])), max_size=5))
def test_get_features_fields(channel, etype, eid, sets):
    assert _code(pb_grpc.RecommenderStub(channel).GetFeatures, pb.GetFeaturesRequest(entity_type=etype, entity_id=eid, feature_sets=sets)) in ALLOWED


events = st.builds(pb.Event, event_id=ids, ts_ms=st.integers(-(2**63), 2**63 - 1), user_id=ids, item_id=ids,
                   type=st.one_of(st.text(max_size=12), st.sampled_from(["play", "like", "impression", "skip", "rating", "PLAY", "7"])),
                   value=doubles)


@FUZZ
@given(evs=st.lists(events, max_size=20))
def test_ingest_events_fields(channel, admin_token, evs):
    summary = pb_grpc.RecommenderStub(channel).IngestEvents(iter(evs), timeout=5, metadata=[("authorization", f"Bearer {admin_token}")])
    assert summary.received == len(evs)
    assert summary.accepted + summary.duplicates + summary.late + summary.invalid + summary.limited == len(evs)


@FUZZ
@given(method=st.sampled_from(["Recommend", "Rank", "GetFeatures"]), raw=st.binary(max_size=300))
def test_arbitrary_bytes(channel, method, raw):
    call = channel.unary_unary(f"/parity.v1.Recommender/{method}", request_serializer=None, response_deserializer=None)
    assert _code(call, raw) in ALLOWED


@FUZZ
@given(raw=st.lists(st.binary(max_size=100), max_size=10))
def test_arbitrary_bytes_in_an_ingest_stream(channel, admin_token, raw):
    call = channel.stream_unary("/parity.v1.Recommender/IngestEvents", request_serializer=None, response_deserializer=pb.IngestSummary.FromString)
    summary = call(iter(raw), timeout=5, metadata=[("authorization", f"Bearer {admin_token}")])
    assert summary.received == len(raw)


def test_the_server_is_still_serving_after_the_fuzz(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert len(pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id="1", k=3), timeout=5).items) == 3
