"""Admission lanes (server/admission.py) on a hand-moved clock: who runs, who waits, who is
refused at once, who is refused when its turn comes, and draining."""
from __future__ import annotations

import asyncio

import pytest

from server.admission import Admission, Draining, Lane, LaneLimits, Overloaded
from server.errors import DeadlineExceeded


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _lane(clock, **kw) -> tuple[Lane, list]:
    seen = []
    lim = LaneLimits(**{"max_running": 1, "max_queue": 3, "max_wait_s": 0.05, "initial_service_s": 0.01, **kw})
    return Lane("serve", lim, clock=clock, on_outcome=lambda lane, o: seen.append(o)), seen


def test_a_free_slot_runs_at_once_and_a_full_lane_queues_fifo():
    async def go():
        clock = Clock()
        lane, seen = _lane(clock)
        await lane.acquire(clock() + 1)
        order = []

        async def waiter(i):
            await lane.acquire(clock() + 1)
            order.append(i)
            lane.release(0.01)

        tasks = [asyncio.ensure_future(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert lane.queued == 3 and lane.running == 1
        lane.release(0.01)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2] and lane.running == 0 and seen.count("admitted") == 4

    asyncio.run(go())


def test_refused_on_arrival_when_the_queue_is_full_or_the_wait_too_long_or_past_the_deadline():
    async def go():
        clock = Clock()
        lane, seen = _lane(clock, max_queue=2, max_wait_s=0.025)
        await lane.acquire(clock() + 1)
        w1 = asyncio.ensure_future(lane.acquire(clock() + 1))  # ~10 ms wait: queued
        await asyncio.sleep(0)
        w2 = asyncio.ensure_future(lane.acquire(clock() + 1))  # ~20 ms: queued
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as e:  # queue full
            await lane.acquire(clock() + 1)
        assert e.value.outcome == "queue_full" and e.value.code == "RESOURCE_EXHAUSTED" and e.value.retry_after_s > 0
        lane2, _ = _lane(clock, max_queue=10, max_wait_s=0.015)
        await lane2.acquire(clock() + 1)
        q = asyncio.ensure_future(lane2.acquire(clock() + 1))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as e:  # a second waiter would wait ~20 ms > 15 ms
            await lane2.acquire(clock() + 1)
        assert e.value.outcome == "wait_too_long"
        with pytest.raises(Overloaded) as e:  # the deadline cannot be met
            lane3, _ = _lane(clock)
            await lane3.acquire(clock() + 1)
            await lane3.acquire(clock() + 0.015)  # wait 10 ms + work 10 ms > 15 ms
        assert e.value.outcome == "deadline"
        for t in (w1, w2, q):
            t.cancel()
        await asyncio.gather(w1, w2, q, return_exceptions=True)
        assert lane.queued == 0 and lane2.queued == 0

    asyncio.run(go())


def test_a_queued_request_whose_wait_grew_too_long_is_refused_when_its_turn_comes():
    async def go():
        clock = Clock()
        lane, seen = _lane(clock)
        await lane.acquire(clock() + 1)
        w = asyncio.ensure_future(lane.acquire(clock() + 1))
        await asyncio.sleep(0)
        clock.t += 0.2  # the running request took 200 ms
        lane.release(0.2)
        with pytest.raises(Overloaded) as e:
            await w
        assert e.value.outcome == "expired" and lane.running == 0
        await lane.acquire(clock() + 1)  # and the lane works on
        assert lane.running == 1

    asyncio.run(go())


def test_an_expired_deadline_on_an_idle_lane_is_deadline_exceeded_not_overload():
    async def go():
        clock = Clock()
        lane, _ = _lane(clock)
        with pytest.raises(DeadlineExceeded):
            await lane.acquire(clock() - 0.001)
        assert lane.running == 0

    asyncio.run(go())


def test_a_cancelled_waiter_gives_its_place_and_a_granted_then_cancelled_one_its_slot():
    async def go():
        clock = Clock()
        lane, _ = _lane(clock)
        await lane.acquire(clock() + 1)
        a = asyncio.ensure_future(lane.acquire(clock() + 1))
        b = asyncio.ensure_future(lane.acquire(clock() + 1))
        await asyncio.sleep(0)
        a.cancel()
        await asyncio.gather(a, return_exceptions=True)
        assert lane.queued == 1
        lane.release(0.01)  # grants b
        b.cancel()  # ... cancelled before it ran: the slot comes back
        await asyncio.gather(b, return_exceptions=True)
        assert lane.running == 0

    asyncio.run(go())


def test_draining_refuses_new_requests_but_runs_what_was_admitted():
    async def go():
        clock = Clock()
        adm = Admission({"serve": LaneLimits(1, 4, 1.0, 0.01)}, clock=clock)
        lane = adm["serve"]
        await lane.acquire(clock() + 5)
        queued = asyncio.ensure_future(lane.acquire(clock() + 5))
        await asyncio.sleep(0)
        adm.drain()
        with pytest.raises(Draining) as e:
            await lane.acquire(clock() + 5)
        assert e.value.code == "UNAVAILABLE"
        idle = asyncio.ensure_future(adm.wait_idle(5))
        lane.release(0.01)
        await queued  # admitted before the drain: it runs
        assert not idle.done()
        lane.release(0.01)
        assert await idle is True

    asyncio.run(go())


def test_the_service_time_estimate_follows_what_is_measured():
    clock = Clock()
    lane, _ = _lane(clock, initial_service_s=0.001)
    for _ in range(100):
        lane.running += 1
        lane.release(0.004)
    assert lane.service_s == pytest.approx(0.004, rel=0.01)
    assert lane.estimated_wait_s(3) == pytest.approx(0.012, rel=0.01)


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_running"):
        LaneLimits(0, 1, 0.1)
    with pytest.raises(ValueError, match="max_queue"):
        LaneLimits(1, -1, 0.1)
