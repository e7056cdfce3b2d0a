"""One set of admission rules for every way an event enters: the Redis Stream fields and the
gRPC Event messages are refused for the same reasons, and nothing a client sends makes the
rules raise."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.catalog import ItemCatalog
from features.datasets import DatasetInfo, load_info, read_items
from features.event_rules import IMPLAUSIBLE, MALFORMED, OUT_OF_RANGE, EventRules
from features.eventlog import EventLog
from features.events import EventType
from features.movielens import import_movielens
from features.redis_stream import event_fields
from parity_api.v1 import recommender_pb2 as pb

NOW = 1_795_000_000_000
SIM = DatasetInfo("simulated", 0, 10, 3, 0, 0, NOW, 20)
CATALOG = ItemCatalog(
    item_id=np.array([7, 8, 9], np.int64),
    topic=np.array([3, 4, -1], np.int32),
    creator_id=np.array([11, 12, -1], np.int64),
    duration_s=np.array([100.0, 0.0, 3000.0]),
    publish_ts=np.zeros(3, np.int64),
)
RULES = EventRules.from_dataset(SIM, CATALOG)
GOOD = dict(event_id="1", ts=str(NOW - 1000), user_id="5", item_id="7", creator_id="11", topic="3", session_id="-1", type="play", value="42.5")


def stream(**changes: str) -> dict[bytes, bytes]:
    fields = {**GOOD, **changes}
    return {k.encode(): v.encode() for k, v in fields.items() if v is not None}


def proto(**changes) -> pb.Event:
    f = dict(event_id="1", ts_ms=NOW - 1000, user_id="5", item_id="7", type="play", value=42.5)
    f.update(changes)
    return pb.Event(**f)


def test_a_valid_event_reads_the_same_on_both_paths() -> None:
    s = RULES.parse_stream([stream()], NOW)
    g = RULES.parse_proto([proto()], NOW)
    assert not s.rejected and not g.rejected
    for col in ("event_id", "ts", "user_id", "item_id", "creator_id", "topic", "session_id", "type", "value"):
        assert getattr(s.events, col).tolist() == getattr(g.events, col).tolist(), col
    assert g.events.topic.tolist() == [3] and g.events.creator_id.tolist() == [11]  # from the catalogue


# (case, stream field changes, proto field changes, field refused (stream name), kind on the stream)
BOTH = [
    ("type code 9", dict(type="9"), dict(type="9"), "type", OUT_OF_RANGE),
    ("type 300 (overflowed int8)", dict(type="300"), dict(type="300"), "type", OUT_OF_RANGE),
    ("unknown type name", dict(type="teleport"), dict(type="teleport"), "type", MALFORMED),
    ("negative user", dict(user_id="-5"), dict(user_id="-5"), "user_id", OUT_OF_RANGE),
    ("negative item", dict(item_id="-1"), dict(item_id="-1"), "item_id", OUT_OF_RANGE),
    ("user beyond 2^31", dict(user_id=str(1 << 31)), dict(user_id=str(1 << 31)), "user_id", OUT_OF_RANGE),
    ("event id 2^63", dict(event_id=str(1 << 63)), dict(event_id=str(1 << 63)), "event_id", OUT_OF_RANGE),
    ("event id not a number", dict(event_id="x1"), dict(event_id="x1"), "event_id", MALFORMED),
    ("negative ts", dict(ts="-5"), dict(ts_ms=-5), "ts", OUT_OF_RANGE),
    ("ts a day ahead", dict(ts=str(NOW + 86_400_000)), dict(ts_ms=NOW + 86_400_000), "ts", OUT_OF_RANGE),
    ("NaN value", dict(value="nan"), dict(value=math.nan), "value", OUT_OF_RANGE),
    ("infinite value", dict(value="inf"), dict(value=math.inf), "value", OUT_OF_RANGE),
    ("a play of 1e7 seconds", dict(value="1e7"), dict(value=1e7), "value", IMPLAUSIBLE),
    ("a negative play", dict(value="-1"), dict(value=-1.0), "value", IMPLAUSIBLE),
    ("a like worth 5", dict(type="like", value="5"), dict(type="like", value=5.0), "value", IMPLAUSIBLE),
    ("a rating in a dataset without ratings", dict(type="rating", value="4"), dict(type="rating", value=4.0), "type", OUT_OF_RANGE),
]


@pytest.mark.parametrize("case,s_change,p_change,field,kind", BOTH, ids=[c[0] for c in BOTH])
def test_both_paths_refuse_the_same_events_naming_the_same_field(case, s_change, p_change, field, kind) -> None:
    s = RULES.parse_stream([stream(), stream(**s_change)], NOW)
    g = RULES.parse_proto([proto(), proto(**p_change)], NOW)
    assert len(s.events) == 1 and len(g.events) == 1
    (rs,), (rg,) = s.rejected, g.rejected
    assert (rs.index, rs.field, rs.kind) == (1, field, kind)
    assert rs.reason.startswith(f"{field}: ")
    proto_field = "ts_ms" if field == "ts" else field
    assert (rg.index, rg.field) == (1, proto_field) and rg.reason.startswith(f"{proto_field}: ")


STREAM_ONLY = [
    ("topic 99999", dict(topic="99999"), "topic"),
    ("topic = n_topics", dict(topic="20"), "topic"),
    ("topic -2", dict(topic="-2"), "topic"),
    ("creator -2", dict(creator_id="-2"), "creator_id"),
    ("creator beyond 2^31", dict(creator_id=str(1 << 31)), "creator_id"),
    ("session -7", dict(session_id="-7"), "session_id"),
    ("session 2^63", dict(session_id=str(1 << 63)), "session_id"),
]


@pytest.mark.parametrize("case,change,field", STREAM_ONLY, ids=[c[0] for c in STREAM_ONLY])
def test_stream_only_fields_are_range_checked(case, change, field) -> None:
    p = RULES.parse_stream([stream(**change)], NOW)
    assert len(p.events) == 0 and [r.field for r in p.rejected] == [field]


def test_optional_stream_fields_default_to_unknown_and_extra_fields_are_ignored() -> None:
    p = RULES.parse_stream([stream(creator_id=None, topic=None, session_id=None, value=None, type="impression") | {b"source": b"web"}], NOW)
    assert not p.rejected
    assert (p.events.creator_id.tolist(), p.events.topic.tolist(), p.events.session_id.tolist()) == ([-1], [-1], [-1])
    assert p.events.value.tolist() == [1.0]  # an impression weighs one, whatever "unset" said
    assert RULES.parse_stream([stream(topic="19"), stream(topic="-1"), stream(creator_id="-1")], NOW).rejected == ()


def test_types_are_read_by_name_in_any_case_or_by_code() -> None:
    p = RULES.parse_stream([stream(type=t, value="1") for t in ("play", "PLAY", "1", "impression", "0", "skip", "3")], NOW)
    assert not p.rejected
    assert p.events.type.tolist() == [1, 1, 1, 0, 0, 3, 3]


def test_a_play_may_last_the_items_duration_times_the_tolerance_else_the_global_cap() -> None:
    cap = RULES.play_cap_s
    cases = [("7", 200.0, True), ("7", 200.1, False), ("7", 0.0, True),  # 100 s item, tolerance 2
             ("8", cap, True), ("8", cap + 1, False),  # duration 0: unknown
             ("9", 6000.0, True), ("9", 6000.5, False),  # a long item: its own duration decides
             ("12345", cap, True), ("12345", cap + 1, False)]  # not in the catalogue
    p = RULES.parse_stream([stream(item_id=i, value=repr(v)) for i, v, _ in cases], NOW)
    assert [i not in {r.index for r in p.rejected} for i in range(len(cases))] == [ok for *_, ok in cases]
    assert "2 x its 100 s duration" in p.rejected[0].reason
    assert cap == 4 * 3600


def test_impressions_likes_and_skips_take_0_or_1_and_are_stored_as_1() -> None:
    p = RULES.parse_stream([stream(type=t, value=v) for t in ("impression", "like", "skip") for v in ("0", "1", "1.0", "2", "0.5", "-1")], NOW)
    assert p.events.value.tolist() == [1.0] * 9
    assert len(p.rejected) == 9 and {r.kind for r in p.rejected} == {IMPLAUSIBLE}


def test_ratings_must_be_within_the_datasets_scale() -> None:
    ml = EventRules.from_dataset(DatasetInfo("movielens", None, 1, 1, 0, 0, NOW, 19))
    p = ml.parse_stream([stream(type="rating", value=v, topic="0") for v in ("1", "5", "3.5", "0", "5.5", "-1")], NOW)
    assert p.events.value.tolist() == [1.0, 5.0, 3.5]
    assert [r.reason for r in p.rejected][0] == "value: a rating must be in [1, 5], got 0"
    assert EventRules.from_dataset(SIM).parse_stream([stream(type="rating", value="4")], NOW).rejected[0].reason.startswith(
        "type: rating events are not part of simulated")


def test_the_future_bound_applies_only_when_a_clock_is_given() -> None:
    far = stream(ts=str(NOW + 10**9))
    assert len(RULES.parse_stream([far], NOW).events) == 0
    assert len(RULES.parse_stream([far], None).events) == 1
    assert len(RULES.parse_stream([stream(ts=str(NOW + RULES.max_future_ms))], NOW).events) == 1


def test_hostile_stream_messages_are_refused_never_raised_and_echo_little() -> None:
    huge = b"A" * 1_000_000
    messages = [
        None, {}, {b"ts": b"1"},
        stream() | {b"event_id": b"\xff\xfe"},  # not UTF-8
        stream() | {b"\xff": b"\xfe"},  # a non-UTF-8 extra field: ignored, the event is fine
        stream() | {b"event_id": huge}, stream() | {b"type": huge}, stream() | {b"value": huge}, stream() | {b"extra": huge},
        stream(user_id="١٢"), stream(user_id="+5"), stream(user_id=" 5"), stream(user_id="5.0"), stream(user_id="1_0"),
        stream(value="1_0"), stream(value=" 1"), stream(value="0x10"), stream(ts="9" * 30), stream(ts="1e12"),
        {"event_id": "1", "ts": 5, "user_id": "1", "item_id": "1", "type": "play"},  # a non-text value
        {b"event_id": b"1", b"ts": b"1", b"user_id": b"1", b"item_id": b"1", b"type": b"play", b"value": b"1", b"value ": b"x"},
        {**GOOD, "value": "١٢"}, {**GOOD, "type": "١"}, [("event_id", "1")],  # Unicode digits in str fields; not a mapping
    ]
    p = RULES.parse_stream(messages, NOW)
    accepted = set(p.index.tolist())
    assert accepted == {4, 8, 20}
    assert accepted.isdisjoint(r.index for r in p.rejected) and len(accepted) + len(p.rejected) == len(messages)
    for r in p.rejected:
        assert r.reason.startswith(r.field + ": ") and "A" * 25 not in r.reason and len(r.reason) < 160, r


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.dictionaries(
    st.sampled_from([b"event_id", b"ts", b"user_id", b"item_id", b"creator_id", b"topic", b"session_id", b"type", b"value", b"x", b"\xff"]),
    st.one_of(st.binary(max_size=30), st.sampled_from([b"-1", b"0", b"1", b"play", b"300", b"9223372036854775808", b"nan", b"1e308"])),
)), max_size=8))
def test_any_stream_input_is_either_an_event_or_a_rejection(messages) -> None:
    p = RULES.parse_stream(messages, NOW)
    assert len(p.events) + len(p.rejected) == len(messages)
    assert sorted([*p.index.tolist(), *(r.index for r in p.rejected)]) == list(range(len(messages)))


def test_published_events_read_back_unchanged(small_sim: Path) -> None:
    """event_fields (what `parity features publish` writes) parse back to the same events."""
    events = EventLog(small_sim / "events").read()
    rules = EventRules.from_dataset(load_info(small_sim), ItemCatalog.from_table(read_items(small_sim)))
    p = rules.parse_stream([{k.encode(): v.encode() for k, v in f.items()} for f in event_fields(events)], NOW)
    assert p.rejected == ()  # the honest simulated log passes every rule
    for col in ("event_id", "ts", "user_id", "item_id", "creator_id", "topic", "session_id", "type", "value"):
        assert np.array_equal(getattr(p.events, col), getattr(events, col)), col


def test_the_movielens_log_passes_the_movielens_rules(movielens_dir: Path, tmp_path: Path) -> None:
    import_movielens(movielens_dir, tmp_path / "ml")
    events = EventLog(tmp_path / "ml" / "events").read()
    rules = EventRules.from_dataset(load_info(tmp_path / "ml"), ItemCatalog.from_table(read_items(tmp_path / "ml")))
    p = rules.parse_stream([{k: v for k, v in f.items()} for f in event_fields(events)], None)
    assert p.rejected == () and len(p.events) == len(events)
    assert set(np.unique(p.events.type).tolist()) == {int(EventType.RATING)}


def test_rules_options_are_validated_where_given() -> None:
    with pytest.raises(ValueError, match="play_tolerance"):
        EventRules(play_tolerance=0.5)
    with pytest.raises(ValueError, match="play_cap_s"):
        EventRules(play_cap_s=math.inf)
    with pytest.raises(TypeError, match="n_topics"):
        EventRules(n_topics="20")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rating_range"):
        EventRules(rating_range=(5.0, 1.0))
    with pytest.raises(ValueError, match="max_future_ms"):
        EventRules(max_future_ms=-1)
    assert EventRules.from_dataset(SIM, play_cap_s=60.0).play_cap_s == 60.0


def test_with_catalog_swaps_the_catalogue_only() -> None:
    empty = ItemCatalog.from_table(pa.table({"item_id": pa.array([], pa.int64()), "topic": pa.array([], pa.int32()),
                                             "creator_id": pa.array([], pa.int64()), "duration_s": pa.array([], pa.float64()),
                                             "publish_ts": pa.array([], pa.int64())}))
    r = RULES.with_catalog(empty)
    assert r.n_topics == RULES.n_topics and r.catalog is empty
    p = r.parse_proto([proto(value=1000.0)], NOW)  # 1000 s: too long for item 7 of the old catalogue, fine unknown
    assert not p.rejected and p.events.topic.tolist() == [-1]
    assert RULES.parse_proto([proto(value=1000.0)], NOW).rejected[0].field == "value"
