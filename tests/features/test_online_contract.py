"""One contract, three backends: every test here runs against MemoryStore, RedisStore and RedisStore on a cluster.

Redis-only tests at the end cover what memory cannot show: raw key layout, round trips and
unavailability. The third backend, "cluster", is a RedisStore on a private 3-master,
3-replica Redis Cluster (tests/conftest.py); its own behaviours are in test_redis_cluster.py.
"""
from __future__ import annotations

import socket
import time

import pytest

from features.online.base import KeyGroup, OnlineStore, RecordKey, StoreUnavailable, Write, format_key
from features.online.memory import MemoryStore
from features.online.registry import open_store

redis = pytest.importorskip("redis")

from features.online.redis_store import RedisStore  # noqa: E402  (needs the redis package)

HOUR_MS = 3_600_000


def rk(entity_id: str, feature_set: str = "clicks", version: str = "v1", entity_type: str = "user") -> RecordKey:
    return RecordKey(feature_set, version, entity_type, entity_id)


def put(store: OnlineStore, *keys: RecordKey, value: bytes = b"x", ttl_ms: int = HOUR_MS) -> None:
    store.commit([Write(k, value, ttl_ms) for k in keys])


def let_expire(store: OnlineStore, ttl_ms: int, probe: RecordKey | None = None, event_id: int | None = None) -> None:
    """Move past ttl_ms: advance the manual clock (memory) or poll the server (redis).

    Polling is bounded (2 s) so a broken expiry fails the test instead of hanging it.
    """
    clock = getattr(store, "clock", None)
    if hasattr(clock, "advance"):
        clock.advance(ttl_ms / 1000.0 + 0.001)
        return
    deadline = time.monotonic() + 2.0
    time.sleep(ttl_ms / 1000.0)
    while time.monotonic() < deadline:
        gone_record = probe is None or store.get_many([probe]) == [None]
        gone_marker = event_id is None or store.seen([event_id]) == [False]
        if gone_record and gone_marker:
            return
        time.sleep(0.01)
    pytest.fail(f"nothing expired within 2 s after a {ttl_ms} ms TTL")


# -- reads and writes ------------------------------------------------------------------------


def test_round_trip_of_opaque_bytes(online_store: OnlineStore) -> None:
    values = {
        rk("1"): b"",
        rk("2"): b"\x00\x01\x00binary\xff\x00",
        rk("3"): bytes(range(256)) * 4,
    }
    online_store.commit([Write(k, v, HOUR_MS) for k, v in values.items()])
    assert online_store.get_many(list(values)) == list(values.values())


def test_get_many_keeps_order_and_reports_absent_as_none(online_store: OnlineStore) -> None:
    online_store.commit([Write(rk("a"), b"A", HOUR_MS), Write(rk("b"), b"B", HOUR_MS)])
    keys = [rk("b"), rk("missing"), rk("a"), rk("a", version="v2"), rk("b")]
    assert online_store.get_many(keys) == [b"B", None, b"A", None, b"B"]
    assert online_store.get_many([]) == []


def test_get_groups_reads_what_get_many_reads_for_the_same_keys_in_one_call(online_store: OnlineStore) -> None:
    online_store.commit([Write(rk("a"), b"A", HOUR_MS), Write(rk("7", version="v2", entity_type="item"), b"I", HOUR_MS)])
    groups = [KeyGroup("clicks", "v1", "user", ["a", "missing", "a"]), KeyGroup("clicks", "v2", "item", ["7", "8"]), KeyGroup("clicks", "v1", "user", [])]
    assert online_store.get_groups(groups) == online_store.get_many([k for g in groups for k in g.keys()]) == [b"A", None, b"A", b"I", None]
    assert online_store.get_groups([]) == []


@pytest.mark.parametrize("field", ["feature_set", "version", "entity_type", "entity_id"])
@pytest.mark.parametrize("bad", ["", "a:b", "a b", "{a}"])
def test_get_groups_refuses_a_bad_key_part_naming_it(online_store: OnlineStore, field: str, bad: str) -> None:
    parts = {"feature_set": "clicks", "version": "v1", "entity_type": "user"}
    ids = ["1", "2"]
    if field == "entity_id":
        ids = ["1", bad]
    else:
        parts[field] = bad
    with pytest.raises(ValueError, match=field):
        online_store.get_groups([KeyGroup(**parts, entity_ids=ids)])
    with pytest.raises(ValueError, match="strings"):
        online_store.get_groups([KeyGroup("clicks", "v1", "user", [1, 2])])


def test_later_commit_overwrites(online_store: OnlineStore) -> None:
    put(online_store, rk("1"), value=b"old")
    put(online_store, rk("1"), value=b"new")
    assert online_store.get_many([rk("1")]) == [b"new"]


def test_records_expire_after_their_ttl(online_store: OnlineStore) -> None:
    short, long = rk("short"), rk("long")
    online_store.commit([Write(short, b"s", 60), Write(long, b"l", HOUR_MS)])
    assert online_store.get_many([short, long]) == [b"s", b"l"]
    let_expire(online_store, 60, probe=short)
    assert online_store.get_many([short, long]) == [None, b"l"]
    assert set(online_store.iter_keys()) == {long}
    assert online_store.delete([short]) == 0  # expired records are not counted as existing


@pytest.mark.parametrize("ttl_ms", [0, -1, -HOUR_MS])
def test_non_positive_ttl_is_rejected_and_nothing_is_written(online_store: OnlineStore, ttl_ms: int) -> None:
    good = Write(rk("good"), b"g", HOUR_MS)
    with pytest.raises(ValueError, match="ttl_ms"):
        online_store.commit([good, Write(rk("bad"), b"b", ttl_ms)], dedupe_ids=[7], dedupe_ttl_ms=HOUR_MS, meta={"wm": "1"})
    assert online_store.get_many([good.key]) == [None]
    assert online_store.seen([7]) == [False]
    assert online_store.get_meta("wm") is None


def test_non_bytes_value_is_rejected(online_store: OnlineStore) -> None:
    with pytest.raises(TypeError, match="bytes"):
        online_store.commit([Write(rk("1"), "text", HOUR_MS)])  # type: ignore[arg-type]


# -- commit, dedupe, meta --------------------------------------------------------------------


def test_commit_makes_records_markers_and_meta_visible_together(online_store: OnlineStore) -> None:
    writes = [Write(rk(str(i)), f"v{i}".encode(), HOUR_MS) for i in range(5)]
    assert online_store.seen([101, 102]) == [False, False]
    online_store.commit(writes, dedupe_ids=[101, 102], dedupe_ttl_ms=HOUR_MS, meta={"watermark": "1700000000000", "state": "live"})
    assert online_store.get_many([w.key for w in writes]) == [w.value for w in writes]
    assert online_store.seen([101, 103, 102]) == [True, False, True]
    assert online_store.get_meta("watermark") == "1700000000000"
    assert online_store.get_meta("state") == "live"


def test_commit_with_only_markers_or_nothing(online_store: OnlineStore) -> None:
    online_store.commit([])
    online_store.commit([], dedupe_ids=[5], dedupe_ttl_ms=HOUR_MS)
    assert online_store.seen([5, 6]) == [True, False]
    assert list(online_store.iter_keys()) == []


def test_dedupe_markers_expire(online_store: OnlineStore) -> None:
    online_store.commit([], dedupe_ids=[9], dedupe_ttl_ms=60)
    assert online_store.seen([9]) == [True]
    let_expire(online_store, 60, event_id=9)
    assert online_store.seen([9]) == [False]


def test_dedupe_ids_need_a_positive_ttl(online_store: OnlineStore) -> None:
    with pytest.raises(ValueError, match="dedupe_ttl_ms"):
        online_store.commit([Write(rk("1"), b"x", HOUR_MS)], dedupe_ids=[1])
    assert online_store.get_many([rk("1")]) == [None]


def test_seen_of_nothing_is_empty(online_store: OnlineStore) -> None:
    assert online_store.seen([]) == []


def test_meta_round_trip(online_store: OnlineStore) -> None:
    assert online_store.get_meta("watermark:clicks") is None
    online_store.set_meta("watermark:clicks", "1")
    online_store.set_meta("watermark:clicks", "2")
    assert online_store.get_meta("watermark:clicks") == "2"
    assert online_store.get_meta("other") is None
    assert list(online_store.iter_keys()) == []  # meta is not a record


# -- counters (incr_many) ----------------------------------------------------------------------


def test_incr_many_adds_and_returns_the_new_values_in_order(online_store: OnlineStore) -> None:
    assert online_store.incr_many(["a", "b"], [1, 5], HOUR_MS) == [1, 5]
    assert online_store.incr_many(["b", "c", "a"], [2, 0, 3], HOUR_MS) == [7, 0, 4]
    assert online_store.incr_many([], [], HOUR_MS) == []


def test_incr_many_counts_a_name_listed_twice_twice(online_store: OnlineStore) -> None:
    assert online_store.incr_many(["x", "x", "y"], [2, 3, 1], HOUR_MS) == [2, 5, 1]


def test_a_counter_expires_ttl_after_it_was_created_and_increments_do_not_extend_it(online_store: OnlineStore) -> None:
    online_store.incr_many(["w"], [1], 200)
    if hasattr(getattr(online_store, "clock", None), "advance"):
        online_store.clock.advance(0.15)
    else:
        time.sleep(0.15)
    assert online_store.incr_many(["w"], [1], 200) == [2]  # the same window: its expiry is not pushed back
    let_expire(online_store, 60)
    deadline = time.monotonic() + 2.0
    while online_store.incr_many(["w"], [0], 200) != [0]:
        assert time.monotonic() < deadline, "the counter never expired"
        time.sleep(0.01)
    assert online_store.incr_many(["w"], [4], 200) == [4]  # a new counter, a new expiry


def test_counters_are_not_records_or_meta_and_clear_namespace_removes_them(online_store: OnlineStore) -> None:
    online_store.incr_many(["rate:1:u:5", "a:b:c:d"], [1, 1], HOUR_MS)
    assert list(online_store.iter_keys()) == []
    assert online_store.get_meta("rate:1:u:5") is None
    online_store.set_meta("rate:1:u:5", "meta")
    assert online_store.incr_many(["rate:1:u:5"], [1], HOUR_MS) == [2]
    assert online_store.clear_namespace() == 3
    assert online_store.incr_many(["rate:1:u:5"], [1], HOUR_MS) == [1]


@pytest.mark.parametrize(
    "names,amounts,ttl_ms,error",
    [
        (["a"], [1, 2], HOUR_MS, ValueError),
        (["a"], [-1], HOUR_MS, ValueError),
        (["a"], [1.5], HOUR_MS, TypeError),
        (["a"], [True], HOUR_MS, TypeError),
        (["a"], [1], 0, ValueError),
        (["a"], [1], 1.5, TypeError),
        (["a b"], [1], HOUR_MS, ValueError),
        ([""], [1], HOUR_MS, ValueError),
        (["ok", "{x}"], [1, 1], HOUR_MS, ValueError),
    ],
)
def test_incr_many_refuses_bad_arguments_before_counting_anything(online_store: OnlineStore, names, amounts, ttl_ms, error) -> None:
    with pytest.raises(error):
        online_store.incr_many(names, amounts, ttl_ms)
    assert online_store.incr_many(["ok", "a"], [0, 0], HOUR_MS) == [0, 0]


def test_incr_many_is_isolated_by_namespace(online_store: OnlineStore, request: pytest.FixtureRequest) -> None:
    ns = online_store.namespace + "x"
    other = RedisStore(online_store.url, namespace=ns) if isinstance(online_store, RedisStore) else MemoryStore(ns)
    with other:
        online_store.incr_many(["n"], [3], HOUR_MS)
        assert other.incr_many(["n"], [1], HOUR_MS) == [1]


# -- delete ----------------------------------------------------------------------------------


def test_delete_counts_existing_records(online_store: OnlineStore) -> None:
    put(online_store, rk("1"), rk("2"))
    assert online_store.delete([rk("1"), rk("3"), rk("1")]) == 1
    assert online_store.get_many([rk("1"), rk("2")]) == [None, b"x"]
    assert online_store.delete([]) == 0


def test_delete_counters_removes_only_what_the_matcher_accepts(online_store: OnlineStore) -> None:
    """Erasure: a user's rate-limit tallies carry their id in the counter name."""
    from features.contribution import ContributionLimiter

    names = ["contrib:3600000:7:u:42", "contrib:3600000:7:ui:42:9", "contrib:3600000:7:u:420", "contrib:3600000:7:ui:4:42", "other:1"]
    online_store.incr_many(names, [1] * len(names), 60_000)
    match = ContributionLimiter(online_store).user_counters(42)
    assert online_store.delete_counters(match) == 2
    assert online_store.delete_counters(match) == 0  # nothing of user 42 is left
    assert online_store.incr_many(names, [1] * len(names), 60_000) == [1, 1, 2, 2, 2]  # the others kept their counts


def test_delete_matching_one_version_only(online_store: OnlineStore) -> None:
    v1 = [rk(str(i), version="v1") for i in range(3)]
    v2 = [rk(str(i), version="v2") for i in range(3)]
    other = rk("1", feature_set="plays")
    put(online_store, *v1, *v2, other)
    assert online_store.delete_matching("clicks", "v1") == 3
    assert set(online_store.iter_keys()) == {*v2, other}
    assert online_store.delete_matching("clicks") == 3
    assert set(online_store.iter_keys()) == {other}


def test_delete_matching_entity_prefix_erases_pairs_of_one_user(online_store: OnlineStore) -> None:
    pair = lambda eid, **kw: rk(eid, feature_set="affinity", entity_type="user_item", **kw)  # noqa: E731
    doomed = [pair("42|7"), pair("42|8")]
    kept = [pair("420|7"), pair("4|2"), pair("142|7"), pair("42|7", version="v2"), rk("42|7", feature_set="affinity", entity_type="user_topic")]
    put(online_store, *doomed, *kept)
    assert online_store.delete_matching("affinity", "v1", "user_item", "42|") == 2
    assert online_store.get_many(doomed) == [None, None]
    assert set(online_store.iter_keys()) == set(kept)
    # Without a version or entity type the prefix applies to every version and type.
    assert online_store.delete_matching("affinity", entity_prefix="42|") == 2
    assert set(online_store.iter_keys()) == {pair("420|7"), pair("4|2"), pair("142|7")}


def test_delete_matching_escapes_glob_characters(online_store: OnlineStore) -> None:
    ids = ["a*b", "a*c", "axb", "a?b", "ayb", "a[b]", "ab", "a\\b", "a\\\\b", "a]b"]
    put(online_store, *(rk(i) for i in ids))
    assert online_store.delete_matching("clicks", "v1", "user", "a*") == 2
    assert online_store.delete_matching("clicks", "v1", "user", "a?") == 1
    assert online_store.delete_matching("clicks", "v1", "user", "a[") == 1
    assert online_store.delete_matching("clicks", "v1", "user", "a\\") == 2
    assert online_store.delete_matching("clicks", "v1", "user", "a]") == 1
    assert {k.entity_id for k in online_store.iter_keys()} == {"axb", "ayb", "ab"}
    # Glob characters in other parts are literal too.
    put(online_store, rk("1", version="v*"), rk("1", entity_type="u?"))
    assert online_store.delete_matching("clicks", version="v*") == 1
    assert online_store.delete_matching("clicks", entity_type="u?") == 1
    assert {k.entity_id for k in online_store.iter_keys()} == {"axb", "ayb", "ab"}


# -- iteration, key format, validation ----------------------------------------------------


def test_iter_keys_lists_live_records_only(online_store: OnlineStore) -> None:
    clicks = [rk(str(i)) for i in range(30)]
    plays = [rk(str(i), feature_set="plays", entity_type="item") for i in range(5)]
    put(online_store, *clicks, *plays)
    online_store.commit([], dedupe_ids=[1, 2], dedupe_ttl_ms=HOUR_MS, meta={"a:b:c": "meta that looks like a key"})
    assert sorted(online_store.iter_keys(), key=repr) == sorted(clicks + plays, key=repr)
    assert set(online_store.iter_keys("plays")) == set(plays)
    assert list(online_store.iter_keys("nothing")) == []


def test_key_format(online_store: OnlineStore) -> None:
    key = RecordKey("clicks", "v3", "user", "42|7")
    ns = online_store.namespace
    assert format_key(ns, key) == f"{ns}:clicks:v3:user:42|7"
    online_store.commit([Write(key, b"\x00raw", HOUR_MS)], dedupe_ids=[77], dedupe_ttl_ms=HOUR_MS, meta={"wm": "5"})
    if isinstance(online_store, RedisStore) and online_store.url.startswith("redis+cluster://"):
        # hash tags: the entity's records in one slot, metadata and commit markers in another
        raw = redis.cluster.RedisCluster.from_url("redis://" + online_store.url.split("://", 1)[1])
        try:
            assert set(raw.scan_iter(match=f"{ns}:*")) == {
                f"{ns}:clicks:v3:user:{{42|7}}".encode(),
                f"{ns}:__dedupe__:{{{ns}:meta}}:77".encode(),
                f"{ns}:__meta__:{{{ns}:meta}}:wm".encode(),
            }
            assert raw.get(f"{ns}:clicks:v3:user:{{42|7}}") == b"\x00raw"
            assert 0 < raw.pttl(f"{ns}:clicks:v3:user:{{42|7}}") <= HOUR_MS
            assert 0 < raw.pttl(f"{ns}:__dedupe__:{{{ns}:meta}}:77") <= HOUR_MS
            assert raw.get(f"{ns}:__meta__:{{{ns}:meta}}:wm") == b"5"
        finally:
            raw.close()
    elif isinstance(online_store, RedisStore):
        raw = redis.Redis.from_url(online_store.url)
        try:
            assert set(raw.keys("*")) == {
                f"{ns}:clicks:v3:user:42|7".encode(),
                f"{ns}:__dedupe__:77".encode(),
                f"{ns}:__meta__:wm".encode(),
            }
            assert raw.get(f"{ns}:clicks:v3:user:42|7") == b"\x00raw"
            assert 0 < raw.pttl(f"{ns}:clicks:v3:user:42|7") <= HOUR_MS
            assert 0 < raw.pttl(f"{ns}:__dedupe__:77") <= HOUR_MS
            assert raw.get(f"{ns}:__meta__:wm") == b"5"
        finally:
            raw.close()


BAD_PARTS = ["", "a:b", "a b", "a\tb", "{a}", "a}", "a\n"]


@pytest.mark.parametrize("field", ["feature_set", "version", "entity_type", "entity_id"])
@pytest.mark.parametrize("bad", BAD_PARTS)
def test_bad_key_parts_are_rejected(online_store: OnlineStore, field: str, bad: str) -> None:
    parts = {"feature_set": "clicks", "version": "v1", "entity_type": "user", "entity_id": "1"}
    parts[field] = bad
    key = RecordKey(**parts)
    with pytest.raises(ValueError, match=field):
        online_store.get_many([key])
    with pytest.raises(ValueError, match=field):
        online_store.commit([Write(key, b"x", HOUR_MS)])
    with pytest.raises(ValueError, match=field):
        online_store.delete([key])
    assert list(online_store.iter_keys()) == []


def test_bad_filters_and_reserved_names_are_rejected(online_store: OnlineStore) -> None:
    with pytest.raises(ValueError):
        online_store.delete_matching("clicks", "v:1")
    with pytest.raises(ValueError):
        online_store.delete_matching("clicks", entity_prefix="4 2")
    with pytest.raises(ValueError):
        online_store.delete_matching("")
    with pytest.raises(ValueError, match="reserved"):
        online_store.commit([Write(rk("1", feature_set="__meta__"), b"x", HOUR_MS)])
    with pytest.raises(ValueError):
        online_store.set_meta("", "x")
    with pytest.raises(ValueError):
        list(online_store.iter_keys("a:b"))


def test_namespaces_isolate_stores(online_store: OnlineStore, request: pytest.FixtureRequest) -> None:
    other: OnlineStore
    if isinstance(online_store, RedisStore):
        other = RedisStore(online_store.url, namespace=online_store.namespace + "x")
    else:
        other = MemoryStore(online_store.namespace + "x")
    with other:
        put(online_store, rk("1"), rk("2"))
        online_store.commit([], dedupe_ids=[1], dedupe_ttl_ms=HOUR_MS, meta={"wm": "a"})
        put(other, rk("1"), value=b"other")
        assert other.get_many([rk("1"), rk("2")]) == [b"other", None]
        assert other.seen([1]) == [False] and other.get_meta("wm") is None
        assert list(other.iter_keys()) == [rk("1")]
        assert other.delete_matching("clicks") == 1
        assert online_store.get_many([rk("1"), rk("2")]) == [b"x", b"x"]
        assert online_store.seen([1]) == [True] and online_store.get_meta("wm") == "a"


# -- registry --------------------------------------------------------------------------------


def test_open_store_specs() -> None:
    with open_store("memory", namespace="reg") as store:
        assert isinstance(store, MemoryStore) and store.namespace == "reg"
    # Constructing a RedisStore does not connect, so no server is needed here.
    with open_store("redis://127.0.0.1:1/0", socket_timeout_s=0.2) as store:
        assert isinstance(store, RedisStore)
    with open_store("rediss://user:secret@127.0.0.1:1/0") as store:
        assert isinstance(store, RedisStore) and "secret" not in store.url
    with pytest.raises(ValueError, match="memory.*redis://"):
        open_store("postgres://db")
    with pytest.raises(TypeError, match="socket_timeout"):
        open_store("redis://127.0.0.1:1/0", socket_timeout=1)
    with pytest.raises(TypeError, match="socket_timeout_s"):
        open_store("memory", socket_timeout_s=1)


# -- redis only --------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_redis_unavailable_is_reported_quickly() -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    with RedisStore(url, namespace="down") as store:
        calls = [
            lambda: store.get_many([rk("1")]),
            lambda: store.commit([Write(rk("1"), b"x", HOUR_MS)], dedupe_ids=[1], dedupe_ttl_ms=HOUR_MS),
            lambda: store.seen([1]),
            lambda: store.get_meta("wm"),
            lambda: store.delete([rk("1")]),
            lambda: store.delete_matching("clicks"),
            lambda: list(store.iter_keys()),
            lambda: store.incr_many(["c"], [1], HOUR_MS),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{url.split(':')[2]}"):
                call()
            assert time.monotonic() - started < 2.0


def _commandstats(client: "redis.Redis") -> dict[str, int]:
    return {name: int(stats["calls"]) for name, stats in client.info("commandstats").items()}


@pytest.mark.redis
def test_redis_get_many_is_one_round_trip_of_one_mget(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 40
    keys = [rk(str(i)) for i in range(n)]
    admin = redis.Redis.from_url(redis_url)
    with RedisStore(redis_url, namespace="rt") as store:
        put(store, *keys[::2])
        store.get_many(keys[:1])  # open (and handshake) the pooled connection first
        sends: list[object] = []
        real = redis.connection.AbstractConnection.send_packed_command

        def counting(self: object, command: object, check_health: bool = True) -> None:
            sends.append(command)
            real(self, command, check_health)

        before = _commandstats(admin)
        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        values = store.get_many(keys)
        assert len(sends) == 1, "get_many must be a single write"
        commit_sends = len(sends)
        store.commit([Write(rk("n"), b"n", HOUR_MS)], dedupe_ids=[1], dedupe_ttl_ms=HOUR_MS, meta={"wm": "1"})
        assert len(sends) - commit_sends == 1, "commit must be a single MULTI/EXEC round trip"
        monkeypatch.undo()
        after = _commandstats(admin)
    admin.close()
    assert values == [b"x" if i % 2 == 0 else None for i in range(n)]
    assert after.get("cmdstat_mget", 0) - before.get("cmdstat_mget", 0) == 1  # one command for all n keys (single node)
    assert after.get("cmdstat_get", 0) - before.get("cmdstat_get", 0) == 0
    assert after.get("cmdstat_exec", 0) - before.get("cmdstat_exec", 0) == 1


@pytest.mark.redis
def test_redis_incr_many_is_one_round_trip_and_keys_expire(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = redis.Redis.from_url(redis_url)
    with RedisStore(redis_url, namespace="cnt") as store:
        store.incr_many(["warm"], [1], HOUR_MS)
        sends: list[object] = []
        real = redis.connection.AbstractConnection.send_packed_command

        def counting(self: object, command: object, check_health: bool = True) -> None:
            sends.append(command)
            real(self, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        assert store.incr_many([f"c:{i}" for i in range(50)], [1] * 50, HOUR_MS) == [1] * 50
        assert len(sends) == 1, "incr_many must be a single round trip"
        monkeypatch.undo()
    assert admin.get("cnt:__count__:c:7") == b"1"
    assert 0 < admin.pttl("cnt:__count__:c:7") <= HOUR_MS
    admin.close()


# Redis Cluster: the whole suite above runs on a 3+3 cluster (the "cluster" backend); what
# only a cluster shows (slot groups, failover, consumers per master) is in test_redis_cluster.py.


def test_clear_namespace_removes_records_markers_and_meta_of_this_namespace_only(online_store: OnlineStore) -> None:
    ns = online_store.namespace + "x"
    other = RedisStore(online_store.url, namespace=ns) if isinstance(online_store, RedisStore) else MemoryStore(ns)
    online_store.commit([Write(rk("1"), b"a", HOUR_MS)], dedupe_ids=[7], dedupe_ttl_ms=HOUR_MS, meta={"wm": "1"})
    other.commit([Write(rk("1"), b"b", HOUR_MS)], dedupe_ids=[7], dedupe_ttl_ms=HOUR_MS)
    assert online_store.clear_namespace() == 3
    assert online_store.get_many([rk("1")]) == [None] and online_store.seen([7]) == [False] and online_store.get_meta("wm") is None
    assert other.get_many([rk("1")]) == [b"b"] and other.seen([7]) == [True]
    other.close()


def test_a_transaction_with_bad_output_is_refused_whole(online_store: OnlineStore) -> None:
    from features.online.base import Commit

    def bad(snap):
        return Commit([Write(rk("1"), b"a", HOUR_MS)], meta={"wm": 5})  # meta values must be str

    with pytest.raises(TypeError, match="meta value"):
        online_store.transact([rk("1")], [], [], bad)
    assert online_store.get_many([rk("1")]) == [None]
