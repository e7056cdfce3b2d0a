"""In-process caches in front of the online store, and the store circuit breaker.

- `ResponseCache`: whole Recommend answers for a few hundred ms to a second (aiocache
  SimpleMemoryCache, TTL). Keys carry the user's generation, bumped when live events for the
  user arrive here, so this replica never answers from before them.
- `FeatureCache`: a user's raw online records (aiocache, TTL). Values are read as of the
  request time from the raw records, so a hit is exact in time; live events for the user
  evict it. A read that raced with an eviction is not cached (generation check).
- `StaleRecords`: the last records read per user (bounded LRU). Only a store outage reads it:
  answering from a user's features of a minute ago beats answering from defaults.
- `Breaker`: after a store failure, the request path skips the store for a short while instead
  of making every request wait for a timeout.

Nothing here is needed for correctness: a replica with empty caches answers the same.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

from aiocache import SimpleMemoryCache

__all__ = ["Generations", "ResponseCache", "FeatureCache", "StaleRecords", "Breaker"]


class Generations:
    """A counter per user, bumped by live events (bounded: forgotten users restart at 0 after a wrap)."""

    def __init__(self, max_users: int = 1_000_000) -> None:
        self._gen: OrderedDict[int, int] = OrderedDict()
        self._max = max_users
        self._epoch = 0  # bumped when an entry is evicted, so an evicted user's old keys can never match

    def get(self, user: int) -> tuple[int, int]:
        return (self._epoch, self._gen.get(user, 0))

    def bump_all(self) -> None:
        """Every user's older answers stop matching (the store was refilled)."""
        self._epoch += 1

    def bump(self, user: int) -> None:
        self._gen[user] = self._gen.get(user, 0) + 1
        self._gen.move_to_end(user)
        if len(self._gen) > self._max:
            self._gen.popitem(last=False)
            self._epoch += 1


class _TTLCache:
    def __init__(self, ttl_s: float, on_result: Callable[[bool], None] | None = None) -> None:
        self.ttl_s = ttl_s
        self.enabled = ttl_s > 0
        # timeout=None: no asyncio.wait_for around each in-memory get (it costs a task per call)
        self._cache = SimpleMemoryCache(timeout=None)
        self._on_result = on_result or (lambda hit: None)

    async def get(self, key: str) -> Any:
        if not self.enabled:
            return None
        v = await self._cache.get(key)
        self._on_result(v is not None)
        return v

    async def set(self, key: str, value: Any) -> None:
        if self.enabled:
            await self._cache.set(key, value, ttl=self.ttl_s)

    async def delete(self, key: str) -> int:
        """1 if the key was cached, else 0."""
        return int(bool(await self._cache.delete(key)))

    async def clear(self) -> None:
        await self._cache.clear()

    async def close(self) -> None:
        await self._cache.clear()
        await self._cache.close()


class ResponseCache(_TTLCache):
    pass


class FeatureCache(_TTLCache):
    pass


class StaleRecords:
    """Bounded LRU of the last raw records per key (plan id + user)."""

    def __init__(self, max_entries: int) -> None:
        self._d: OrderedDict[str, Any] = OrderedDict()
        self._max = max_entries

    def put(self, key: str, value: Any) -> None:
        if self._max <= 0:
            return
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self._max:
            self._d.popitem(last=False)

    def get(self, key: str) -> Any:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def clear(self) -> None:
        self._d.clear()

    def drop(self, key: str) -> bool:
        return self._d.pop(key, None) is not None

    def __len__(self) -> int:
        return len(self._d)


class Breaker:
    """Closed → (a failure) open for `open_s` → one caller probes the store, the rest fall back
    until the probe succeeds (closed) or another `open_s` passes (next probe)."""

    def __init__(self, open_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.open_s = open_s
        self._clock = clock
        self._open_until = 0.0
        self.failures = 0

    def allow(self) -> bool:
        if not self._open_until:
            return True
        now = self._clock()
        if now >= self._open_until:
            self._open_until = now + self.open_s  # this caller probes; a lost probe re-arms by time
            return True
        return False

    def success(self) -> None:
        self._open_until = 0.0

    def failure(self) -> None:
        self.failures += 1
        self._open_until = self._clock() + max(self.open_s, 1e-6)

    @property
    def is_open(self) -> bool:
        return bool(self._open_until)
