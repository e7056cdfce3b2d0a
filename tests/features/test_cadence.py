"""The materialized mode's scheduler: what is due, who runs it, and a loop under a fake clock
driving the real materialize() over a small event log."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from features.batch import BatchEngine
from features.cadence import (
    CadenceRun,
    DueRun,
    claim,
    claim_key,
    current_boundary,
    due,
    due_runs,
    next_due_ms,
    run_every,
    tick,
)
from features.eventlog import EventLog
from features.events import MS_PER_HOUR, MS_PER_MINUTE, EventBatch
from features.lookup import FeatureLookup
from features.materialize import materialize, retired_key, stored_watermark
from features.modes import ModePlan, SetMode, save_mode
from features.online.memory import MemoryStore
from features.repo import feature_sets
from features.state import StateLayout
from features.verify import values_match

SETS = feature_sets("simulated", 20)
USER_ACTIVITY, ITEM_POPULARITY, USER_TOPIC, USER_CREATOR = SETS
NAMES = [fs.name for fs in SETS]
HOUR = MS_PER_HOUR
T0 = 1_750_000_000_000 // HOUR * HOUR  # a whole hour, so boundaries are easy to read


class FakeTime:
    """Wall time in ms that only moves when the code under test sleeps (or a test says so)."""

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms
        self.sleeps: list[float] = []

    def now(self) -> int:
        return self.ms

    def seconds(self) -> float:  # the memory store's clock: counters expire on the same time
        return self.ms / 1000.0

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.ms += round(seconds * 1000)


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime(T0 + 6 * HOUR + 10 * MS_PER_MINUTE)


@pytest.fixture
def store(clock: FakeTime) -> MemoryStore:
    return MemoryStore("cadence", clock=clock.seconds)


@pytest.fixture
def log(tmp_path) -> EventLog:
    """Six hours of events (before the clock's start), a few users and creators."""
    rng = np.random.default_rng(1)
    n = 400
    ev = EventBatch(
        event_id=np.arange(1, n + 1), ts=T0 + rng.integers(0, 6 * HOUR, n), user_id=rng.integers(0, 6, n),
        item_id=rng.integers(0, 20, n), creator_id=rng.integers(0, 4, n), topic=rng.integers(0, 20, n).astype(np.int32),
        session_id=np.full(n, -1), type=rng.choice([0, 1, 2, 3], n).astype(np.int8), value=np.round(rng.random(n) * 100, 2),
    )
    log = EventLog(tmp_path / "events")
    log.append(ev)
    return log


def _materializer(log: EventLog, store, calls: list):
    """The real materialize, as the integration would pass it (no hand-off markers: a
    cadence run serves only its own sets), recording what it was asked to do."""
    def run(sets, until_ts):
        calls.append((tuple(fs.name for fs in sets), until_ts))
        return materialize(log, store, sets, until_ts=until_ts, mark_window_ms=0)
    return run


# -- what is due -----------------------------------------------------------------------------
def test_only_materialized_sets_are_due_until_their_watermark_reaches_the_boundary(store, log, clock):
    plan = ModePlan.parse("user_creator=materialized:1h,user_activity=on_read", NAMES)
    now = clock.now()
    assert current_boundary(HOUR, now) == T0 + 6 * HOUR
    assert due(plan, store, SETS, now) == [USER_CREATOR]  # never materialised: due
    materialize(log, store, [USER_CREATOR], until_ts=T0 + 5 * HOUR, mark_window_ms=0)
    assert due(plan, store, SETS, now) == [USER_CREATOR]  # one boundary behind
    materialize(log, store, [USER_CREATOR], until_ts=T0 + 6 * HOUR, mark_window_ms=0)
    assert due(plan, store, SETS, now) == []
    assert due(plan, store, SETS, T0 + 7 * HOUR - 1) == []
    assert due(plan, store, SETS, T0 + 7 * HOUR) == [USER_CREATOR]


def test_a_lag_moves_the_boundary_back(store, clock):
    plan = ModePlan.parse("user_creator=materialized:1h", NAMES)
    [run] = due_runs(plan, store, SETS, T0 + 6 * HOUR + 10 * MS_PER_MINUTE, lag_ms=15 * MS_PER_MINUTE)
    assert run.until_ts == T0 + 5 * HOUR and run.watermarks == (None,)
    assert next_due_ms(plan, SETS, T0 + 6 * HOUR + 10 * MS_PER_MINUTE, lag_ms=15 * MS_PER_MINUTE) == T0 + 6 * HOUR + 15 * MS_PER_MINUTE


def test_sets_on_different_cadences_run_as_separate_groups_earliest_boundary_first(store):
    plan = ModePlan.parse("user_creator=materialized:1h,user_topic=materialized:15m,item_popularity=materialized:1h", NAMES)
    runs = due_runs(plan, store, SETS, T0 + 6 * HOUR + 40 * MS_PER_MINUTE)
    assert [(r.until_ts, [fs.name for fs in r.sets]) for r in runs] == [
        (T0 + 6 * HOUR, ["item_popularity", "user_creator"]),
        (T0 + 6 * HOUR + 30 * MS_PER_MINUTE, ["user_topic"]),
    ]
    assert next_due_ms(plan, SETS, T0 + 6 * HOUR + 40 * MS_PER_MINUTE) == T0 + 6 * HOUR + 45 * MS_PER_MINUTE
    assert next_due_ms(ModePlan(), SETS, T0) is None


def test_a_retired_version_is_never_due(store, clock):
    plan = ModePlan.parse("user_creator=materialized:1h", NAMES)
    store.set_meta(retired_key(USER_CREATOR), "{}")
    assert due(plan, store, SETS, clock.now()) == []


# -- who runs it -----------------------------------------------------------------------------
def _run(fs, w) -> DueRun:
    return DueRun(T0, (fs,), (w,))


def test_a_claim_is_won_once_per_starting_watermark(online_store):
    assert claim(online_store, _run(USER_CREATOR, None)) == [True]
    assert claim(online_store, _run(USER_CREATOR, None)) == [False]  # another scheduler, same run
    assert claim(online_store, _run(USER_CREATOR, T0)) == [True]  # the next run starts elsewhere
    assert claim(online_store, DueRun(T0, (USER_CREATOR, USER_TOPIC), (T0, None))) == [False, True]
    assert claim_key(USER_CREATOR, T0) == f"cadence:user_creator:{USER_CREATOR.version}:from:{T0}"


def test_a_claim_expires_after_its_lease(online_store):
    lease_ms = 200
    assert claim(online_store, _run(USER_CREATOR, 5), lease_ms) == [True]
    assert claim(online_store, _run(USER_CREATOR, 5), lease_ms) == [False]
    clock = getattr(online_store, "clock", None)
    if hasattr(clock, "advance"):
        clock.advance(lease_ms / 1000 + 0.001)
    else:
        time.sleep(lease_ms / 1000 + 0.05)
    assert claim(online_store, _run(USER_CREATOR, 5), lease_ms) == [True]  # a crashed run is retried


def test_a_second_scheduler_skips_a_run_another_is_running(store, log, clock):
    plan = ModePlan.parse("user_creator=materialized:1h", NAMES)
    inner: list[list[CadenceRun]] = []
    calls: list = []
    real = _materializer(log, store, calls)

    def host_a(sets, until):
        inner.append(tick(store, SETS, real, plan=plan, now=clock.now))  # host B, mid-run
        return real(sets, until)

    [a] = tick(store, SETS, host_a, plan=plan, now=clock.now)
    assert a.ran == ("user_creator",) and inner[0][0].ran == () and inner[0][0].skipped == ("user_creator",)
    assert calls == [(("user_creator",), T0 + 6 * HOUR)]  # one run, by A
    assert tick(store, SETS, real, plan=plan, now=clock.now) == []  # B afterwards: nothing due


# -- the loop --------------------------------------------------------------------------------
def test_the_loop_materialises_at_each_boundary_and_sleeps_until_the_next(store, log, clock):
    plan = ModePlan.parse("user_creator=materialized:1h", NAMES)
    save_mode(store, USER_CREATOR, plan.of("user_creator"))
    calls: list = []
    stop = threading.Event()

    def sleep(seconds):
        clock.sleep(seconds)
        if clock.now() >= T0 + 9 * HOUR + 30 * MS_PER_MINUTE:
            stop.set()

    runs = run_every(store, SETS, _materializer(log, store, calls), stop=stop, now=clock.now, sleep=sleep,
                     poll_ms=HOUR)
    assert runs == 4
    assert calls == [(("user_creator",), T0 + h * HOUR) for h in (6, 7, 8, 9)]
    assert clock.sleeps[0] == 50 * 60  # from 6:10 to the 7:00 boundary, then an hour at a time
    assert clock.sleeps[1:] == [3600.0] * 3
    assert stored_watermark(store, USER_CREATOR) == T0 + 9 * HOUR
    # The values served are the batch path's as of the last run.
    engine = BatchEngine(StateLayout(USER_CREATOR), log.read())
    codes = engine.entities
    served = FeatureLookup(store, [USER_CREATOR]).read("user_creator", codes, T0 + 9 * HOUR).frame
    batch = engine.features_asof(codes, np.full(len(codes), T0 + 9 * HOUR))
    assert values_match(served.values, batch.values).all() and (served.missing == batch.missing).all()


def test_a_long_sleep_is_cut_to_the_poll_interval_so_mode_changes_are_seen(store, log, clock):
    save_mode(store, USER_CREATOR, SetMode("materialized", every_ms=24 * HOUR))
    calls: list = []
    stop = threading.Event()

    def sleep(seconds):
        clock.sleep(seconds)
        if len(clock.sleeps) == 1:
            save_mode(store, USER_CREATOR, SetMode("streaming"))  # an operator switches it off
        if len(clock.sleeps) == 3:
            stop.set()

    run_every(store, SETS, _materializer(log, store, calls), stop=stop, now=clock.now, sleep=sleep, poll_ms=MS_PER_MINUTE)
    assert len(calls) == 1  # the first run only: afterwards the set is streaming
    assert clock.sleeps == [60.0, 60.0, 60.0]


def test_a_run_longer_than_the_cadence_is_followed_at_once_by_the_boundary_it_missed(store, log, clock):
    plan = ModePlan.parse("user_topic=materialized:15m", NAMES)
    calls: list = []
    real = _materializer(log, store, calls)
    stop = threading.Event()

    def slow(sets, until):
        clock.ms += 40 * MS_PER_MINUTE  # the run outlasts two boundaries
        out = real(sets, until)
        if len(calls) == 2:
            stop.set()
        return out

    run_every(store, SETS, slow, stop=stop, plan=plan, now=clock.now, sleep=clock.sleep)
    assert [u for _, u in calls] == [T0 + 6 * HOUR, T0 + 6 * HOUR + 45 * MS_PER_MINUTE]
    assert clock.sleeps == []  # no sleep between a late run and the next one


def test_stop_ends_the_loop(store, log, clock):
    stop = threading.Event()
    stop.set()
    calls: list = []
    assert run_every(store, SETS, _materializer(log, store, calls), stop=stop, plan=ModePlan.parse("user_creator=materialized:1h", NAMES),
                     now=clock.now, sleep=clock.sleep) == 0
    assert calls == []


def test_the_default_sleep_is_cut_short_by_stop(store, log, clock):
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    run_every(store, SETS, _materializer(log, store, []), stop=stop, plan=ModePlan(), now=clock.now, poll_ms=60_000)
    assert time.monotonic() - started < 5


def test_a_failed_run_raises_and_its_claim_holds_others_off_until_the_lease_ends(store, log, clock):
    plan = ModePlan.parse("user_creator=materialized:1h", NAMES)

    def broken(sets, until):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        run_every(store, SETS, broken, stop=threading.Event(), plan=plan, now=clock.now, sleep=clock.sleep, lease_ms=10 * MS_PER_MINUTE)
    calls: list = []
    [held] = tick(store, SETS, _materializer(log, store, calls), plan=plan, now=clock.now, lease_ms=10 * MS_PER_MINUTE)
    assert held.skipped == ("user_creator",) and calls == []
    clock.ms += 10 * MS_PER_MINUTE + 1
    [retried] = tick(store, SETS, _materializer(log, store, calls), plan=plan, now=clock.now, lease_ms=10 * MS_PER_MINUTE)
    assert retried.ran == ("user_creator",) and calls == [(("user_creator",), T0 + 6 * HOUR)]


@pytest.mark.parametrize("kwargs, says", [({"lease_ms": 0}, "lease_ms must be >= 1"), ({"lag_ms": -1}, "lag_ms must be >= 0"),
                                          ({"poll_ms": 0}, "poll_ms must be >= 1")])
def test_loop_options_are_checked_where_given(store, clock, kwargs, says):
    with pytest.raises(ValueError, match=says):
        run_every(store, SETS, lambda s, u: None, stop=threading.Event(), now=clock.now, sleep=clock.sleep, **kwargs)
