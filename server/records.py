"""Reading a user's records on the request path: cache, store, stale fallback, breaker, budget.

The one place the server's store-fault policy lives. A request asks for its user's records
and gets them with where they came from and, when they are not what the store holds right
now, why (`RecordRead.reason`): the store timed out, failed, its breaker is open, or it lost
its data (server/store_watch.py). It never waits past its budget and never raises for a
store fault; the answer is then served degraded from the user's last good records or from
defaults, and counted.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

import numpy as np

from features.online.base import OnlineStore, RecordKey, StoreUnavailable
from features.state import StateLayout
from server import pipeline
from server.freshness import FreshnessBook
from server.caches import Breaker, FeatureCache, Generations, StaleRecords
from server.config import ServerConfig
from server.metrics import Metrics
from server.state import Snapshot
from server.user_features import PairTable, UserFeatures

__all__ = ["RecordRead", "UserRecords", "StoreFault", "COMPUTE_RESERVE_S", "STORE_TIMEOUT", "store_wait_s", "fallback_read"]

log = logging.getLogger(__name__)

COMPUTE_RESERVE_S = 0.02  # left for ranking when the store stage takes its share of a deadline
STORE_TIMEOUT = "store_timeout"  # the reason of a read that did not answer within its wait


class StoreFault(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RecordRead:
    raw: list | None  # the plan's records, or None (defaults)
    source: str  # cache | store | stale | default
    reason: str | None  # why the answer is degraded, or None


# The policy itself, as pure functions: the request path below calls them, and so does the
# backtest (backtest/replay.py), which replays held-out requests with simulated store latency
# and must decide what the server would have decided.
def store_wait_s(store_budget_s: float, request_left_s: float) -> float:
    """How long a request-path store call may take before the request gives up on it: the
    store's budget, but never so long that the request's own deadline leaves less than
    COMPUTE_RESERVE_S for ranking; at least 1 ms. A read slower than this misses (STORE_TIMEOUT)."""
    return max(0.001, min(store_budget_s, request_left_s - COMPUTE_RESERVE_S))


def fallback_read(stale: list | None, reason: str, lost: str | None = None) -> RecordRead:
    """What a request gets when the store did not answer (timeout, error, open breaker): the
    user's last good records if this server kept them, else defaults; degraded either way,
    with the store-wide loss (`lost`) named first when there is one."""
    return RecordRead(stale, "stale" if stale is not None else "default", lost or reason)


class UserRecords:
    """Per-server: the caches of users' records and the store's breaker. `run_io(fn, *args)`
    runs a blocking store call off the event loop; `lost()` says whether the store lost its data."""

    def __init__(self, cfg: ServerConfig, store: OnlineStore, metrics: Metrics, *, run_io: Callable[..., Awaitable],
                 inline: bool, lost: Callable[[], str | None], repair: Callable[[StateLayout, list[RecordKey]], None] | None = None,
                 freshness: FreshnessBook | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self._run_io = run_io
        self.inline = inline  # an in-process store (memory): no thread hop, no timeout
        self._lost = lost
        self._repair = repair  # told which served-values records needed their state (server/values_repair.py)
        self._freshness = freshness  # told the bytes read per feature set
        self.feature_cache = FeatureCache(cfg.feature_cache_ttl_s, metrics.cache_result("features"))
        self.stale = StaleRecords(cfg.stale_feature_users)
        self.generations = Generations()
        self.breaker = Breaker(cfg.breaker_open_s)

    async def store_read(self, op: str, fn: Callable, *args, budget_s: float):
        """A request-path store call: breaker, budget, errors turned into StoreFault (counted)."""
        if not self.breaker.allow():
            raise StoreFault("store_breaker_open")
        wait = store_wait_s(self.cfg.store_budget_s, budget_s)
        try:
            out = fn(*args) if self.inline else await asyncio.wait_for(self._run_io(fn, *args), timeout=wait)
        except TimeoutError:
            self.breaker.failure()
            self.metrics.store_errors.labels(op, "timeout").inc()
            raise StoreFault(STORE_TIMEOUT) from None
        except StoreUnavailable as exc:
            self.breaker.failure()
            self.metrics.store_errors.labels(op, "unavailable").inc()
            log.warning("online store unavailable (%s): %s", op, exc)
            raise StoreFault("store_unavailable") from None
        except Exception as exc:  # noqa: BLE001 - any store failure degrades the answer, never fails it
            self.breaker.failure()
            self.metrics.store_errors.labels(op, type(exc).__name__).inc()
            log.exception("online store error during %s", op)
            raise StoreFault("store_error") from None
        self.breaker.success()
        return out

    async def read(self, snap: Snapshot, user: int, budget_s: float, now_ms: int) -> RecordRead:
        """The user's records for this snapshot's key plan. The one place a store-wide loss
        marks an answer degraded, whatever the records came from."""
        key = f"{snap.plan.plan_id}:{user}"
        lost = self._lost()
        raw = await self.feature_cache.get(key)
        if raw is not None:
            raw, reason = await self._states_for_expired(snap, user, raw, now_ms, budget_s)
            if reason is None:
                await self.feature_cache.set(key, raw)  # keeps the states it now holds
            return RecordRead(raw, "cache", lost or reason)
        gen = self.generations.get(user)
        if lost is not None:  # the store lost its data: the user's last good records beat its "not found"
            stale = self.stale.get(key)
            if stale is not None:
                return RecordRead(stale, "stale", lost)
        try:
            raw = await self.store_read("get_many", self.store.get_groups, snap.plan.groups(user), budget_s=budget_s)
        except StoreFault as f:
            return fallback_read(self.stale.get(key), f.reason, lost)
        if self._freshness is not None:
            self._freshness.read(snap.plan.bytes_by_set(raw))
        raw, reason = await self._states_for_expired(snap, user, raw, now_ms, budget_s)
        if lost is not None or reason is not None:
            return RecordRead(raw, "store", lost or reason)  # not cached: an emptied store's answer, or half of one
        if self.generations.get(user) == gen:  # no live event for this user arrived meanwhile
            await self.feature_cache.set(key, raw)
            self.stale.put(key, raw)
        return RecordRead(raw, "store", None)

    async def _states_for_expired(self, snap: Snapshot, user: int, raw: list, now_ms: int, budget_s: float) -> tuple[list, str | None]:
        """Served-values records that cannot answer at now_ms are replaced by their state
        records (a second round trip, only for those) and queued for repair."""
        pos = snap.plan.expired(raw, now_ms)
        if len(pos) == 0:
            return raw, None
        state_keys = snap.plan.state_keys(user)
        keys = [state_keys[p] for p in pos.tolist()]
        self.metrics.values_fallbacks.inc(len(keys))
        try:
            states = await self.store_read("get_many_states", self.store.get_many, keys, budget_s=budget_s)
        except StoreFault as f:
            return raw, f.reason  # decoded as missing (unresolved), the answer degraded
        raw = list(raw)
        for p, st in zip(pos.tolist(), states):
            raw[p] = st
        if self._freshness is not None:
            self._freshness.read(snap.plan.bytes_by_set(states, pos.tolist()))
        if self._repair is not None:
            for lay, ks in snap.plan.layouts_of(keys):
                self._repair(lay, ks)
        return raw, None

    async def deferred_pairs(self, snap: Snapshot, uf: UserFeatures, rows: np.ndarray, now_ms: int,
                             budget_s: float) -> tuple[Mapping[str, PairTable], str | None]:
        """Pair-set values the plan could not prefetch (too many values): a second round trip."""
        need = pipeline.missing_pair_values(snap, uf, rows)
        if not need:
            return {}, None
        sets = {fs.name: fs for fs, _ in snap.plan.pair_sets}
        groups, spans, n = [], [], 0
        for name, vals in need.items():
            groups.append(snap.plan.pair_group(sets[name], uf.user_id, vals))
            spans.append((name, vals, n, n + len(vals)))
            n += len(vals)
        try:
            raw = await self.store_read("get_many_pairs", self.store.get_groups, groups, budget_s=budget_s)
            reason = None
        except StoreFault as f:
            raw, reason = [None] * n, f.reason
        if self._freshness is not None:
            for name, _, a, b in spans:
                got = [r for r in raw[a:b] if r is not None]
                self._freshness.read({name: (len(got), sum(map(len, got)))})
        # served-values records past their interval: their states, in one more round trip
        fix: list[tuple[int, RecordKey]] = []
        for name, vals, a, b in spans:
            pos = snap.plan.pairs_expired(sets[name], raw[a:b], now_ms)
            if len(pos):
                fix += list(zip((a + pos).tolist(), snap.plan.pair_state_keys(sets[name], uf.user_id, vals[pos])))
        if fix:
            self.metrics.values_fallbacks.inc(len(fix))
            try:
                got = await self.store_read("get_many_pair_states", self.store.get_many, [k for _, k in fix], budget_s=budget_s)
                raw = list(raw)
                for (p, _), st in zip(fix, got):
                    raw[p] = st
                if self._repair is not None:
                    for lay, ks in snap.plan.layouts_of([k for _, k in fix]):
                        self._repair(lay, ks)
            except StoreFault as f:
                reason = reason or f.reason
        return {name: snap.plan.decode_pairs(sets[name], vals, raw[a:b], now_ms) for name, vals, a, b in spans}, reason

    async def forget_users(self, plan_ids: list[str], users: np.ndarray) -> int:
        """A user's records changed (a live event) or were erased: drop what any cache holds for
        them under every plan being served. Returns the cache entries dropped."""
        dropped = 0
        for u in np.asarray(users).tolist():
            self.generations.bump(u)  # response-cache keys carry it: older answers stop matching
            for plan_id in plan_ids:
                key = f"{plan_id}:{u}"
                dropped += int(await self.feature_cache.delete(key) or 0)
                dropped += int(self.stale.drop(key) or 0)
        return dropped

    async def forget_all(self) -> None:
        self.generations.bump_all()
        await self.feature_cache.clear()
        self.stale.clear()

    async def close(self) -> None:
        await self.feature_cache.close()
