"""The request path's orchestration: caches, the store with deadlines and fallbacks, worker threads.

`RecommenderService` is what the gRPC servicers call, with validated queries in and plain
results out; it raises `server.errors` exceptions and never imports grpc, so it is tested
in-process. CPU work (`server.pipeline`) runs in a small thread pool off the event loop;
store round trips run in another, each bounded by the store budget and the request's
deadline. When the store fails or is slow the request is answered from the user's last
records or from defaults, marked degraded and counted; it never waits past its budget.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Sequence

import numpy as np

from features.datasets import DatasetInfo
from features.definitions import FeatureSet
from features.lookup import FeatureLookup, LookupRequest
from features.online.base import OnlineStore, StoreUnavailable
from features.online.memory import MemoryStore
from server import heap, pipeline
from server.caches import Breaker, FeatureCache, Generations, ResponseCache, StaleRecords
from server.clock import Clock
from server.config import ServerConfig
from server.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ServingError, Unavailable
from server.items import catalog_stamp, change_token, load_catalog, load_item_table
from server.metrics import Metrics
from server.pipeline import SOURCES, Timer
from server.store_watch import StoreWatch
from server.state import ServingState, Snapshot, build_snapshot, load_runtime, release_path_under
from server.user_features import PairTable, UserFeatures
from server.ingest import CountingDeadLetters, IngestOutcome, LiveIngest
from server.validation import FeaturesQuery, RankQuery, RecommendQuery

__all__ = ["RecommenderService", "RecommendOutcome", "RankOutcome", "FeatureSetOutcome", "warm"]

log = logging.getLogger(__name__)

_MIN_BUDGET_S = 0.002  # below this a request cannot do anything useful: DEADLINE_EXCEEDED
_COMPUTE_RESERVE_S = 0.02  # left for ranking when the store stage takes its share of a deadline


@dataclass(frozen=True)
class RecommendOutcome:
    items: list[tuple[int, float, str]]
    release_id: str
    degraded: bool
    latency: list[tuple[str, float]]
    request_id: str


@dataclass(frozen=True)
class RankOutcome:
    items: list[tuple[int, float, str, bool]]  # (item, score, source, unknown: not in the catalogue, score NaN)
    release_id: str
    degraded: bool
    request_id: str


@dataclass(frozen=True)
class FeatureSetOutcome:
    feature_set: str
    version: str
    found: bool
    feature_ts_ms: int
    staleness_ms: int
    values: list[tuple[str, float, bool]]


class _StoreFault(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def warm(snap: Snapshot, cfg: ServerConfig, now_ms: int) -> None:
    """Run the whole pipeline once (ONNX Runtime and ScaNN allocate on first use)."""
    uf = snap.plan.decode(0, None, now_ms, source="default")
    pipeline.recommend(snap, uf, np.empty(0, dtype=np.int64), 10, now_ms, cfg, Timer())


class RecommenderService:
    def __init__(self, cfg: ServerConfig, *, info: DatasetInfo, sets: Sequence[FeatureSet], store: OnlineStore, write_store: OnlineStore,
                 clock: Clock, state: ServingState, metrics: Metrics, epoch: str | None = None, refill: Callable[[], str] | None = None) -> None:
        self.cfg = cfg
        self.info = info
        self.sets = tuple(sets)
        self.sets_by_name: dict[str, FeatureSet] = {fs.name: fs for fs in sets}
        self.sets_by_entity: dict[str, list[str]] = {}
        for fs in sets:
            self.sets_by_entity.setdefault(fs.entity.name, []).append(fs.name)
        self.store = store
        self.write_store = write_store
        self.clock = clock
        self.state = state
        self.metrics = metrics
        self.lookup = FeatureLookup(store, sets)
        self.inline_store = isinstance(store, MemoryStore)  # in-process and fast: no thread hop
        self.cpu = ThreadPoolExecutor(cfg.cpu_threads, thread_name_prefix="parity-cpu")
        self.io = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="parity-io")
        self.response_cache = ResponseCache(cfg.response_cache_ttl_s, metrics.cache_result("response"))
        self.feature_cache = FeatureCache(cfg.feature_cache_ttl_s, metrics.cache_result("features"))
        self.stale = StaleRecords(cfg.stale_feature_users)
        self.generations = Generations()
        self.breaker = Breaker(cfg.breaker_open_s)
        self.started = time.time()
        self.requests_served = 0
        self.serving = True
        self.draining = False
        self._load_lock: asyncio.Lock | None = None
        self._dirty: asyncio.Event | None = None
        self._refresh_task: asyncio.Task | None = None
        metrics.set_release(state.current.release_id)
        self.live = LiveIngest(cfg, info=info, sets=sets, write_store=write_store, state=state, clock=clock, metrics=metrics,
                               invalidate=self._invalidate)
        # A store that restarts empty is noticed and filled again (server/store_watch.py); memory never loses data.
        self.watch = (StoreWatch(write_store, epoch, refill=refill, io=lambda fn, *a: self._run(self.io, fn, *a),
                                 on_refilled=self._store_refilled, on_state=metrics.set_store_state, interval_s=cfg.store_check_s)
                      if not isinstance(store, MemoryStore) else None)
        self._watch_task: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._load_lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_loop(), name="parity-item-refresh")
        if self.watch is not None:
            self._watch_task = asyncio.get_running_loop().create_task(self.watch.run(), name="parity-store-watch")
        log.info("heap settled before serving: %s", heap.settle())

    async def close(self) -> None:
        for task in (self._watch_task, self._refresh_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._watch_task = self._refresh_task = None
        await self.response_cache.close()
        await self.feature_cache.close()
        self.cpu.shutdown(wait=False, cancel_futures=True)
        self.io.shutdown(wait=False, cancel_futures=True)
        self.live.close()
        for s in {id(self.store): self.store, id(self.write_store): self.write_store}.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not fail shutdown
                log.debug("store close failed", exc_info=True)

    # -- helpers ----------------------------------------------------------------------------
    async def _run(self, pool: ThreadPoolExecutor, fn: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    async def _compute(self, fn: Callable, *args, started: float, budget_s: float):
        """A request's CPU work (decode, retrieve, rank): on the event loop itself by default.
        Measured (bench/RESULTS.md): handing each request to a worker thread and back costs
        GIL hand-offs that wait on the interpreter's switch interval under load; at 300 req/s
        p99 fell from 54 ms to 11 ms inline. 'thread' keeps the worker pool.
        Inline work cannot be abandoned half-way, so a result that comes after the request's
        deadline is discarded here (DEADLINE_EXCEEDED), never sent or cached."""
        if self.cfg.request_compute == "inline":
            out = fn(*args)
        else:
            out = await self._run(self.cpu, fn, *args)
        late = time.perf_counter() - started - budget_s
        if late > 0:
            raise DeadlineExceeded(f"the work finished {late * 1000:.0f} ms past the request's deadline; result discarded")
        return out

    def _as_of(self) -> int:
        """The request's as-of time: the clock rounded down to the tick (0: exact)."""
        now = self.clock.now_ms()
        tick = self.cfg.as_of_tick_ms
        return now - now % tick if tick > 1 else now

    def _budget(self, budget_s: float | None) -> float:
        b = min(self.cfg.default_deadline_s, self.cfg.max_deadline_s) if budget_s is None else budget_s
        if b < _MIN_BUDGET_S:
            raise DeadlineExceeded(f"the request's deadline leaves {b * 1000:.1f} ms; nothing useful fits")
        return b

    async def _store_read(self, op: str, fn: Callable, *args, budget_s: float):
        """A request-path store call: breaker, budget, errors turned into _StoreFault (counted)."""
        if not self.breaker.allow():
            raise _StoreFault("store_breaker_open")
        wait = max(0.001, min(self.cfg.store_budget_s, budget_s - _COMPUTE_RESERVE_S))
        try:
            if self.inline_store:
                out = fn(*args)
            else:
                out = await asyncio.wait_for(self._run(self.io, fn, *args), timeout=wait)
        except TimeoutError:
            self.breaker.failure()
            self.metrics.store_errors.labels(op, "timeout").inc()
            raise _StoreFault("store_timeout") from None
        except StoreUnavailable as exc:
            self.breaker.failure()
            self.metrics.store_errors.labels(op, "unavailable").inc()
            log.warning("online store unavailable (%s): %s", op, exc)
            raise _StoreFault("store_unavailable") from None
        except Exception as exc:  # noqa: BLE001 - any store failure degrades the answer, never fails it
            self.breaker.failure()
            self.metrics.store_errors.labels(op, type(exc).__name__).inc()
            log.exception("online store error during %s", op)
            raise _StoreFault("store_error") from None
        self.breaker.success()
        return out

    async def _user_records(self, snap: Snapshot, user: int, budget_s: float) -> tuple[list | None, str, str | None]:
        """(raw records or None, source, degraded reason). The one place a store-wide loss
        (server/store_watch.py) marks an answer degraded, whatever the records came from."""
        key = f"{snap.plan.plan_id}:{user}"
        lost = self.store_lost
        raw = await self.feature_cache.get(key)
        if raw is not None:
            return raw, "cache", lost
        gen = self.generations.get(user)
        if lost is not None:  # the store lost its data: the user's last good records beat its "not found"
            stale = self.stale.get(key)
            if stale is not None:
                return stale, "stale", lost
        try:
            raw = await self._store_read("get_many", self.store.get_many, snap.plan.keys(user), budget_s=budget_s)
        except _StoreFault as f:
            stale = self.stale.get(key)
            return stale, ("stale" if stale is not None else "default"), lost or f.reason
        if lost is not None:
            return raw, "store", lost  # not cached: it is what an emptied store says
        if self.generations.get(user) == gen:  # no live event for this user arrived meanwhile
            await self.feature_cache.set(key, raw)
            self.stale.put(key, raw)
        return raw, "store", None

    async def _deferred_pairs(self, snap: Snapshot, uf: UserFeatures, rows: np.ndarray, now_ms: int, budget_s: float) -> tuple[dict[str, PairTable], str | None]:
        need = pipeline.missing_pair_values(snap, uf, rows)
        if not need:
            return {}, None
        sets = {fs.name: fs for fs, _ in snap.plan.pair_sets}
        keys, spans = [], []
        for name, vals in need.items():
            ks = snap.plan.pair_keys(sets[name], uf.user_id, vals)
            spans.append((name, vals, len(keys), len(keys) + len(ks)))
            keys += ks
        try:
            raw = await self._store_read("get_many_pairs", self.store.get_many, keys, budget_s=budget_s)
            reason = None
        except _StoreFault as f:
            raw, reason = [None] * len(keys), f.reason
        return {name: snap.plan.decode_pairs(sets[name], vals, raw[a:b], now_ms) for name, vals, a, b in spans}, reason

    def _observe_features(self, uf: UserFeatures, now_ms: int) -> None:
        self.metrics.missing.observe(uf.missing_rate)
        if uf.feature_ts >= 0:
            self.metrics.staleness.observe(max(0, now_ms - uf.feature_ts) / 1000.0)

    def _response_key(self, snap: Snapshot, q: RecommendQuery) -> str:
        h = hashlib.blake2b(q.exclude.tobytes(), digest_size=8)
        h.update(repr(q.context).encode())
        return f"{snap.release_id}|{snap.plan.plan_id}|{snap.items.token}|{q.user_id}|{self.generations.get(q.user_id)}|{q.k}|{h.hexdigest()}"

    # -- RPCs -------------------------------------------------------------------------------
    @staticmethod
    def _decode(snap: Snapshot, user: int, raw, source: str, reason: str | None, now: int, timer: Timer) -> UserFeatures:
        with timer.stage("decode"):
            return snap.plan.decode(user, raw, now, source=source, degraded=reason is not None)

    def _recommend_job(self, snap: Snapshot, q: RecommendQuery, raw, source: str, reason: str | None, now: int, timer: Timer):
        """One worker-thread job: decode the records, retrieve, rank, post-process."""
        uf = self._decode(snap, q.user_id, raw, source, reason, now, timer)
        return (uf, *pipeline.recommend(snap, uf, q.exclude, q.k, now, self.cfg, timer))

    def _retrieve_job(self, snap: Snapshot, q: RecommendQuery, raw, source: str, reason: str | None, now: int, timer: Timer):
        uf = self._decode(snap, q.user_id, raw, source, reason, now, timer)
        return uf, pipeline.retrieve(snap, uf, q.exclude, now, self.cfg, timer)

    async def recommend(self, q: RecommendQuery, budget_s: float | None = None) -> RecommendOutcome:
        t0 = time.perf_counter()
        budget = self._budget(budget_s)
        snap = self.state.current  # this request's release, start to end
        now = self._as_of()
        timer = Timer()
        rkey = self._response_key(snap, q)
        with timer.stage("response_cache"):
            hit = await self.response_cache.get(rkey)
        if hit is not None:
            timer.add("total", (time.perf_counter() - t0) * 1000)
            self.requests_served += 1
            return RecommendOutcome(hit, snap.release_id, False, timer.stages if q.include_latency else [], q.request_id)
        t = time.perf_counter()
        raw, source, reason = await self._user_records(snap, q.user_id, budget - (time.perf_counter() - t0))
        timer.add("features", (time.perf_counter() - t) * 1000)
        if snap.plan.deferred:  # a pair set with too many values to prefetch: a second round trip
            uf, cand = await self._compute(self._retrieve_job, snap, q, raw, source, reason, now, timer, started=t0, budget_s=budget)
            t = time.perf_counter()
            extra, r2 = await self._deferred_pairs(snap, uf, cand.rows, now, budget - (time.perf_counter() - t0))
            timer.add("pair_features", (time.perf_counter() - t) * 1000)
            reason = reason or r2
            ranked, top = await self._compute(pipeline.recommend, snap, uf, q.exclude, q.k, now, self.cfg, timer, cand, extra, started=t0, budget_s=budget)
        else:
            uf, ranked, top = await self._compute(self._recommend_job, snap, q, raw, source, reason, now, timer, started=t0, budget_s=budget)
        items = [(int(ranked.ids[i]), float(ranked.scores[i]), SOURCES[int(ranked.source[i])]) for i in top.tolist()]
        degraded = reason is not None or uf.degraded
        if degraded:
            self.metrics.degraded.labels(reason or "bad_record").inc()
        else:
            await self.response_cache.set(rkey, items)
        self._observe_features(uf, now)
        self.metrics.observe_stages(timer.stages)
        timer.add("total", (time.perf_counter() - t0) * 1000)
        self.requests_served += 1
        return RecommendOutcome(items, snap.release_id, degraded, timer.stages if q.include_latency else [], q.request_id)

    def _rank_job(self, snap: Snapshot, q: RankQuery, raw, source: str, reason: str | None, now: int, timer: Timer, extra):
        uf = self._decode(snap, q.user_id, raw, source, reason, now, timer)
        if extra is None:
            return uf, pipeline.score_items(snap, uf, q.item_ids, now, timer)
        return uf, None

    async def rank(self, q: RankQuery, budget_s: float | None = None) -> RankOutcome:
        t0 = time.perf_counter()
        budget = self._budget(budget_s)
        snap = self.state.current
        now = self._as_of()
        timer = Timer()
        raw, source, reason = await self._user_records(snap, q.user_id, budget)
        uf, scores = await self._compute(self._rank_job, snap, q, raw, source, reason, now, timer, {} if snap.plan.deferred else None,
                                         started=t0, budget_s=budget)
        if scores is None:
            extra, r2 = await self._deferred_pairs(snap, uf, snap.items.rows(q.item_ids), now, budget - (time.perf_counter() - t0))
            reason = reason or r2
            scores = await self._compute(pipeline.score_items, snap, uf, q.item_ids, now, timer, extra, started=t0, budget_s=budget)
        degraded = reason is not None or uf.degraded
        if degraded:
            self.metrics.degraded.labels(reason or "bad_record").inc()
        self._observe_features(uf, now)
        self.metrics.observe_stages(timer.stages)
        self.requests_served += 1
        cat = snap.items.catalog
        unknown = (cat.index(q.item_ids) < 0) if len(cat) else np.ones(len(q.item_ids), dtype=bool)
        items = [(int(i), float("nan") if u else float(s), "request", bool(u))
                 for i, s, u in zip(q.item_ids.tolist(), scores.tolist(), unknown.tolist())]
        return RankOutcome(items, snap.release_id, degraded, q.request_id)

    async def get_features(self, q: FeaturesQuery, budget_s: float | None = None) -> list[FeatureSetOutcome]:
        names = list(q.feature_sets) or self.sets_by_entity[q.entity_type]
        sets = [self.sets_by_name[n] for n in names]
        try:
            code = sets[0].entity.parse_key_id(q.entity_id)
        except ValueError as exc:
            raise InvalidArgument("entity_id", str(exc)) from None
        now = self.clock.now_ms()
        reqs = [LookupRequest(fs.name, np.asarray([code], dtype=np.int64)) for fs in sets]
        wait = max(0.001, self._budget(budget_s) - 0.005)
        try:
            res = await asyncio.wait_for(self._run(self.io, self.lookup.read_many, reqs, now), timeout=wait)
        except (StoreUnavailable, TimeoutError) as exc:
            self.metrics.store_errors.labels("read_many", type(exc).__name__).inc()
            log.warning("GetFeatures: online store failed: %s", exc or "timeout")  # the address stays in the log
            raise Unavailable(f"the online store did not answer within {wait * 1000:.0f} ms; retry later") from None
        out = []
        for fs, r in zip(sets, res):
            fr = r.frame
            vals = [(c, float(fr.values[0, j]), bool(fr.missing[0, j])) for j, c in enumerate(fr.columns)]
            out.append(FeatureSetOutcome(fs.name, fs.version, bool(r.found[0]), int(fr.feature_ts[0]), int(r.staleness_ms[0]), vals))
        return out

    async def ingest(self, chunks: AsyncIterator[Sequence]) -> IngestOutcome:
        return await self.live.ingest(chunks)

    @property
    def dead_letters(self) -> CountingDeadLetters:
        return self.live.dead_letters

    @property
    def store_lost(self) -> str | None:
        """Why answers are degraded store-wide right now (the store lost its data), else None."""
        if self.watch is None or self.watch.state == "ok":
            return None
        return f"store_{self.watch.state}"

    async def _store_refilled(self) -> None:
        """Whatever was cached came from before the loss: forget it all."""
        self.generations.bump_all()
        await self.feature_cache.clear()
        self.stale.clear()
        if self._dirty is not None:
            self._dirty.set()  # the item table too

    async def _invalidate(self, users: np.ndarray) -> None:
        plan_id = self.state.current.plan.plan_id
        for u in users.tolist():
            self.generations.bump(u)  # response-cache keys carry it: older answers stop matching
            key = f"{plan_id}:{u}"
            await self.feature_cache.delete(key)
            self.stale.drop(key)
        if self._dirty is not None:
            self._dirty.set()  # item features changed too

    # -- releases and the item table -----------------------------------------------------------
    async def load_release(self, path: str) -> tuple[str, str, float]:
        """Load, check, warm, then swap. Requests in flight finish on the release they started with."""
        assert self._load_lock is not None, "service not started"
        async with self._load_lock:
            t = time.perf_counter()
            old = self.state.current
            try:
                path = release_path_under(path, self.cfg.releases_dir)
                runtime = await self._run(self.io, load_runtime, path, self.sets_by_name, ort_threads=self.cfg.ort_threads, ranker=self.cfg.ranker,
                                               seen_cap=self.cfg.seen_cap)
                snap = await self._run(self.cpu, build_snapshot, runtime, self.state.current.items, self.sets_by_name,
                                       self.state.current.catalog_stamp, prefetch_limit=self.cfg.pair_prefetch_limit)
                await self._run(self.cpu, warm, snap, self.cfg, self.clock.now_ms())
            except ServingError:
                self.metrics.release_loads.labels("refused").inc()
                raise
            except Exception as exc:  # noqa: BLE001 - whatever a malformed release breaks, it is refused, never INTERNAL
                self.metrics.release_loads.labels("refused").inc()
                log.warning("release %s refused", path, exc_info=True)
                raise FailedPrecondition(f"release refused: {type(exc).__name__}: {str(exc)[:200]}") from None
            self.state.swap(snap)
            heap.settle(collect=False)  # the new release is long-lived too (no full collection: requests are in flight)
            self.metrics.set_release(snap.release_id)
            self.metrics.release_loads.labels("loaded").inc()
            ms = (time.perf_counter() - t) * 1000
            log.info("release %s loaded in %.0f ms (was %s)", snap.release_id, ms, old.release_id)
            return snap.release_id, old.release_id, ms

    async def refresh_items(self, *, force: bool = False) -> bool:
        """Re-read the catalogue or the item states when they changed; True if anything was swapped."""
        snap = self.state.current
        item_set = snap.items.layout.feature_set
        stamp = await self._run(self.io, catalog_stamp, self.cfg.data_dir)
        if stamp != snap.catalog_stamp:
            catalog = await self._run(self.io, load_catalog, self.cfg.data_dir)
            items = await self._run(self.io, load_item_table, self.store, item_set, catalog, frame_cache=self.cfg.item_frame_cache)
            new = await self._run(self.cpu, build_snapshot, snap.runtime, items, self.sets_by_name, stamp, prefetch_limit=self.cfg.pair_prefetch_limit)
            if self.state.current.runtime is not snap.runtime:
                return False  # a release swap won the race; the next round rebuilds on it
            self.state.swap(new)
            log.info("catalogue reloaded: %d items (%d new to the release)", len(catalog), len(new.new_ids))
            return True
        token = await self._run(self.io, change_token, self.store, item_set)
        if not force and token == snap.items.token:
            return False
        items = await self._run(self.io, load_item_table, self.store, item_set, snap.items.catalog, frame_cache=self.cfg.item_frame_cache)
        cur = self.state.current
        if cur.items.catalog is not items.catalog:
            return False
        self.state.swap(replace(cur, items=items))
        return True

    async def _refresh_loop(self) -> None:
        assert self._dirty is not None
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=self.cfg.item_refresh_s)
                await asyncio.sleep(0.05)  # let a burst of ingests land before re-reading
            except TimeoutError:
                pass
            force = self._dirty.is_set()
            self._dirty.clear()
            try:
                if await self.refresh_items(force=force):
                    self.metrics.item_refresh.labels("swapped").inc()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving the old table
                self.metrics.item_refresh.labels("failed").inc()
                log.warning("item table refresh failed (serving the previous one): %s", exc)

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        snap = self.state.current
        return {
            "release_id": snap.release_id,
            "store": _redact(self.cfg.store),
            "feature_set_versions": dict(snap.runtime.release.feature_set_versions),
            "requests_served": self.requests_served,
            "uptime_s": time.time() - self.started,
            "serving": self.serving,
            "now_ms": self.clock.now_ms(),
            "clock": self.clock.mode,
            "catalogue_items": snap.n_items,
        }


def _redact(spec: str) -> str:
    if "@" in spec and "://" in spec:
        scheme, rest = spec.split("://", 1)
        return f"{scheme}://***@{rest.split('@')[-1]}"
    return spec
