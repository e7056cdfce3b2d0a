"""Releases and the item table: load, check, warm and swap; keep the item table current.

A release becomes a `Snapshot` here (loaded, skew-checked, warmed) before anything serves from
it; the swap is one assignment in `ServingState`, so requests in flight finish on the release
they started with. Rollouts (server/rollout.py) load their canary and shadow releases through
the same `prepare`, so an arm never serves a release the primary path would have refused.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Awaitable, Callable, Mapping

import numpy as np

from features.definitions import FeatureSet
from features.online.base import OnlineStore
from server import heap, pipeline
from server.background import spawn, stop
from server.clock import Clock
from server.config import ServerConfig
from server.errors import FailedPrecondition, ServingError
from server.items import catalog_stamp, change_token, load_catalog, load_item_table
from server.metrics import Metrics
from server.pipeline import Timer
from server.state import ServingState, Snapshot, build_snapshot, load_runtime, release_path_under, release_ref

__all__ = ["ReleaseManager", "warm"]

log = logging.getLogger(__name__)


def warm(snap: Snapshot, cfg: ServerConfig, now_ms: int) -> None:
    """Run the whole pipeline once (ONNX Runtime and ScaNN allocate on first use)."""
    uf = snap.plan.decode(0, None, now_ms, source="default")
    pipeline.recommend(snap, uf, np.empty(0, dtype=np.int64), 10, now_ms, cfg, Timer())


class ReleaseManager:
    def __init__(self, cfg: ServerConfig, state: ServingState, sets_by_name: Mapping[str, FeatureSet], store: OnlineStore, clock: Clock,
                 metrics: Metrics, *, run_io: Callable[..., Awaitable], run_cpu: Callable[..., Awaitable]) -> None:
        self.cfg = cfg
        self.state = state
        self.sets_by_name = sets_by_name
        self._sets = tuple(sets_by_name.values())  # every set the server reads: their serving modes ride with the item table
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self._io = run_io
        self._cpu = run_cpu
        self._lock: asyncio.Lock | None = None
        self.dirty: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._lock = asyncio.Lock()
        self.dirty = asyncio.Event()
        self._task = spawn(self._refresh_loop(), "parity-item-refresh")

    async def close(self) -> None:
        await stop(self._task)
        self._task = None

    def mark_dirty(self) -> None:
        if self.dirty is not None:
            self.dirty.set()

    async def prepare(self, path: str) -> Snapshot:
        """A servable snapshot of the release at `path` (under the releases root), warmed; or
        FailedPrecondition / InvalidArgument / PermissionDenied saying why not."""
        cur = self.state.current
        try:
            target = release_path_under(path, self.cfg.releases_dir)
            runtime = await self._io(load_runtime, target, self.sets_by_name, ort_threads=self.cfg.ort_threads, ranker=self.cfg.ranker,
                                     seen_cap=self.cfg.seen_cap)
            snap = await self._cpu(build_snapshot, runtime, cur.items, self.sets_by_name, cur.catalog_stamp,
                                   prefetch_limit=self.cfg.pair_prefetch_limit)
            await self._cpu(warm, snap, self.cfg, self.clock.now_ms())
        except ServingError:
            self.metrics.release_loads.labels("refused").inc()
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a malformed release breaks, it is refused, never INTERNAL
            self.metrics.release_loads.labels("refused").inc()
            log.warning("release %s refused", path, exc_info=True)
            raise FailedPrecondition(f"release refused: {type(exc).__name__}: {str(exc)[:200]}") from None
        return snap

    async def load_release(self, path: str, install: Callable[[str, Snapshot], Awaitable[object]] | None = None) -> tuple[str, str, float]:
        """Load, check, warm, then swap the primary. Returns (new id, previous id, ms).
        `install(ref, snap)`, when given, does the swap (the rollout manager: it records `ref`,
        the folder relative to the releases root, in the shared state first)."""
        assert self._lock is not None, "service not started"
        async with self._lock:
            t = time.perf_counter()
            old = self.state.current
            snap = await self.prepare(path)
            if install is None:
                self.install(snap)
            else:
                await install(release_ref(path, self.cfg.releases_dir), snap)
            ms = (time.perf_counter() - t) * 1000
            log.info("release %s loaded in %.0f ms (was %s)", snap.release_id, ms, old.release_id)
            return snap.release_id, old.release_id, ms

    def install(self, snap: Snapshot) -> None:
        """Make a prepared snapshot the primary."""
        self.state.swap(snap)
        heap.settle(collect=False)  # the new release is long-lived too (no full collection: requests are in flight)
        self.metrics.set_release(snap.release_id)
        self.metrics.release_loads.labels("loaded").inc()

    async def refresh_items(self, *, force: bool = False) -> bool:
        """Re-read the catalogue or the item states when they changed; True if anything was swapped.
        Every arm (primary, canary, shadow) gets the new table."""
        snap = self.state.current
        item_set = snap.items.layout.feature_set
        stamp = await self._io(catalog_stamp, self.cfg.data_dir)
        if stamp != snap.catalog_stamp:
            catalog = await self._io(load_catalog, self.cfg.data_dir)
            items = await self._io(load_item_table, self.store, item_set, catalog, frame_cache=self.cfg.item_frame_cache, sets=self._sets)
            rebuilt = {}
            for arm, s in self.state.arms().items():
                if s.items.layout.feature_set != item_set:
                    continue  # an arm ranking with another item set keeps its own table
                rebuilt[arm] = await self._cpu(build_snapshot, s.runtime, items, self.sets_by_name, stamp,
                                               prefetch_limit=self.cfg.pair_prefetch_limit)
            if not self.state.replace_all(snap.runtime, rebuilt):
                return False  # a release swap won the race; the next round rebuilds on it
            log.info("catalogue reloaded: %d items (%d new to the release)", len(catalog), len(rebuilt["primary"].new.ids))
            return True
        token = await self._io(change_token, self.store, item_set, self._sets)
        if not force and token == snap.items.token:
            return False
        items = await self._io(load_item_table, self.store, item_set, snap.items.catalog, frame_cache=self.cfg.item_frame_cache,
                               sets=self._sets, previous=snap.items)
        cur = self.state.current
        if cur.items.catalog is not items.catalog:
            return False
        if items.modes != cur.items.modes:  # a set's serving mode changed: every arm's key plan is rebuilt
            log.info("serving modes changed: %s", items.modes.to_json())
            rebuilt = {arm: await self._cpu(build_snapshot, s.runtime, items, self.sets_by_name, s.catalog_stamp,
                                            prefetch_limit=self.cfg.pair_prefetch_limit)
                       for arm, s in self.state.arms().items() if s.items.layout.feature_set == item_set}
            return self.state.replace_all(cur.runtime, rebuilt)
        return self.state.replace_all(cur.runtime, {arm: replace(s, items=items) for arm, s in self.state.arms().items()
                                                    if s.items.layout.feature_set == item_set})

    async def _refresh_loop(self) -> None:
        assert self.dirty is not None
        while True:
            try:
                await asyncio.wait_for(self.dirty.wait(), timeout=self.cfg.item_refresh_s)
                await asyncio.sleep(0.05)  # let a burst of ingests land before re-reading
            except TimeoutError:
                pass
            force = self.dirty.is_set()
            self.dirty.clear()
            try:
                if await self.refresh_items(force=force):
                    self.metrics.item_refresh.labels("swapped").inc()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving the old table
                self.metrics.item_refresh.labels("failed").inc()
                log.warning("item table refresh failed (serving the previous one): %s", exc)
