"""Noticing an online store that lost its data, and filling it again.

A Redis without persistence that restarts comes back empty: every read then says "not found",
which looks exactly like a user without history, so the server would keep answering
`degraded=false` from defaults until someone restarted it. The store therefore carries a
sentinel (`store_epoch`, a random id written after it was filled); the server reads it every
`interval_s`. Missing: the data is gone; requests are answered degraded (reason
`store_empty`) and the store is filled again from the event log (materialisation and seen
items, as at start-up), by one process only: the first to take the refill claim, an
`incr_many` counter in the store itself, so several workers or hosts never refill at once
(one claim per minute, so a refill that failed is tried again). A server that cannot refill
(`--materialize never`, no event log) stays degraded until another process refills.
A new epoch (this process's refill or another's) ends the degraded state and empties the
in-process caches. Live events accepted since the last fill and not yet in the event log are
lost with the store's data: the store, not this watch, is what must keep them durable.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Awaitable, Callable

from features.online.base import OnlineStore, StoreUnavailable

__all__ = ["EPOCH_META", "ensure_epoch", "StoreWatch"]

log = logging.getLogger(__name__)

EPOCH_META = "store_epoch"
_CLAIM_PERIOD_S = 60  # one refill claim per epoch and minute: a refill that failed (or whose process died) is retried then


def ensure_epoch(store: OnlineStore) -> str:
    """The store's epoch, written now if it has none (call after filling the store)."""
    epoch = store.get_meta(EPOCH_META)
    if epoch is None:
        epoch = uuid.uuid4().hex
        store.set_meta(EPOCH_META, epoch)
    return epoch


class StoreWatch:
    """States: ok, empty (data lost, refill not running here), refilling (this process refills)."""

    def __init__(self, store: OnlineStore, epoch: str | None, *, refill: Callable[[], str] | None, io: Callable[..., Awaitable],
                 on_refilled: Callable[[], Awaitable[None]], on_state: Callable[[str], None], interval_s: float = 1.0) -> None:
        self.store = store
        self.epoch = epoch
        self.state = "ok"
        self._refill = refill
        self._io = io  # runs a blocking call off the loop: io(fn, *args)
        self._on_refilled = on_refilled
        self._on_state = on_state
        self.interval_s = interval_s
        self.refills = 0
        on_state("ok")

    def _set(self, state: str) -> None:
        if state != self.state:
            log.warning("online store state: %s -> %s", self.state, state)
            self.state = state
            self._on_state(state)

    async def check(self) -> None:
        """One look at the sentinel (and a refill when this process wins the claim)."""
        try:
            epoch = await self._io(self.store.get_meta, EPOCH_META)
        except StoreUnavailable:
            return  # unreachable is the breaker's business; emptiness is only judged on an answer
        if epoch is not None:
            if epoch != self.epoch:
                log.warning("online store epoch changed (%s -> %s): filled again; clearing in-process caches", self.epoch, epoch)
                self.epoch = epoch
                await self._on_refilled()
            self._set("ok")
            return
        if self.epoch is None:
            return  # never filled (materialize=never): nothing to compare with
        self._set("empty")
        if self._refill is None:
            return  # nothing to refill from here: degraded until another process refills
        period = int(time.time() // _CLAIM_PERIOD_S)
        try:
            claim = await self._io(self.store.incr_many, [f"refill:{self.epoch}:{period}"], [1], 2 * _CLAIM_PERIOD_S * 1000)
        except StoreUnavailable:
            return
        if claim[0] != 1:
            return  # another process refills; its new epoch will end the empty state here too
        self._set("refilling")
        try:
            new = await self._io(self._refill)
        except Exception:  # noqa: BLE001 - keep serving degraded; the next minute's claim retries
            log.exception("refilling the online store failed")
            self._set("empty")
            return
        self.refills += 1
        self.epoch = new
        await self._on_refilled()
        self._set("ok")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watch must outlive any one failure
                log.exception("store watch check failed")
