"""Serving modes: the declaration, its override syntax, and the copy kept in the online store
that every worker reads (memory and a private Redis)."""
from __future__ import annotations

import argparse
import json

import pytest

from features.durations import format_duration_ms, parse_duration_ms
from features.events import MS_PER_DAY, MS_PER_HOUR, MS_PER_MINUTE
from features.lookup import record_keys
from features.modes import (
    DEFAULT_CAP,
    MAX_CAP,
    STREAMING,
    ModePlan,
    ServingMode,
    SetMode,
    load_mode,
    load_modes,
    mode_from_meta,
    mode_key,
    parse_overrides,
    save_mode,
)
from features.repo import feature_sets
from parity.argtypes import duration

SETS = feature_sets("simulated", 20)
NAMES = [fs.name for fs in SETS]


# -- durations -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, ms",
    [("30s", 30_000), ("15m", 15 * MS_PER_MINUTE), ("1h", MS_PER_HOUR), ("1d", MS_PER_DAY), ("500ms", 500),
     ("90min", 90 * MS_PER_MINUTE), ("1.5h", 90 * MS_PER_MINUTE), (" 2d ", 2 * MS_PER_DAY), ("0", 0), ("0s", 0)],
)
def test_durations_parse_to_exact_milliseconds(text, ms):
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize(
    "text, says",
    [("15", "unit is required"), ("15x", "bad duration '15x'"), ("", "bad duration"), ("-1m", "bad duration"),
     ("0.5ms", "whole number of milliseconds"), ("1e3s", "bad duration"), ("99999999999999999d", "longer than")],
)
def test_bad_durations_say_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        parse_duration_ms(text)


@pytest.mark.parametrize("ms", [0, 1, 999, 1000, 90_000, 15 * MS_PER_MINUTE, MS_PER_HOUR + 1, 7 * MS_PER_DAY])
def test_formatted_durations_parse_back(ms):
    assert parse_duration_ms(format_duration_ms(ms)) == ms


def test_formatting_uses_the_largest_exact_unit():
    assert [format_duration_ms(x) for x in (900_000, 90_000, MS_PER_DAY, 1500)] == ["15m", "90s", "1d", "1500ms"]


def test_the_argparse_duration_names_the_option():
    assert duration("--every")("15m") == 15 * MS_PER_MINUTE
    with pytest.raises(argparse.ArgumentTypeError, match="--every: bad duration '15q'"):
        duration("--every")("15q")
    with pytest.raises(argparse.ArgumentTypeError, match="--every must be at least 1 ms"):
        duration("--every")("0")
    assert duration("--staleness", minimum_ms=0)("0") == 0


# -- the declaration -----------------------------------------------------------------------
def test_on_read_defaults_its_cap_and_equal_declarations_compare_equal():
    assert SetMode("on_read").cap == DEFAULT_CAP
    assert SetMode(ServingMode.ON_READ) == SetMode("on_read", cap=DEFAULT_CAP)
    assert SetMode("streaming") == STREAMING


@pytest.mark.parametrize(
    "kwargs, err, says",
    [
        ({"mode": "materialized"}, ValueError, "materialized needs a cadence"),
        ({"mode": "materialized", "every_ms": 0}, ValueError, "every_ms must be > 0"),
        ({"mode": "materialized", "every_ms": 1.5}, TypeError, "every_ms must be an int"),
        ({"mode": "streaming", "every_ms": 60_000}, ValueError, "streaming takes none"),
        ({"mode": "on_read", "every_ms": 60_000}, ValueError, "on_read takes none"),
        ({"mode": "on_read", "cap": 0}, ValueError, r"cap must be in \[1, 4096\]"),
        ({"mode": "on_read", "cap": MAX_CAP + 1}, ValueError, "cap must be in"),
        ({"mode": "on_read", "cap": True}, TypeError, "cap must be an int"),
        ({"mode": "materialized", "every_ms": 60_000, "cap": 5}, ValueError, "materialized takes none"),
        ({"mode": "lazy"}, ValueError, "unknown serving mode 'lazy'; allowed: streaming, materialized, on_read"),
    ],
)
def test_a_declaration_refuses_parameters_its_mode_does_not_have(kwargs, err, says):
    with pytest.raises(err, match=says):
        SetMode(**kwargs)


# -- overrides as a command line gives them ------------------------------------------------
def test_overrides_parse_every_mode_and_option():
    got = parse_overrides("user_activity=on_read, user_creator=materialized:15m,item_popularity=on_read:cap=128,"
                          "user_topic=materialized:every=1h", NAMES)
    assert got == {
        "user_activity": SetMode("on_read"),
        "user_creator": SetMode("materialized", every_ms=15 * MS_PER_MINUTE),
        "item_popularity": SetMode("on_read", cap=128),
        "user_topic": SetMode("materialized", every_ms=MS_PER_HOUR),
    }
    assert parse_overrides("user_activity=streaming") == {"user_activity": STREAMING}


@pytest.mark.parametrize(
    "text, says",
    [
        ("user_activity=lazy", r"'user_activity' \('lazy'\): unknown serving mode 'lazy'; allowed: streaming, materialized, on_read"),
        ("user_creator=materialized", r"'user_creator'.*materialized needs exactly one cadence"),
        ("user_creator=materialized:15x", r"'user_creator'.*cadence '15x'.*bad duration"),
        ("user_creator=materialized:15", r"'user_creator'.*unit is required"),
        ("user_creator=materialized:0m", r"'user_creator'.*longer than 0"),
        ("user_creator=materialized:15m:1h", r"'user_creator'.*exactly one cadence"),
        ("user_creator=materialized:cap=5", r"'user_creator'.*unknown materialized option 'cap=5'"),
        ("item_popularity=on_read:cap=many", r"'item_popularity'.*cap must be an integer, got 'many'"),
        ("item_popularity=on_read:cap=0", r"'item_popularity'.*cap must be in \[1, 4096\], got 0"),
        ("item_popularity=on_read:size=3", r"'item_popularity'.*unknown on_read option 'size=3'; allowed: cap=N"),
        ("item_popularity=on_read:cap=3:cap=4", r"'item_popularity'.*cap given twice"),
        ("user_activity=streaming:15m", r"'user_activity'.*streaming takes no options"),
        ("user_activity", r"mode override 'user_activity' must read set=mode"),
        ("=on_read", "must read set=mode"),
        ("user_activity=on_read,,user_topic=on_read", "empty entry"),
        ("user_activity=on_read,user_activity=streaming", "'user_activity' is given twice"),
        ("users=on_read", "unknown feature set 'users'; known: item_popularity, user_activity, user_creator, user_topic"),
    ],
)
def test_bad_overrides_name_the_set_and_the_bad_part(text, says):
    with pytest.raises(ValueError, match=says):
        parse_overrides(text, NAMES)


def test_every_declaration_spells_back_to_itself():
    for m in [STREAMING, SetMode("materialized", every_ms=15 * MS_PER_MINUTE), SetMode("materialized", every_ms=90_000),
              SetMode("on_read"), SetMode("on_read", cap=7)]:
        assert SetMode.parse(m.spec) == m


# -- the plan ------------------------------------------------------------------------------
def test_a_set_without_a_declared_mode_is_streaming():
    plan = ModePlan.parse("user_activity=on_read", NAMES)
    assert plan.of("user_activity") == SetMode("on_read")
    assert plan.of("user_creator") == STREAMING
    assert [fs.name for fs in plan.sets_in(ServingMode.STREAMING, SETS)] == ["item_popularity", "user_topic", "user_creator"]


def test_a_plan_survives_a_json_round_trip():
    plan = ModePlan.parse("user_activity=on_read:cap=64,user_creator=materialized:15m,user_topic=streaming", NAMES)
    again = ModePlan.from_json(plan.to_json())
    assert again == plan
    assert json.loads(plan.to_json())["user_creator"] == {"mode": "materialized", "every_ms": 15 * MS_PER_MINUTE}


def test_overrides_replace_only_the_sets_they_name():
    plan = ModePlan.parse("user_activity=on_read,user_creator=materialized:1h", NAMES)
    new = plan.with_overrides(parse_overrides("user_creator=streaming"))
    assert new.of("user_activity") == SetMode("on_read") and new.of("user_creator") == STREAMING
    assert plan.of("user_creator").mode is ServingMode.MATERIALIZED  # plans are values


@pytest.mark.parametrize(
    "raw, says",
    [('{"user_activity": {"mode": "on_read", "size": 3}}', "unknown serving-mode fields"),
     ('{"user_activity": "on_read"}', "an object with a 'mode'"), ('["on_read"]', "a JSON object")],
)
def test_a_malformed_plan_is_refused(raw, says):
    with pytest.raises(ValueError, match=says):
        ModePlan.from_json(raw)


def test_a_plan_is_immutable():
    plan = ModePlan({"user_activity": SetMode("on_read")})
    with pytest.raises(TypeError):
        plan.modes["user_creator"] = STREAMING  # type: ignore[index]


# -- the copy in the store that every worker reads ----------------------------------------
def test_modes_round_trip_through_the_store_and_missing_means_streaming(online_store):
    ua, _, _, uc = SETS
    assert load_modes(online_store, SETS) == ModePlan({fs.name: STREAMING for fs in SETS})
    save_mode(online_store, ua, SetMode("on_read", cap=64))
    save_mode(online_store, uc, SetMode("materialized", every_ms=15 * MS_PER_MINUTE))
    plan = load_modes(online_store, SETS)
    assert plan.of("user_activity") == SetMode("on_read", cap=64)
    assert plan.of("user_creator") == SetMode("materialized", every_ms=15 * MS_PER_MINUTE)
    assert plan.of("user_topic") == STREAMING
    save_mode(online_store, ua, STREAMING)  # back to the default, written explicitly
    assert load_mode(online_store, ua) == STREAMING
    assert online_store.get_meta(mode_key(ua)) is not None


def test_a_second_worker_on_the_same_store_reads_the_same_modes(online_store):
    """Two handles on one store stand for two processes: the mode is not process state."""
    from features.online.memory import MemoryStore
    from features.online.redis_store import RedisStore

    other = online_store if isinstance(online_store, MemoryStore) else RedisStore(online_store.url, namespace=online_store.namespace)
    save_mode(online_store, SETS[0], SetMode("on_read"))
    assert load_modes(other, SETS) == load_modes(online_store, SETS)
    if other is not online_store:
        other.close()


def test_the_mode_is_kept_per_version_and_never_changes_the_version(online_store):
    ua = SETS[0]
    before = [fs.version for fs in SETS]
    key_before = record_keys(ua, [7])
    save_mode(online_store, ua, SetMode("on_read"))
    assert [fs.version for fs in feature_sets("simulated", 20)] == before == [fs.version for fs in SETS]
    assert record_keys(ua, [7]) == key_before
    assert mode_key(ua) == f"mode:user_activity:{ua.version}"
    other_version = feature_sets("simulated", 5)[0]  # topic_affinity has another dim: another version
    assert other_version.version != ua.version
    assert load_mode(online_store, other_version) == STREAMING


def test_an_unreadable_stored_mode_fails_loudly_naming_its_key(online_store):
    ua = SETS[0]
    online_store.set_meta(mode_key(ua), '{"mode": "lazy"}')
    with pytest.raises(ValueError, match=f"stored serving mode mode:user_activity:{ua.version} is unreadable"):
        load_modes(online_store, SETS)


def test_a_transaction_snapshot_decodes_with_the_same_rule():
    assert mode_from_meta(None) == STREAMING
    assert mode_from_meta('{"cap": 9, "mode": "on_read"}') == SetMode("on_read", cap=9)


def test_load_modes_takes_one_version_per_set(online_store):
    with pytest.raises(ValueError, match="one version per feature set"):
        load_modes(online_store, [SETS[0], feature_sets("simulated", 5)[0]])
