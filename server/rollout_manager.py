"""Running rollouts in the server: arms per request, the shadow, the canary guard's loop.

The rollout itself (releases, shares, salt, state, version) lives in the online store
(server/rollout.py's RolloutStore), never only in this process: every worker polls it and
applies what it finds, and a rollback decided by one worker's guard reaches all of them.
The guard's windows are store counters too (StoreGuardCounters), so all workers' requests
count toward one decision.

Applying a rollout loads its canary and shadow releases through the same checks as
LoadRelease (server/releases.py `prepare`); an Admin SetRollout loads them BEFORE storing the
spec, so a release that would be refused is refused to the operator, not discovered later.
A promotion makes the canary's snapshot the primary; a rollback or an abort drops the arms.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from features.events import EventBatch, EventType
from features.online.base import OnlineStore
from server.canary_guard import CanaryGuard, Decision, PredictionReference, StoreGuardCounters
from server.background import spawn, stop
from server.clock import Clock
from server.config import ServerConfig
from server.errors import FailedPrecondition, ServingError, Unavailable
from server.metrics import Metrics
from server.observe import Observation
from server.releases import ReleaseManager
from server.rollout import Rollout, RolloutSpec, RolloutStore
from server.shadow import ShadowRunner
from server.state import ServingState, Snapshot, release_path_under

__all__ = ["RolloutManager"]

log = logging.getLogger(__name__)


class RolloutManager:
    def __init__(self, cfg: ServerConfig, store: OnlineStore, state: ServingState, releases: ReleaseManager, metrics: Metrics, clock: Clock,
                 *, run_io: Callable[..., Awaitable], shadow: ShadowRunner) -> None:
        self.cfg = cfg
        self.store = store
        self.state = state
        self.releases = releases
        self.metrics = metrics
        self.clock = clock
        self._io = run_io
        self.shadow = shadow
        self.rollouts = RolloutStore(store)
        self.current = Rollout()
        self.guard: CanaryGuard | None = None
        self.last_decision: Decision | None = None
        self._loaded: dict[str, Snapshot] = {}  # release path -> prepared snapshot (of this rollout)
        self._lock: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # request id -> (arm, rollout version) of recent primary/canary answers: feedback is
        # credited to the arm that actually served the item, never to the next rollout's
        self._served: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._served_max = 200_000
        self._events_seen: OrderedDict[int, None] = OrderedDict()  # feedback event ids counted (a redelivery counts once)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        primary = self.state.current.release_id
        try:
            r = await self._io(self.rollouts.initialise, primary, self.clock.now_ms())
            await self._apply(r)
        except Exception as exc:  # noqa: BLE001 - a store down at start-up: serve the primary, poll later
            log.warning("rollout state unavailable at start-up (serving the primary): %s", exc)
        self._tasks = [spawn(self._poll_loop(), "parity-rollout-poll"), spawn(self._guard_loop(), "parity-canary-guard")]

    async def close(self) -> None:
        await stop(*self._tasks)
        self._tasks = []

    # -- the request side ---------------------------------------------------------------------
    def arm_for(self, user_id: int) -> tuple[str, Snapshot]:
        r = self.current
        if r.active and r.canary:
            canary = self.state.arm("canary")
            if canary is not None and r.arm_for(user_id) == "canary":
                return "canary", canary
        return "primary", self.state.current

    def shadow_for(self, request_id: str) -> Snapshot | None:
        r = self.current
        if r.active and r.shadow and r.shadow_for(request_id):
            return self.state.arm("shadow")
        return None

    def on_observation(self, obs: Observation) -> None:
        g = self.guard
        if g is None or obs.arm not in ("primary", "canary"):
            return
        self._served[obs.request_id] = (obs.arm, self.current.version)
        if len(self._served) > self._served_max:
            self._served.popitem(last=False)
        g.record_request(obs.arm, self.clock.now_ms(), latency_ms=obs.latency_ms, error=obs.status.startswith("error"),
                         missing_rate=obs.missing_rate if np.isfinite(obs.missing_rate) else 0.0, predictions=obs.sampled_scores)

    def on_feedback(self, events: EventBatch, request_ids: Sequence[str | None]) -> None:
        """From the ingest thread: hand over to the event loop (the guard is fed there)."""
        if self.guard is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._record_feedback, events, tuple(request_ids))

    def _record_feedback(self, events: EventBatch, request_ids: Sequence[str | None]) -> None:
        g = self.guard
        if g is None:
            return
        r = self.current
        per: dict[Any, list] = {}  # one entry per request: [arm, impressions, plays, watch seconds]
        for eid, u, ts, t, v, rid in zip(events.event_id.tolist(), events.user_id.tolist(), events.ts.tolist(), events.type.tolist(),
                                         events.value.tolist(), request_ids):
            if eid in self._events_seen:
                continue  # the ingest path hands over what it was given: a resent event is the same event
            self._events_seen[eid] = None
            if len(self._events_seen) > self._served_max:
                self._events_seen.popitem(last=False)
            served = self._served.get(rid) if rid else None
            if served is not None:
                arm, version = served
                if version != r.version:
                    continue  # feedback on an answer of an earlier rollout
            elif ts >= r.started_ms:
                arm = r.arm_for(u)  # no (known) request id: the user's arm, which a rollout keeps fixed
            else:
                continue  # from before this rollout started
            acc = per.setdefault(rid or ("user", u), [arm, 0, 0, 0.0])
            if t == EventType.IMPRESSION:
                acc[1] += 1
            elif t == EventType.PLAY:
                acc[2] += 1
                acc[3] += max(float(v), 0.0)
        for arm, imp, plays, watch in per.values():
            if imp or plays:
                g.record_feedback(arm, impressions=int(imp), plays=int(plays), watch_s=float(watch))

    # -- operator actions (Admin SetRollout) -----------------------------------------------------------
    async def set(self, spec: RolloutSpec | None = None, *, promote: bool = False, abort: bool = False) -> Rollout:
        assert self._lock is not None, "rollouts not started"
        async with self._lock:
            now = self.clock.now_ms()
            if spec is not None:
                for path in (spec.canary, spec.shadow):  # refused here, before anything is stored
                    if path and path not in self._loaded:
                        self._loaded[path] = await self.releases.prepare(path)
                r = await self._io(self.rollouts.update, lambda cur: cur.start(spec, now))
            elif promote:
                r = await self._io(self.rollouts.update, lambda cur: cur.promote(now, '{"by": "operator"}'))
            elif abort:
                r = await self._io(self.rollouts.update, lambda cur: cur.abort(now))
            else:
                raise FailedPrecondition("SetRollout needs a spec, promote or abort")
            await self._apply_locked(r)
            return r

    # -- applying what the store says -------------------------------------------------------------------
    async def _apply(self, r: Rollout) -> None:
        assert self._lock is not None
        async with self._lock:
            await self._apply_locked(r)

    async def _snapshot(self, path: str) -> Snapshot:
        snap = self._loaded.get(path)
        if snap is None:
            snap = self._loaded[path] = await self.releases.prepare(path)
        return snap

    async def _apply_locked(self, r: Rollout) -> None:
        if r.version == self.current.version and self.guard is not None:
            return
        prev = self.current
        if r.state == "promoted" and prev.canary and r.primary == prev.canary and self.state.arm("canary") is not None:
            self.releases.install(self.state.arm("canary"))  # the canary's warm snapshot becomes everyone's
        elif r.primary and r.primary != prev.primary and not self._serving(r.primary):
            self.releases.install(await self._snapshot(r.primary))  # another worker promoted or loaded it: load it here too
        canary = await self._snapshot(r.canary) if r.active and r.canary else None
        shadow = await self._snapshot(r.shadow) if r.active and r.shadow else None
        self.state.set_arm("canary", canary)
        if shadow is not self.state.arm("shadow"):
            self.shadow.reset()
        self.state.set_arm("shadow", shadow)
        self.guard = None
        if canary is not None:
            t = r.guard_thresholds
            refs = {"primary": PredictionReference.from_manifest(self.state.current.runtime.release.meta.reference),
                    "canary": PredictionReference.from_manifest(canary.runtime.release.meta.reference)}
            counters = StoreGuardCounters(self.store, f"guard:{r.version}", bucket_ttl_ms=int((t.window_s + 2 * t.bucket_s) * 1000))
            self.guard = CanaryGuard(t, refs, started_ms=r.started_ms, auto_promote=r.auto_promote, counters=counters,
                                     release_ids={"primary": self.state.current.release_id, "canary": canary.release_id})
        if not r.active:
            self._loaded.clear()
        self.current = r
        self.metrics.rollout_version.set(r.version)
        self.metrics.rollout_canary_percent.set(r.canary_percent if canary is not None else 0.0)
        log.info("rollout v%d: %s (canary %s %.1f %%, shadow %s %.1f %%)", r.version, r.state, r.canary or "-", r.canary_percent,
                 r.shadow or "-", r.shadow_percent)

    def _serving(self, ref: str) -> bool:
        """Whether the primary snapshot is the release `ref` names (its id, or its folder)."""
        cur = self.state.current
        if ref == cur.release_id:
            return True
        try:
            return release_path_under(ref, self.cfg.releases_dir) == Path(cur.runtime.release.path).resolve()
        except ServingError:
            return False

    async def serve_primary(self, ref: str, snap: Snapshot) -> Rollout:
        """LoadRelease on this worker: record `ref` as the primary in the shared rollout state,
        then install the prepared `snap` here; every other worker's poll loads it too. Recorded
        first: if the store is down nothing is swapped anywhere (Unavailable), so the fleet never
        serves two primaries because one worker could not tell the others."""
        assert self._lock is not None, "rollouts not started"
        async with self._lock:
            now = self.clock.now_ms()
            try:
                r = await self._io(self.rollouts.update, lambda cur: cur.serve(ref, now))
            except ServingError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store's own errors
                raise Unavailable(f"the release was checked but the shared rollout state could not record it ({exc}); "
                                  "no worker swapped: retry when the store is back") from None
            self.releases.install(snap)
            await self._apply_locked(r)
            return r

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.rollout_poll_s)
            try:
                r = await self._io(self.rollouts.changed_since, self.current.version)
                if r is not None:
                    await self._apply(r)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving what is applied
                log.warning("rollout poll failed: %s", exc)

    async def _guard_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.guard_interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("canary guard check failed: %s", exc)

    async def check(self) -> Decision | None:
        """One guard decision (the loop calls it every guard_interval_s; tests call it directly)."""
        g = self.guard
        if g is None:
            return None
        now = self.clock.now_ms()
        t = time.perf_counter()
        d = await self._io(g.decide, now)
        self.metrics.guard_seconds.observe(time.perf_counter() - t)
        self.last_decision = d
        if d.action == "none" or g is not self.guard:
            return d
        version = self.current.version
        try:
            if d.action == "rollback":
                r = await self._io(self.rollouts.update, lambda cur: _only(cur, version).rollback(now, d.to_json()))
            else:
                r = await self._io(self.rollouts.update, lambda cur: _only(cur, version).promote(now, d.to_json()))
        except FailedPrecondition as exc:
            log.info("canary guard's %s superseded: %s", d.action, exc)
            return d
        self.metrics.rollout_decisions.labels(d.action).inc()
        log.warning("canary %s by the guard: %s %s", d.action, d.reason, d.numbers)
        await self._apply(r)
        return d

    def status(self) -> dict:
        now = self.clock.now_ms()
        out = self.current.to_status()
        out["arms"] = [a.as_arm_stats() for a in self.guard.arm_stats(now)] if self.guard is not None else []
        out["shadow"] = self.shadow.stats.as_map() if self.current.shadow else {}
        return out


def _only(cur: Rollout, version: int) -> Rollout:
    """A guard decision applies to the rollout it watched, not to one an operator set since."""
    if cur.version != version:
        raise FailedPrecondition(f"the rollout moved on (version {version} -> {cur.version})")
    return cur
