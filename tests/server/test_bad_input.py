"""The bad-input matrix over a real port: each bad field → INVALID_ARGUMENT naming it, and the
server keeps answering; plus the pure validation functions."""
from __future__ import annotations

import math

import grpc
import pytest

from parity_api.v1 import recommender_pb2 as pb
from parity_api.v1 import recommender_pb2_grpc as pb_grpc
from server.errors import InvalidArgument
from server.validation import parse_events, parse_id, validate_recommend

LONG = "1" * 65

RECOMMEND = [
    ("empty user id", dict(user_id="", k=5), "user_id"),
    ("over-long user id", dict(user_id=LONG, k=5), "user_id"),
    ("non-digit user id", dict(user_id="abc", k=5), "user_id"),
    ("negative user id", dict(user_id="-3", k=5), "user_id"),
    ("unicode digits", dict(user_id="١٢", k=5), "user_id"),
    ("user id beyond 2^31", dict(user_id=str(1 << 31), k=5), "user_id"),
    ("k zero", dict(user_id="1", k=0), "k"),
    ("k negative", dict(user_id="1", k=-1), "k"),
    ("k above the limit", dict(user_id="1", k=201), "k"),
    ("NaN context", dict(user_id="1", k=5, context={"hour": math.nan}), "context['hour']"),
    ("inf context", dict(user_id="1", k=5, context={"hour": math.inf}), "context['hour']"),
    ("malformed excluded id", dict(user_id="1", k=5, exclude_item_ids=["7", "x7"]), "exclude_item_ids[1]"),
    ("too many exclusions", dict(user_id="1", k=5, exclude_item_ids=["1"] * 1001), "exclude_item_ids"),
    ("over-long request id", dict(user_id="1", k=5, request_id="r" * 200), "request_id"),
]

RANK = [
    ("no candidates", dict(user_id="1", item_ids=[]), "item_ids"),
    ("too many candidates", dict(user_id="1", item_ids=["1"] * 1001), "item_ids"),
    ("malformed candidate id", dict(user_id="1", item_ids=["1", "2.5"]), "item_ids[1]"),
    ("bad user id", dict(user_id="u1", item_ids=["1"]), "user_id"),
    ("NaN context", dict(user_id="1", item_ids=["1"], context={"x": math.nan}), "context['x']"),
]

FEATURES = [
    ("unknown entity type", dict(entity_type="planet", entity_id="1"), "entity_type"),
    ("empty entity id", dict(entity_type="user", entity_id=""), "entity_id"),
    ("non-digit entity id", dict(entity_type="user", entity_id="x"), "entity_id"),
    ("pair id for a single entity", dict(entity_type="user", entity_id="1|2"), "entity_id"),
    ("single id for a pair entity", dict(entity_type="user_topic", entity_id="1"), "entity_id"),
    ("unknown feature set", dict(entity_type="user", entity_id="1", feature_sets=["item_popularity"]), "feature_sets"),
]


@pytest.fixture(scope="module")
def stub(memory_server):
    with grpc.insecure_channel(f"127.0.0.1:{memory_server.port}") as ch:
        yield pb_grpc.RecommenderStub(ch)


def _invalid(call, req, field):
    with pytest.raises(grpc.RpcError) as e:
        call(req, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith(field), e.value.details()


@pytest.mark.parametrize("case,fields,field", RECOMMEND, ids=[c[0] for c in RECOMMEND])
def test_recommend_refuses(stub, case, fields, field):
    _invalid(stub.Recommend, pb.RecommendRequest(**fields), field)


@pytest.mark.parametrize("case,fields,field", RANK, ids=[c[0] for c in RANK])
def test_rank_refuses(stub, case, fields, field):
    _invalid(stub.Rank, pb.RankRequest(**fields), field)


@pytest.mark.parametrize("case,fields,field", FEATURES, ids=[c[0] for c in FEATURES])
def test_get_features_refuses(stub, case, fields, field):
    _invalid(stub.GetFeatures, pb.GetFeaturesRequest(**fields), field)


def test_the_server_still_answers_after_the_matrix(stub):
    r = stub.Recommend(pb.RecommendRequest(user_id="1", k=3), timeout=5)
    assert len(r.items) == 3


def test_malformed_events_are_counted_invalid_and_the_first_reason_names_its_field(stub, admin_token):
    events = [
        pb.Event(event_id="x1", ts_ms=1, user_id="1", item_id="1", type="play", value=1),
        pb.Event(event_id="1", ts_ms=1, user_id="1", item_id="1", type="teleport", value=1),
        pb.Event(event_id="2", ts_ms=-5, user_id="1", item_id="1", type="play", value=1),
        pb.Event(event_id="3", ts_ms=1, user_id="1", item_id="1", type="play", value=math.nan),
        pb.Event(event_id="4", ts_ms=1, user_id="", item_id="1", type="play", value=1),
    ]
    summary, call = stub.IngestEvents.with_call(iter(events), timeout=5, metadata=[("authorization", f"Bearer {admin_token}")])
    assert (summary.received, summary.accepted, summary.invalid) == (5, 0, 5)
    why = dict(call.trailing_metadata())["parity-first-invalid"]
    assert "event_id" in why


def test_parse_id_and_validate_recommend_are_pure(server_config):
    assert parse_id("user_id", "0") == 0
    with pytest.raises(InvalidArgument, match="^item_id: must not be empty"):
        parse_id("item_id", "")
    cfg = server_config("/nonexistent", "/nonexistent")
    q = validate_recommend(pb.RecommendRequest(user_id="42", k=3, exclude_item_ids=["9", "2", "9"], context={"b": 1, "a": 2}), cfg)
    assert q.user_id == 42 and q.exclude.tolist() == [2, 9] and q.context == (("a", 2.0), ("b", 1.0)) and q.request_id
    with pytest.raises(InvalidArgument, match="^k: must be in"):
        validate_recommend(pb.RecommendRequest(user_id="1", k=cfg.max_k + 1), cfg)


def test_events_too_far_ahead_of_the_server_clock_are_invalid(server_config):
    cfg = server_config("/nonexistent", "/nonexistent")
    now = 1_000_000_000
    ok = pb.Event(event_id="1", ts_ms=now, user_id="1", item_id="2", type="like", value=1)
    ahead = pb.Event(event_id="2", ts_ms=now + cfg.max_event_future_ms + 1, user_id="1", item_id="2", type="like", value=1)
    parsed = parse_events([ok, ahead], now, cfg)
    assert len(parsed) == 1 and parsed.invalid == 1 and "ts_ms" in parsed.first_error


def test_implausible_values_are_invalid_through_ingest_events(stub, admin_token):
    """A play of 1e7 seconds (or a like worth 5) would have topped every new user's list."""
    events = [
        pb.Event(event_id="9100000001", ts_ms=1, user_id="3", item_id="1", type="play", value=1e7),
        pb.Event(event_id="9100000002", ts_ms=1, user_id="3", item_id="1", type="like", value=5),
        pb.Event(event_id="9100000003", ts_ms=1, user_id="3", item_id="1", type="9", value=1),
    ]
    summary, call = stub.IngestEvents.with_call(iter(events), timeout=5, metadata=[("authorization", f"Bearer {admin_token}")])
    assert (summary.received, summary.accepted, summary.invalid) == (3, 0, 3)
    assert dict(call.trailing_metadata())["parity-first-invalid"].startswith("event 0 (event_id '9100000001'): value: a play")


def test_parse_events_applies_the_shared_event_rules_when_given(server_config, small_sim):
    from features.catalog import ItemCatalog
    from features.datasets import load_info, read_items
    from features.event_rules import EventRules

    cfg = server_config("/nonexistent", "/nonexistent")
    catalog = ItemCatalog.from_table(read_items(small_sim))
    rules = EventRules.from_dataset(load_info(small_sim), catalog, max_future_ms=cfg.max_event_future_ms)
    item = int(catalog.item_id[0])
    too_long = catalog.duration_s[0] * rules.play_tolerance + 1
    now = 1_000_000_000
    events = [
        pb.Event(event_id="1", ts_ms=now, user_id="1", item_id=str(item), type="play", value=1.0),
        pb.Event(event_id="2", ts_ms=now, user_id="1", item_id=str(item), type="play", value=too_long),
        pb.Event(event_id="3", ts_ms=now, user_id="1", item_id=str(item), type="rating", value=4),
        pb.Event(event_id="4", ts_ms=now, user_id="1", item_id=str(item), type="impression"),
    ]
    parsed = parse_events(events, now, cfg, rules)
    assert parsed.batch.event_id.tolist() == [1, 4] and parsed.invalid == 2
    assert parsed.batch.value.tolist() == [1.0, 1.0]  # an unset impression value is stored as one
    assert [(r.index, r.field) for r in parsed.rejected] == [(1, "value"), (2, "type")]
    assert parsed.batch.topic.tolist() == [int(catalog.topic[0])] * 2 and parsed.batch.creator_id.tolist() == [int(catalog.creator_id[0])] * 2
    # The three-argument call keeps working, with dataset-agnostic rules.
    assert parse_events(events, now, cfg).batch.event_id.tolist() == [1, 2, 3, 4]
