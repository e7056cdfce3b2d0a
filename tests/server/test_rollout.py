"""Rollouts: users stay in one arm, specs are validated once with the field named, the state
machine moves forward with a growing version, and the state lives in the shared store."""
from __future__ import annotations

import threading

import pytest

from features.online.memory import MemoryStore
from parity_api.v1 import recommender_pb2 as pb
from server.errors import FailedPrecondition, InvalidArgument
from server.rollout import Rollout, RolloutSpec, RolloutStore, arm_of, in_shadow

USERS = [str(u) for u in range(20_000)]


def _started(**spec) -> Rollout:
    base = {"canary": "rel-b", "canary_percent": 10.0, "salt": "s1"}
    base.update(spec)
    return Rollout(primary="rel-a").start(RolloutSpec(**base), now_ms=1000)


# -- arms ---------------------------------------------------------------------------------------
def test_the_canary_gets_its_share_of_users():
    share = sum(arm_of(u, "s1", 10.0) == "canary" for u in USERS) / len(USERS)
    assert share == pytest.approx(0.10, abs=0.01)


def test_a_user_stays_in_the_canary_when_its_percentage_grows():
    at = {p: {u for u in USERS if arm_of(u, "s1", p) == "canary"} for p in (1.0, 5.0, 20.0, 50.0)}
    assert at[1.0] <= at[5.0] <= at[20.0] <= at[50.0]
    assert len(at[1.0]) < len(at[5.0]) < len(at[20.0]) < len(at[50.0])


def test_assignment_is_fixed_by_the_salt_and_changes_with_it():
    a = [arm_of(u, "s1", 30.0) for u in USERS[:2000]]
    assert a == [arm_of(u, "s1", 30.0) for u in USERS[:2000]]
    assert a != [arm_of(u, "s2", 30.0) for u in USERS[:2000]]


def test_zero_and_hundred_percent_are_exact():
    assert all(arm_of(u, "s", 0.0) == "primary" for u in USERS[:500])
    assert all(arm_of(u, "s", 100.0) == "canary" for u in USERS[:500])


def test_shadow_share_is_independent_of_the_arm():
    canary = [u for u in USERS if arm_of(u, "s1", 50.0) == "canary"]
    shadowed = sum(in_shadow(u, "s1", 20.0) for u in canary) / len(canary)
    assert shadowed == pytest.approx(0.20, abs=0.02)


def test_a_rollout_routes_only_while_it_runs():
    r = _started(canary_percent=100.0, shadow="rel-c", shadow_percent=100.0)
    assert r.arm_for("7") == "canary" and r.shadow_for("req-1") and r.release_of("canary") == "rel-b"
    done = r.abort(now_ms=2000)
    assert done.arm_for("7") == "primary" and not done.shadow_for("req-1") and done.release_of("primary") == "rel-a"


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec, field", [
    ({"canary": "b", "canary_percent": 100.5}, "canary_percent"),
    ({"canary": "b", "canary_percent": float("nan")}, "canary_percent"),
    ({"canary": "b", "canary_percent": -1.0}, "canary_percent"),
    ({"canary": "b", "canary_percent": "10"}, "canary_percent"),
    ({"canary": "b", "shadow": "c", "shadow_percent": float("inf")}, "shadow_percent"),
    ({"canary_percent": 5.0}, "canary"),
    ({"canary": "b", "shadow_percent": 5.0}, "shadow"),
    ({}, "canary"),
    ({"canary": " b"}, "canary"),
    ({"canary": "b\n"}, "canary"),
    ({"canary": "b", "salt": "x" * 65}, "salt"),
    ({"canary": "b", "salt": "a\tb"}, "salt"),
    ({"canary": "b", "thresholds": {"p99_ration": 2.0}}, "thresholds.p99_ration"),
    ({"canary": "b", "thresholds": {"alpha": float("nan")}}, "thresholds.alpha"),
    ({"canary": "b", "thresholds": {"p99_ratio": 0.5}}, "thresholds.p99_ratio"),
    ({"shadow": "c", "shadow_percent": 5.0, "auto_promote": True}, "auto_promote"),
])
def test_a_bad_spec_names_its_field(spec, field):
    with pytest.raises(InvalidArgument) as exc:
        RolloutSpec(**spec)
    assert exc.value.field == field
    assert str(exc.value).startswith(field + ":")


def test_a_spec_reads_the_proto_message_and_keeps_thresholds():
    msg = pb.RolloutSpec(canary="rel-b", canary_percent=5, shadow="rel-c", shadow_percent=1, salt="x", auto_promote=True,
                         thresholds={"alpha": 0.01, "min_requests": 50})
    spec = RolloutSpec.from_message(msg)
    assert spec.canary == "rel-b" and spec.canary_percent == 5.0 and spec.auto_promote
    assert spec.guard_thresholds.alpha == 0.01 and spec.guard_thresholds.min_requests == 50
    assert spec == RolloutSpec.from_message(msg)  # comparable and hashable
    hash(spec)


def test_a_shadow_only_rollout_is_allowed():
    r = Rollout(primary="a").start(RolloutSpec(shadow="c", shadow_percent=10), now_ms=1)
    assert r.state == "canary" and r.arm_for("1") == "primary"


# -- state machine ----------------------------------------------------------------------------
def test_start_promote_moves_the_canary_to_primary_and_counts_versions():
    r0 = Rollout(primary="rel-a")
    r1 = r0.start(RolloutSpec(canary="rel-b", canary_percent=10, shadow="rel-c", shadow_percent=5, salt="s"), now_ms=10)
    assert (r1.state, r1.version, r1.primary, r1.canary, r1.started_ms) == ("canary", 1, "rel-a", "rel-b", 10)
    r2 = r1.promote(now_ms=20)
    assert (r2.state, r2.version, r2.primary, r2.canary, r2.shadow) == ("promoted", 2, "rel-b", "", "")
    assert r2.history[-1].startswith("2:promoted")


def test_a_rollback_records_why_and_ends_the_canary():
    r = _started().rollback(now_ms=5000, decision='{"reason": "latency"}')
    assert r.state == "rolled_back" and r.primary == "rel-a" and r.canary == "" and "latency" in r.last_decision


@pytest.mark.parametrize("act", ["promote", "rollback", "abort"])
def test_a_finished_rollout_cannot_be_finished_again(act):
    done = _started().abort(now_ms=2)
    with pytest.raises(FailedPrecondition, match="no .* running"):
        getattr(done, act)(3, *(["{}"] if act == "rollback" else []))


def test_a_new_spec_replaces_a_running_rollout_and_keeps_the_primary():
    r = _started().start(RolloutSpec(canary="rel-d", canary_percent=50, salt="s2"), now_ms=3)
    assert (r.version, r.primary, r.canary, r.canary_percent) == (2, "rel-a", "rel-d", 50.0)


def test_an_empty_salt_draws_a_fresh_one_per_rollout():
    a = Rollout(primary="a").start(RolloutSpec(canary="b", canary_percent=1), now_ms=1)
    b = a.start(RolloutSpec(canary="b", canary_percent=1), now_ms=2)
    assert a.salt and b.salt and a.salt != b.salt


def test_starting_without_any_primary_is_refused():
    with pytest.raises(InvalidArgument, match="^primary"):
        Rollout().start(RolloutSpec(canary="b", canary_percent=1), now_ms=1)


def test_json_round_trip_is_exact():
    r = _started(shadow="c", shadow_percent=2.5, auto_promote=True, thresholds={"alpha": 0.01}).rollback(9, '{"x": 1}')
    assert Rollout.from_json(r.to_json()) == r


@pytest.mark.parametrize("text", ["", "[]", "{bad", '{"state": "sideways"}', '{"colour": "red"}', '{"version": -1}'])
def test_a_corrupt_stored_rollout_is_an_error_not_a_guess(text):
    with pytest.raises(ValueError):
        Rollout.from_json(text)


# -- the store --------------------------------------------------------------------------------
def test_a_worker_polling_the_store_sees_the_other_workers_change(online_store):
    one, two = RolloutStore(online_store), RolloutStore(online_store)
    assert one.load() == Rollout()
    one.initialise("rel-a", now_ms=1)
    seen = two.load()
    assert seen.primary == "rel-a" and seen.version == 1
    assert two.changed_since(seen.version) is None
    one.update(lambda r: r.start(RolloutSpec(canary="rel-b", canary_percent=5, salt="s"), now_ms=2))
    fresh = two.changed_since(seen.version)
    assert fresh is not None and fresh.state == "canary" and fresh.arm_for("u") == arm_of("u", "s", 5)


def test_initialise_does_not_reset_a_running_rollout(online_store):
    s = RolloutStore(online_store)
    s.initialise("rel-a", now_ms=1)
    running = s.update(lambda r: r.start(RolloutSpec(canary="rel-b", canary_percent=5, salt="s"), now_ms=2))
    assert RolloutStore(online_store).initialise("rel-z", now_ms=3) == running


def test_a_refused_transition_leaves_the_store_unchanged(online_store):
    s = RolloutStore(online_store)
    s.initialise("rel-a", now_ms=1)
    with pytest.raises(FailedPrecondition):
        s.update(lambda r: r.promote(now_ms=2))
    assert s.load().version == 1


def test_a_rollback_and_a_promote_racing_cannot_both_win(online_store):
    s = RolloutStore(online_store)
    s.initialise("rel-a", now_ms=1)
    s.update(lambda r: r.start(RolloutSpec(canary="rel-b", canary_percent=5, salt="s"), now_ms=2))
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def run(act: str) -> None:
        other = RolloutStore(online_store) if isinstance(online_store, MemoryStore) else RolloutStore(type(online_store)(online_store.url, namespace=online_store.namespace))
        barrier.wait()
        try:
            other.update(lambda r: r.promote(3) if act == "promote" else r.rollback(3, "{}"))
            outcomes.append(act)
        except FailedPrecondition:
            outcomes.append("refused")

    threads = [threading.Thread(target=run, args=(a,)) for a in ("promote", "rollback")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes).count("refused") == 1
    final = s.load()
    assert final.version == 3 and final.state in ("promoted", "rolled_back")
