"""The store watch on its own (server/store_watch.py): a store that lost its data is noticed,
refilled by one process only, retried after a failed refill, and never reported healthy by a
server that cannot refill it."""
from __future__ import annotations

import asyncio

from features.online.memory import MemoryStore
from server.store_watch import EPOCH_META, StoreWatch, ensure_epoch


def _watch(store, epoch, refill, states):
    async def io(fn, *a):
        return fn(*a)

    async def refilled():
        states.append("refilled")

    return StoreWatch(store, epoch, refill=refill, io=io, on_refilled=refilled, on_state=states.append)


def test_two_workers_notice_the_loss_and_only_one_refills():
    import threading

    async def go():
        store = MemoryStore("w")
        epoch = ensure_epoch(store)
        calls, release = [], threading.Event()

        def slow_refill():
            calls.append(1)
            release.wait(5)
            return ensure_epoch(store)

        async def io(fn, *a):
            return await asyncio.to_thread(fn, *a)

        async def nothing():
            pass

        a_states, b_states = [], []
        a = StoreWatch(store, epoch, refill=slow_refill, io=io, on_refilled=nothing, on_state=a_states.append)
        b = StoreWatch(store, epoch, refill=slow_refill, io=io, on_refilled=nothing, on_state=b_states.append)
        store.clear_namespace()  # a Redis that restarted empty
        a_check = asyncio.ensure_future(a.check())
        while a.state != "refilling":
            await asyncio.sleep(0.01)
        await b.check()  # the claim is a's: b answers degraded and does not refill too
        assert b.state == "empty" and len(calls) == 1
        release.set()
        await a_check
        await b.check()
        assert (a.state, b.state, len(calls)) == ("ok", "ok", 1) and b.epoch == a.epoch != epoch
        assert b_states == ["ok", "empty", "ok"]

    asyncio.run(go())


def test_a_server_that_cannot_refill_stays_degraded():
    async def go():
        store = MemoryStore("w")
        watch = _watch(store, ensure_epoch(store), None, [])
        store.clear_namespace()
        for _ in range(3):
            await watch.check()
            assert watch.state == "empty"
        store.set_meta(EPOCH_META, "filled-by-someone-else")
        await watch.check()
        assert watch.state == "ok"

    asyncio.run(go())


def test_a_failed_refill_leaves_the_store_degraded_and_is_retried_with_the_next_claim(monkeypatch):
    async def go():
        import server.store_watch as sw

        store = MemoryStore("w")
        attempts = []

        def flaky():
            attempts.append(1)
            if len(attempts) == 1:
                raise RuntimeError("the event log is unreadable")
            return ensure_epoch(store)

        watch = _watch(store, ensure_epoch(store), flaky, [])
        store.clear_namespace()
        now = [1_000_000.0]
        monkeypatch.setattr(sw.time, "time", lambda: now[0])
        await watch.check()
        assert watch.state == "empty" and len(attempts) == 1
        await watch.check()  # the same minute's claim is taken: no second refill yet
        assert len(attempts) == 1
        now[0] += sw._CLAIM_PERIOD_S
        await watch.check()
        assert watch.state == "ok" and len(attempts) == 2

    asyncio.run(go())
