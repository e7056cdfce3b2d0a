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
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Sequence

import numpy as np

from features.datasets import DatasetInfo
from features.definitions import FeatureSet
from features.eventlog import EventLog
from features.offline import OfflineStore
from features.lookup import FeatureLookup, LookupRequest
from features.online.base import OnlineStore, StoreUnavailable
from features.online.memory import MemoryStore
from monitor.erase import erase_user_from_logs
from server import heap, pipeline
from server.background import spawn, stop
from server.caches import ResponseCache
from server.clock import Clock
from server.freshness import FreshnessBook
from server.values_repair import ValuesRepair
from server.config import ServerConfig
from server.erasure_notices import ErasureNotices
from server.errors import DeadlineExceeded, InvalidArgument, ServingError, Unavailable
from server.metrics import Metrics
from server.erasure import ErasureReport, erase_user, write_audit
from server.rollout import RolloutSpec
from server.rollout_manager import RolloutManager
from server.shadow import ShadowJob, ShadowRunner
from server.drift_watch import DriftSettings, DriftWatch
from server.observe import RequestObserver
from server.pipeline import SOURCES, Ranked
from server.records import UserRecords
from server.releases import ReleaseManager, warm
from server.request import RequestContext
from server.store_watch import StoreWatch
from server.state import ServingState, Snapshot
from server.user_features import UserFeatures
from server.ingest import CountingDeadLetters, IngestOutcome, LiveIngest
from server.validation import FeaturesQuery, RankQuery, RecommendQuery

__all__ = ["RecommenderService", "RecommendOutcome", "RankOutcome", "FeatureSetOutcome", "warm"]

log = logging.getLogger(__name__)

_MIN_BUDGET_S = 0.002  # below this a request cannot do anything useful: DEADLINE_EXCEEDED


@dataclass(frozen=True)
class RecommendOutcome:
    items: list[tuple[int, float, str]]
    release_id: str
    degraded: bool
    latency: list[tuple[str, float]]
    request_id: str
    arm: str = "primary"


@dataclass(frozen=True)
class RankOutcome:
    items: list[tuple[int, float, str, bool]]  # (item, score, source, unknown: not in the catalogue, score NaN)
    release_id: str
    degraded: bool
    request_id: str
    arm: str = "primary"


@dataclass(frozen=True)
class FeatureSetOutcome:
    feature_set: str
    version: str
    found: bool
    feature_ts_ms: int
    staleness_ms: int
    values: list[tuple[str, float, bool]]


class RecommenderService:
    """A request reads as a straight line: take the arm's snapshot, read the user's records
    (server/records.py), decode, retrieve, pair features, rank, post-process. Releases and the
    item table are managed in server/releases.py, live events in server/ingest.py."""

    def __init__(self, cfg: ServerConfig, *, info: DatasetInfo, sets: Sequence[FeatureSet], store: OnlineStore, write_store: OnlineStore,
                 clock: Clock, state: ServingState, metrics: Metrics, epoch: str | None = None, refill: Callable[[], str] | None = None,
                 observer: RequestObserver | None = None) -> None:
        self.cfg = cfg
        self.observer = observer if observer is not None else RequestObserver()
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
        self.lookup = FeatureLookup(store, sets, modes=state.current.items.modes)
        self.cpu = ThreadPoolExecutor(cfg.cpu_threads, thread_name_prefix="parity-cpu")
        self.io = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="parity-io")
        self.response_cache = ResponseCache(cfg.response_cache_ttl_s, metrics.cache_result("response"))
        self.freshness = FreshnessBook(metrics, lambda name: self.state.current.items.modes.of(name).spec)
        self.values_repair = ValuesRepair(write_store, run_io=lambda fn, *a: self._run(self.io, fn, *a), clock_ms=clock.now_ms)
        self.records = UserRecords(cfg, store, metrics, run_io=lambda fn, *a: self._run(self.io, fn, *a),
                                   inline=isinstance(store, MemoryStore), lost=lambda: self.store_lost, repair=self.values_repair.offer,
                                   freshness=self.freshness)
        self.releases = ReleaseManager(cfg, state, self.sets_by_name, store, clock, metrics,
                                       run_io=lambda fn, *a, **kw: self._run(self.io, fn, *a, **kw),
                                       run_cpu=lambda fn, *a, **kw: self._run(self.cpu, fn, *a, **kw))
        self.started = time.time()
        self.requests_served = 0
        self.serving = True
        self.draining = False
        metrics.set_release(state.current.release_id)
        self.live = LiveIngest(cfg, info=info, sets=sets, write_store=write_store, state=state, clock=clock, metrics=metrics,
                               invalidate=self._invalidate)
        # A store that restarts empty is noticed and filled again (server/store_watch.py); memory never loses data.
        self.watch = (StoreWatch(write_store, epoch, refill=refill, io=lambda fn, *a: self._run(self.io, fn, *a),
                                 on_refilled=self._store_refilled, on_state=metrics.set_store_state, interval_s=cfg.store_check_s)
                      if not isinstance(store, MemoryStore) else None)
        self._watch_task: asyncio.Task | None = None
        # A DeleteUser another worker ran: forget the user here too (server/erasure_notices.py)
        self.erasures = ErasureNotices(write_store)
        self._erasure_seq = 0
        self._erasure_task: asyncio.Task | None = None
        self.inflight = 0  # Recommend/Rank requests being answered (the shadow waits for 0)
        self.shadow = ShadowRunner(cfg, busy=lambda: self.inflight > 0, read_records=self.records.read, queue_max=cfg.shadow_queue,
                                   cpu_share=cfg.shadow_cpu_share)
        self.rollouts = RolloutManager(cfg, write_store, state, self.releases, metrics, clock, run_io=lambda fn, *a: self._run(self.io, fn, *a),
                                       shadow=self.shadow)
        self.observer.add_listener(self.rollouts.on_observation)
        self.drift = None
        if cfg.drift_interval_s > 0:
            window_ms = int(cfg.drift_window_s * 1000)
            window_ms -= window_ms % 12
            self.drift = DriftWatch(metrics, state, clock.now_ms, settings=DriftSettings(window_ms=window_ms, interval_s=cfg.drift_interval_s),
                                    alerts_dir=(cfg.served_log / "alerts") if cfg.served_log is not None else None)
            self.observer.add_listener(self.drift.listener)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self.releases.start()
        self.shadow.start()
        self.values_repair.start()
        await self.rollouts.start()
        feedback_log = self.live.on_feedback
        self.live.on_feedback = (self.rollouts.on_feedback if feedback_log is None
                                 else _fan_out(feedback_log, self.rollouts.on_feedback))
        if self.drift is not None:
            self.drift.start()
        if self.watch is not None:
            self._watch_task = spawn(self.watch.run(), "parity-store-watch")
        try:  # nothing is cached yet: only later notices concern this worker
            self._erasure_seq = (await self._run(self.io, self.erasures.since, 0)).seq
        except Exception as exc:  # noqa: BLE001 - a store down at start-up: the poll catches up
            log.warning("erasure notices unavailable at start-up: %s", exc)
        self._erasure_task = spawn(self._erasure_loop(), "parity-erasure-notices")
        log.info("heap settled before serving: %s", heap.settle())

    async def close(self) -> None:
        await stop(self._watch_task, self._erasure_task)
        self._watch_task = self._erasure_task = None
        await self.rollouts.close()
        await self.shadow.close()
        await self.values_repair.close()
        await self.releases.close()
        if self.drift is not None:
            await self.drift.close()
        await self.response_cache.close()
        await self.records.close()
        self.cpu.shutdown(wait=False, cancel_futures=True)
        self.io.shutdown(wait=False, cancel_futures=True)
        self.live.close()
        self.observer.close()
        for s in {id(self.store): self.store, id(self.write_store): self.write_store}.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not fail shutdown
                log.debug("store close failed", exc_info=True)

    # -- helpers ----------------------------------------------------------------------------
    async def _run(self, pool: ThreadPoolExecutor, fn: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    async def _compute(self, req: RequestContext, fn: Callable, *args):
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
        late = -req.left()
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

    def _begin(self, user_id: int, budget_s: float | None) -> RequestContext:
        """The request's context: its arm's snapshot, taken once, and its budget."""
        t0 = time.perf_counter()
        budget = self._budget(budget_s)
        arm, snap = self.rollouts.arm_for(user_id)
        return RequestContext(snap, arm, self._as_of(), budget, started=t0)

    def _observe(self, req: RequestContext, uf: UserFeatures, degraded: bool) -> None:
        if degraded:
            self.metrics.degraded.labels(req.reason or "bad_record").inc()
        self.metrics.missing.observe(uf.missing_rate)
        self.freshness.served(req.snap.plan.user_set.name, req.now_ms, np.array([uf.feature_ts]))
        for name, table in uf.pairs.items():
            self.freshness.served(name, req.now_ms, table.frame.feature_ts[:-1])
        if uf.feature_ts >= 0:
            self.metrics.staleness.observe(max(0, req.now_ms - uf.feature_ts) / 1000.0)
        self.metrics.observe_stages(req.timer.stages)
        self.requests_served += 1

    def _response_key(self, snap: Snapshot, q: RecommendQuery) -> str:
        h = hashlib.blake2b(q.exclude.tobytes(), digest_size=8)
        h.update(repr(q.context).encode())
        return f"{snap.release_id}|{snap.plan.plan_id}|{snap.items.token}|{q.user_id}|{self.records.generations.get(q.user_id)}|{q.k}|{h.hexdigest()}"

    # -- the request path: pure steps run by _compute ------------------------------------------
    @staticmethod
    def _decode(req: RequestContext, user: int) -> UserFeatures:
        r = req.records
        with req.timer.stage("decode"):
            return req.snap.plan.decode(user, r.raw, req.now_ms, source=r.source, degraded=r.reason is not None)

    def _recommend_job(self, req: RequestContext, q: RecommendQuery):
        """Decode the records, retrieve, rank, post-process (one step of CPU work)."""
        uf = self._decode(req, q.user_id)
        return (uf, *pipeline.recommend(req.snap, uf, q.exclude, q.k, req.now_ms, self.cfg, req.timer))

    def _retrieve_job(self, req: RequestContext, q: RecommendQuery):
        uf = self._decode(req, q.user_id)
        return uf, pipeline.retrieve(req.snap, uf, q.exclude, req.now_ms, self.cfg, req.timer)

    def _rank_job(self, req: RequestContext, q: RankQuery, score_now: bool):
        uf = self._decode(req, q.user_id)
        return uf, (pipeline.score_items(req.snap, uf, q.item_ids, req.now_ms, req.timer) if score_now else None)

    # -- RPCs -------------------------------------------------------------------------------
    async def recommend(self, q: RecommendQuery, budget_s: float | None = None) -> RecommendOutcome:
        req = self._begin(q.user_id, budget_s)
        self.inflight += 1
        try:
            out, missing, ranked, top = await self._recommend(req, q)
        except BaseException as exc:
            self._observe_failure(req, "Recommend", q.user_id, q.request_id, exc)
            raise
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.shadow.notify_idle()
        self._observe_done(req, "Recommend", q.user_id, q.request_id, out.degraded, missing, ranked, top)
        shadow = self.rollouts.shadow_for(q.request_id)
        if shadow is not None and req.records is not None and req.arm == "primary":
            if not self.shadow.offer(ShadowJob(shadow, q.user_id, q.exclude, q.k, req.now_ms, req.records, req.snap.plan.plan_id, ranked, top)):
                self.metrics.shadow_dropped.inc()
        return out

    async def _recommend(self, req: RequestContext, q: RecommendQuery):
        snap = req.snap
        rkey = self._response_key(snap, q)
        with req.timer.stage("response_cache"):
            hit = await self.response_cache.get(rkey)
        if hit is not None:
            req.timer.add("total", req.elapsed_ms())
            self.requests_served += 1
            ranked = Ranked(np.asarray([i for i, _, _ in hit], dtype=np.int64), np.asarray([s for _, s, _ in hit], dtype=np.float32),
                            np.asarray([SOURCES.index(src) for _, _, src in hit], dtype=np.int8))
            out = RecommendOutcome(hit, snap.release_id, False, req.timer.stages if q.include_latency else [], q.request_id, req.arm)
            return out, float("nan"), ranked, np.arange(len(hit))
        with req.timer.stage("features"):
            req.records = await self.records.read(snap, q.user_id, req.left(), req.now_ms)
        reason = req.reason
        if snap.plan.deferred:  # a pair set with too many values to prefetch: a second round trip
            uf, cand = await self._compute(req, self._retrieve_job, req, q)
            with req.timer.stage("pair_features"):
                extra, r2 = await self.records.deferred_pairs(snap, uf, cand.rows, req.now_ms, req.left())
            reason = reason or r2
            ranked, top = await self._compute(req, pipeline.recommend, snap, uf, q.exclude, q.k, req.now_ms, self.cfg, req.timer, cand, extra)
        else:
            uf, ranked, top = await self._compute(req, self._recommend_job, req, q)
        items = [(int(ranked.ids[i]), float(ranked.scores[i]), SOURCES[int(ranked.source[i])]) for i in top.tolist()]
        degraded = reason is not None or uf.degraded
        if not degraded:
            await self.response_cache.set(rkey, items)
        self._observe(req, uf, degraded)
        if reason is not None and req.reason is None:
            self.metrics.degraded.labels(reason).inc()
            req.records = replace(req.records, reason=reason)
        req.timer.add("total", req.elapsed_ms())
        out = RecommendOutcome(items, snap.release_id, degraded, req.timer.stages if q.include_latency else [], q.request_id, req.arm)
        return out, uf.missing_rate, ranked, top

    async def rank(self, q: RankQuery, budget_s: float | None = None) -> RankOutcome:
        req = self._begin(q.user_id, budget_s)
        self.inflight += 1
        try:
            out, missing, ranked = await self._rank(req, q)
        except BaseException as exc:
            self._observe_failure(req, "Rank", q.user_id, q.request_id, exc)
            raise
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.shadow.notify_idle()
        self._observe_done(req, "Rank", q.user_id, q.request_id, out.degraded, missing, ranked, np.arange(len(ranked.ids)))
        return out

    async def _rank(self, req: RequestContext, q: RankQuery):
        snap = req.snap
        req.records = await self.records.read(snap, q.user_id, req.left(), req.now_ms)
        reason = req.reason
        uf, ranked = await self._compute(req, self._rank_job, req, q, not snap.plan.deferred)
        if ranked is None:
            extra, r2 = await self.records.deferred_pairs(snap, uf, snap.items.rows(q.item_ids), req.now_ms, req.left())
            reason = reason or r2
            ranked = await self._compute(req, pipeline.score_items, snap, uf, q.item_ids, req.now_ms, req.timer, extra)
        degraded = reason is not None or uf.degraded
        self._observe(req, uf, degraded)
        if reason is not None and req.reason is None:
            self.metrics.degraded.labels(reason).inc()
            req.records = replace(req.records, reason=reason)
        cat = snap.items.catalog
        unknown = (cat.index(q.item_ids) < 0) if len(cat) else np.ones(len(q.item_ids), dtype=bool)
        items = [(int(i), float("nan") if u else float(s), "request", bool(u))
                 for i, s, u in zip(q.item_ids.tolist(), ranked.scores.tolist(), unknown.tolist())]
        return RankOutcome(items, snap.release_id, degraded, q.request_id, req.arm), uf.missing_rate, ranked

    # -- what a request tells the served log, the canary guard and the drift window ---------------
    def _observe_done(self, req: RequestContext, method: str, user: int, request_id: str, degraded: bool, missing: float,
                      ranked: Ranked, top: np.ndarray) -> None:
        self.observer.observe(arm=req.arm, release_id=req.snap.release_id, method=method, user_id=user, request_id=request_id,
                              ts_ms=req.now_ms, status="degraded" if degraded else "ok", reason=req.reason if degraded else None,
                              latency_ms=req.elapsed_ms(), ranked=ranked, top=top, missing_rate=missing,
                              columns=req.snap.runtime.inputs.columns)

    def _observe_failure(self, req: RequestContext, method: str, user: int, request_id: str, exc: BaseException) -> None:
        code = exc.code if isinstance(exc, ServingError) else ("CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL")
        self.observer.observe(arm=req.arm, release_id=req.snap.release_id, method=method, user_id=user, request_id=request_id,
                              ts_ms=req.now_ms, status=f"error:{code}", reason=None, latency_ms=req.elapsed_ms(), ranked=None, top=None,
                              missing_rate=float("nan"), columns=req.snap.runtime.inputs.columns)

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
            self.lookup.modes = self.state.current.items.modes  # the modes this server serves (they ride with the item table)
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
    def stale(self):
        return self.records.stale

    @property
    def store_lost(self) -> str | None:
        """Why answers are degraded store-wide right now (the store lost its data), else None."""
        if self.watch is None or self.watch.state == "ok":
            return None
        return f"store_{self.watch.state}"

    async def _store_refilled(self) -> None:
        """Whatever was cached came from before the loss: forget it all."""
        await self.records.forget_all()
        self.releases.mark_dirty()  # the item table too

    def _plan_ids(self) -> list[str]:
        return sorted({s.plan.plan_id for s in self.state.arms().values()})

    async def _invalidate(self, users: np.ndarray) -> None:
        await self.records.forget_users(self._plan_ids(), users)
        self.releases.mark_dirty()  # item features changed too

    # -- erasure ---------------------------------------------------------------------------------
    async def delete_user(self, user_id: int, reason: str, actor: str = "admin") -> ErasureReport:
        """Erase the user everywhere this server reaches (server/erasure.py), then drop every
        cached trace of them; their next request is served as a new user's."""
        if not reason.strip():
            raise InvalidArgument("reason", "must say why the user's data is erased (it goes into the audit log)")
        for w in (self.observer.served_log, self.observer.feedback):
            if w is not None:  # erasure rewrites finished parts: finish the open ones first
                await self._run(self.io, w.flush, 30.0, finish_parts=True)
        log_ = EventLog(self.cfg.data_dir / "events")
        offline = OfflineStore(self.cfg.data_dir / "offline")
        try:
            rep = await self._run(self.io, erase_user, user_id, reason=reason, actor=actor, log=log_, store=self.write_store, sets=self.sets,
                                  offline=offline, served_log=self.cfg.served_log, audit=False)
        except StoreUnavailable as exc:
            raise Unavailable(f"the online store failed during the erasure ({exc}); nothing is half-done that a retry will not finish") from None
        dropped = await self.records.forget_users(self._plan_ids(), np.asarray([user_id]))
        self.releases.mark_dirty()  # item aggregates were recomputed without them
        rep = replace(rep, cache_entries_dropped=dropped)
        try:
            seq = await self._run(self.io, self.erasures.publish, user_id)
            if seq == self._erasure_seq + 1:
                self._erasure_seq = seq  # nobody else's notice in between: this one is applied already
        except Exception as exc:  # noqa: BLE001 - the store's own errors
            raise Unavailable(f"the user was erased from the store, logs and this worker, but the notice to the other workers failed "
                              f"({exc}): retry DeleteUser (it is idempotent)") from None
        await self._run(self.io, write_audit, log_, rep, reason, actor)
        log.info("user erased everywhere (audit %s)", rep.audit_id)
        return rep

    async def _erasure_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.rollout_poll_s)
            try:
                await self.apply_erasure_notices()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving; the next poll retries from the same number
                log.warning("erasure notices poll failed: %s", exc)

    async def apply_erasure_notices(self) -> int:
        """Forget the users other workers erased since the last poll: caches, last-good records,
        and rows in the served-log part this worker is still writing. Returns users forgotten."""
        n = await self._run(self.io, self.erasures.since, self._erasure_seq)
        if n.seq == self._erasure_seq:
            return 0
        users = sorted(set(n.users))
        if n.missed_some:
            await self.records.forget_all()
        else:
            await self.records.forget_users(self._plan_ids(), np.asarray(users, dtype=np.int64))
        if self.cfg.served_log is not None and users:
            for w in (self.observer.served_log, self.observer.feedback):
                if w is not None:
                    await self._run(self.io, w.flush, 30.0, finish_parts=True)
            for u in users:
                await self._run(self.io, erase_user_from_logs, self.cfg.served_log, u)
        self.releases.mark_dirty()
        self._erasure_seq = n.seq
        log.info("erasure notices up to %d applied (%s)", n.seq, "every user forgotten" if n.missed_some else f"{len(users)} users")
        return len(users)

    # -- rollouts -----------------------------------------------------------------------------------
    async def set_rollout(self, spec: RolloutSpec | None = None, *, promote: bool = False, abort: bool = False) -> dict:
        await self.rollouts.set(spec, promote=promote, abort=abort)
        return self.rollouts.status()

    def rollout_status(self) -> dict:
        return self.rollouts.status()

    # -- releases ---------------------------------------------------------------------------------
    async def load_release(self, path: str) -> tuple[str, str, float]:
        return await self.releases.load_release(path, self.rollouts.serve_primary)

    async def refresh_items(self, *, force: bool = False) -> bool:
        return await self.releases.refresh_items(force=force)

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
            "feature_sets": self.freshness.summary(),
            "values_repairs_pending": self.values_repair.pending(),
            "values_repairs_done": self.values_repair.rewritten,
            "worker": 0 if self.cfg.worker_index is None else self.cfg.worker_index + 1,
            "pid": os.getpid(),
        }


def _fan_out(*sinks: Callable) -> Callable:
    def call(*args) -> None:
        for sink in sinks:
            sink(*args)

    return call


def _redact(spec: str) -> str:
    if "@" in spec and "://" in spec:
        scheme, rest = spec.split("://", 1)
        return f"{scheme}://***@{rest.split('@')[-1]}"
    return spec
