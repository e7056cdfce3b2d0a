"""Rewriting served-values records that readers found past their exact interval, off the request path.

A values record is written with its state (features/served_values.py) and answers reads
until a window of its entity changes; an entity that stays quiet then costs every request a
second round trip for its state. Requests that needed a state hand its key here, and a
background task rewrites those values records as of now in one optimistic transaction per
feature set (a writer that changed a state meanwhile wrote fresh values itself, and the
transaction then writes nothing). Pending keys are bounded (past it: dropped and counted),
deduplicated, and a batch never exceeds `batch` keys, so repair cannot crowd out requests.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from features.online.base import OnlineStore, RecordKey
from features.served_values import repair
from features.state import StateLayout
from server.background import spawn, stop

__all__ = ["ValuesRepair"]

log = logging.getLogger(__name__)


class ValuesRepair:
    def __init__(self, store: OnlineStore, *, run_io: Callable[..., Awaitable], clock_ms: Callable[[], int],
                 max_pending: int = 20_000, batch: int = 2_000, interval_s: float = 0.2) -> None:
        self.store = store
        self._run_io = run_io
        self._clock_ms = clock_ms
        self._pending: dict[str, tuple[StateLayout, dict[RecordKey, None]]] = {}
        self.max_pending = max_pending
        self.batch = batch
        self.interval_s = interval_s
        self.offered = 0
        self.dropped = 0
        self.rewritten = 0
        self.failed = 0
        self._task: asyncio.Task | None = None

    def pending(self) -> int:
        return sum(len(keys) for _, keys in self._pending.values())

    def offer(self, layout: StateLayout, keys: list[RecordKey]) -> None:
        fs = layout.feature_set
        slot = self._pending.setdefault(f"{fs.name}:{fs.version}", (layout, {}))[1]
        room = self.max_pending - self.pending()
        for k in keys:
            if k in slot:
                continue
            if room <= 0:
                self.dropped += 1
                continue
            slot[k] = None
            room -= 1
            self.offered += 1

    def start(self) -> None:
        self._task = spawn(self._run(), "parity-values-repair")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None

    async def drain(self) -> int:
        """Repair everything pending now (one batch per set at a time); returns records rewritten."""
        done = 0
        for name in list(self._pending):
            layout, keys = self._pending[name]
            take = list(keys)[: self.batch]
            for k in take:
                del keys[k]
            if not keys:
                del self._pending[name]
            try:
                n = await self._run_io(repair, self.store, layout, take, self._clock_ms())
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed repair costs the next read a state read, nothing else
                self.failed += len(take)
                log.warning("served-values repair of %d %s records failed", len(take), name, exc_info=True)
                continue
            done += n
            self.rewritten += n
        return done

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self._pending:
                await self.drain()
