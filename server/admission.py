"""Admission control: a request either starts soon enough to finish in time, or is refused at once.

Why it exists: a request's CPU work runs on the event loop itself (cheaper than a thread hop
on 2 cores, see bench/RESULTS.md), so grpc.aio's `maximum_concurrent_rpcs` never sees a
queue build and, past capacity, every request waits behind every other until nearly all of
them miss their deadline (measured: at 2x capacity goodput fell to a quarter of capacity).
Goodput survives overload only if work that cannot finish in time is never started.

Two layers:

- In gRPC's C core, `grpc.server.max_pending_requests` (soft) and `..._hard_limit` cap the
  calls that arrived but that Python has not picked up yet (random early drop between the
  two). These drops cost no Python time, which is what keeps goodput up at 10x capacity: a
  refusal in Python costs ~0.24 ms of the one core the requests need (bench/grpc_probe.py).
  grpc.aio takes about one call from the C core per request it serves, so that queue is the
  real request queue; its limits count calls, not time (grpc.aio exposes no arrival time),
  and are a trade between bursts of concurrent clients and latency at overload
  (bench/RESULTS.md). The client sees CANCELLED; the typed client retries it; channelz
  counts it (`parity_grpc_calls_total`).
- Here, bounded in time as well as count, per lane (a group of methods with its own budget, so ingest streams can never
  starve Recommend and nothing can lock out health checks): at most `max_running` requests
  in service, a FIFO queue bounded by `max_queue` and by `max_wait_s`, and a request whose
  estimated wait plus service time would pass its deadline is refused on arrival with
  RESOURCE_EXHAUSTED and a retry pushback (`grpc-retry-pushback-ms`). A queued request whose
  wait grew past the bound, or whose deadline can no longer be met, is refused when its turn
  comes instead of being started. Draining refuses new work with UNAVAILABLE (retryable) and
  lets what was admitted finish.

Pure asyncio, no grpc: the servicer maps `Overloaded` and `Draining` to status codes.
All state is per process on purpose: it bounds this process's own CPU queue, which no other
worker shares (a global limit across workers, if ever needed, belongs in the store).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from server.errors import DeadlineExceeded, ServingError

__all__ = ["LaneLimits", "Lane", "Overloaded", "Draining", "Admission"]


class Overloaded(ServingError):
    """Refused without being started: the server could not have answered in time."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float, outcome: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.outcome = outcome  # metrics label: queue_full, wait_too_long, deadline, expired


class Draining(ServingError):
    """The server is shutting down: retry on another replica (or this one after restart)."""

    code = "UNAVAILABLE"

    def __init__(self, message: str = "the server is shutting down and takes no new requests; retry (another replica)") -> None:
        super().__init__(message)
        self.retry_after_s = 0.0
        self.outcome = "draining"


@dataclass(frozen=True)
class LaneLimits:
    max_running: int  # requests in service at once
    max_queue: int  # requests waiting for a slot
    max_wait_s: float  # the longest a request may wait for a slot
    initial_service_s: float = 0.005  # service-time estimate before anything was measured

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not self.max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")


class _Waiter:
    __slots__ = ("future", "arrived", "deadline")

    def __init__(self, future: asyncio.Future, arrived: float, deadline: float) -> None:
        self.future, self.arrived, self.deadline = future, arrived, deadline


class Lane:
    """One budget: `async with lane.slot(deadline):` runs the body or raises before starting it.

    `deadline` is absolute, on `clock` (time.perf_counter by default). The service-time
    estimate is an exponentially weighted mean of measured slot times (grant to release).
    """

    _ALPHA = 0.1

    def __init__(self, name: str, limits: LaneLimits, *, clock: Callable[[], float] = time.perf_counter,
                 on_outcome: Callable[[str, str], None] | None = None, on_wait: Callable[[str, float], None] | None = None) -> None:
        self.name = name
        self.limits = limits
        self.clock = clock
        self.running = 0
        self.service_s = limits.initial_service_s
        self.draining = False
        self._waiters: deque[_Waiter] = deque()
        self._idle: asyncio.Event | None = None
        self._on_outcome = on_outcome or (lambda lane, outcome: None)
        self._on_wait = on_wait or (lambda lane, seconds: None)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def estimated_wait_s(self, position: int) -> float:
        """Time until the `position`-th waiter (1 = next) gets a slot, at the measured rate."""
        return position * self.service_s / self.limits.max_running

    def slot(self, deadline: float) -> "_Slot":
        return _Slot(self, deadline)

    # -- the decisions ---------------------------------------------------------------------
    def _refuse(self, outcome: str, message: str, retry_after_s: float) -> Overloaded:
        self._on_outcome(self.name, outcome)
        return Overloaded(f"{self.name}: {message}", max(retry_after_s, 0.01), outcome)

    async def acquire(self, deadline: float) -> None:
        now = self.clock()
        if self.draining:
            self._on_outcome(self.name, "draining")
            raise Draining()
        if now >= deadline:  # gone already (waited in the C core, or sent with none left): not an overload
            self._on_outcome(self.name, "deadline")
            raise DeadlineExceeded(f"{self.name}: the request's deadline had passed when it arrived")
        lim = self.limits
        if self.running < lim.max_running and not self._waiters:  # a free slot: no estimate refuses it (a cache hit needs 0.2 ms)
            self.running += 1
            self._on_outcome(self.name, "admitted")
            self._on_wait(self.name, 0.0)
            return
        wait = self.estimated_wait_s(len(self._waiters) + 1)
        if len(self._waiters) >= lim.max_queue:
            raise self._refuse("queue_full", f"overloaded: {len(self._waiters)} requests already waiting", wait)
        if wait > lim.max_wait_s:
            raise self._refuse("wait_too_long", f"overloaded: the wait would be ~{wait * 1000:.0f} ms "
                                                f"(limit {lim.max_wait_s * 1000:.0f} ms)", wait)
        if now + wait + self.service_s > deadline:
            raise self._refuse("deadline", f"overloaded: ~{wait * 1000:.0f} ms wait + ~{self.service_s * 1000:.0f} ms work "
                                           f"would pass the request's deadline", wait)
        w = _Waiter(asyncio.get_running_loop().create_future(), now, deadline)
        self._waiters.append(w)
        try:
            await w.future
        except asyncio.CancelledError:
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                self._release_slot()  # granted, then cancelled before it could start
            else:
                try:
                    self._waiters.remove(w)
                except ValueError:
                    pass
            raise
        self._on_wait(self.name, self.clock() - w.arrived)

    def release(self, service_s: float) -> None:
        if service_s >= 0:
            # One sample moves the estimate at most 4x: a request stuck on a paused store for
            # 150 ms must not make the lane refuse everyone behind it (a real shift still shows
            # within a few requests).
            sample = min(service_s, 4 * self.service_s)
            self.service_s += self._ALPHA * (sample - self.service_s)
        self._release_slot()

    def _release_slot(self) -> None:
        self.running -= 1
        self._grant()
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.running == 0 and not self._waiters and self._idle is not None:
            self._idle.set()

    def _grant(self) -> None:
        now = self.clock()
        while self.running < self.limits.max_running and self._waiters:
            w = self._waiters.popleft()
            if w.future.done():  # its task was cancelled
                continue
            if now - w.arrived > self.limits.max_wait_s or now + self.service_s > w.deadline:
                w.future.set_exception(self._refuse("expired", f"overloaded: waited {(now - w.arrived) * 1000:.0f} ms for a slot; "
                                                               "too late to start", self.service_s))
                continue
            self.running += 1
            self._on_outcome(self.name, "admitted")
            w.future.set_result(None)

    # -- draining -------------------------------------------------------------------------------
    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE); queued ones were admitted and still run (their
        wait is bounded by max_wait_s)."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing runs or waits here; True if it got there within `timeout_s`."""
        if self.running == 0 and not self._waiters:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._idle = None


class _Slot:
    __slots__ = ("lane", "deadline", "_t")

    def __init__(self, lane: Lane, deadline: float) -> None:
        self.lane, self.deadline, self._t = lane, deadline, 0.0

    async def __aenter__(self) -> "_Slot":
        await self.lane.acquire(self.deadline)
        self._t = self.lane.clock()
        return self

    async def __aexit__(self, *exc) -> None:
        self.lane.release(self.lane.clock() - self._t)


class Admission:
    """The server's lanes by name, created from the configuration, drained together."""

    def __init__(self, lanes: dict[str, LaneLimits], *, clock: Callable[[], float] = time.perf_counter,
                 on_outcome: Callable[[str, str], None] | None = None, on_wait: Callable[[str, float], None] | None = None) -> None:
        self.lanes = {name: Lane(name, lim, clock=clock, on_outcome=on_outcome, on_wait=on_wait) for name, lim in lanes.items()}

    def __getitem__(self, name: str) -> Lane:
        return self.lanes[name]

    def drain(self) -> None:
        for lane in self.lanes.values():
            lane.drain()

    async def wait_idle(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        ok = True
        for lane in self.lanes.values():
            ok = await lane.wait_idle(max(0.0, end - time.monotonic())) and ok
        return ok
