"""Start-up: everything the server needs before it accepts a request, built synchronously.

Order: the data dir (feature definitions and catalogue) → the online store (filled from the
event log when it is the in-process store, or when a Redis store has never been materialised
for the served feature sets) → the clock → the release (verified, skew-checked) → the item
table → the first snapshot, warmed. A broken or skewed release stops start-up with the
reason; a store that is down does not (the server starts degraded and recovers with it).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from features.datasets import EVENTS_DIR, INFO_FILE, load_info
from features.eventlog import EventLog
from features.materialize import materialize, stored_watermark, switch_mode
from features.modes import parse_overrides
from features.online import open_store
from features.online.base import OnlineStore, StoreUnavailable
from features.online.memory import MemoryStore
from features.repo import feature_sets
from server.clock import choose_clock
from server.config import ServerConfig
from server.items import INGEST_NAME, catalog_stamp, load_catalog, load_item_table
from server.metrics import Metrics
from server.seen import bootstrap_seen
from server.service import RecommenderService, warm
from server.refill import refill_in_child
from server.store_watch import ensure_epoch
from server.observe import RequestObserver
from server.served_log import FeedbackLogWriter, ServedLogWriter
from server.state import ServingState, build_snapshot, load_runtime

__all__ = ["build_service", "resolve_data_dir"]

log = logging.getLogger(__name__)

_PATIENT_TIMEOUT_S = 30.0  # bulk writes at start-up move megabytes per commit


def resolve_data_dir(path: str | Path) -> Path:
    """The data dir (holding dataset.json) from itself or its events/ folder, with a clear error."""
    p = Path(path)
    if (p / INFO_FILE).is_file():
        return p
    if p.name == EVENTS_DIR and (p.parent / INFO_FILE).is_file():
        return p.parent
    raise FileNotFoundError(f"--events {p}: not a Parity data dir (no {INFO_FILE}); the server reads the feature "
                            "definitions and the item catalogue (items.parquet) from it")


def _open(cfg: ServerConfig, timeout_s: float) -> OnlineStore:
    opts = {"socket_timeout_s": timeout_s} if cfg.store.startswith(("redis://", "rediss://")) else {}
    return open_store(cfg.store, namespace=cfg.namespace, **opts)


def _bootstrap_store(cfg: ServerConfig, store: OnlineStore, sets, kind: str, log_dir: Path, *, force: bool = False) -> str | None:
    """Materialise features and seen items from the log when needed (always with `force`: a
    refill of a store found empty); returns the store's epoch (server/store_watch.py), None
    when nothing was filled."""
    elog = EventLog(log_dir)
    if cfg.materialize == "never" or not elog.exists():
        return None
    is_memory = isinstance(store, MemoryStore)
    patient = store if is_memory else _open(cfg, _PATIENT_TIMEOUT_S)
    try:
        if cfg.modes:  # saved to the store, where every worker and ingestor reads them (features/modes.py)
            by_name = {fs.name: fs for fs in sets}
            for name, mode in parse_overrides(cfg.modes, by_name).items():
                log.info("serving mode of %s: %s", name, switch_mode(elog, patient, by_name[name], mode))
        mx = elog.max_ts()
        until = (mx + 1) if mx is not None else 0
        need = force or cfg.materialize == "always" or is_memory or any(stored_watermark(patient, fs) is None for fs in sets)
        if need:
            for r in materialize(elog, patient, sets, until_ts=until, mark_window_ms=cfg.allowed_lateness_ms):
                log.info("materialised %s %s: %s, %d entities", r.feature_set, r.version, r.mode, r.entities_written)
        bootstrap_seen(patient, lambda: elog.read(end_ts=until), kind, until, cfg.seen_cap)
        return ensure_epoch(patient)
    finally:
        if patient is not store:
            patient.close()


def build_service(cfg: ServerConfig, metrics: Metrics | None = None) -> RecommenderService:
    data_dir = resolve_data_dir(cfg.data_dir)
    cfg = cfg.with_(data_dir=data_dir)
    info = load_info(data_dir)
    sets = feature_sets(info.kind, info.n_topics)
    by_name = {fs.name: fs for fs in sets}
    # The release first: a broken or skewed one must stop start-up before any slow work.
    runtime = load_runtime(cfg.release, by_name, ort_threads=cfg.ort_threads, ranker=cfg.ranker, seen_cap=cfg.seen_cap)
    store = _open(cfg, cfg.store_timeout_s)
    write_store = store if isinstance(store, MemoryStore) else _open(cfg, 2.0)
    store_ok = True
    epoch = None
    try:
        epoch = _bootstrap_store(cfg, store, sets, info.kind, data_dir / EVENTS_DIR)
    except StoreUnavailable as exc:
        store_ok = False
        log.warning("online store unavailable at start-up (serving degraded until it is back): %s", exc)
    watermark = -1
    if store_ok:
        try:
            raw = store.get_meta(f"stream:{INGEST_NAME}")
            watermark = int(json.loads(raw).get("watermark", -1)) if raw else -1
        except StoreUnavailable:
            store_ok = False
    clock = choose_clock(cfg.clock, max(info.end_ts, watermark + 1))
    if clock.mode == "data":
        log.warning("clock: replaying a past event log, now starts at %d (the log's end), not the wall clock", clock.now_ms())
    catalog = load_catalog(data_dir)
    item_set = by_name[runtime.inputs.item_set]
    try:
        items = load_item_table(store if store_ok else None, item_set, catalog, frame_cache=cfg.item_frame_cache, sets=sets)
    except StoreUnavailable as exc:
        log.warning("item features unavailable at start-up: %s", exc)
        items = load_item_table(None, item_set, catalog, frame_cache=cfg.item_frame_cache)
    snap = build_snapshot(runtime, items, by_name, catalog_stamp(data_dir), prefetch_limit=cfg.pair_prefetch_limit)
    warm(snap, cfg, clock.now_ms())
    log.info("serving release %s: %d items (%d new), store %s", snap.release_id, snap.n_items, len(snap.new_ids), cfg.store.split("@")[-1])
    # A refill runs in a child process (server/refill.py): in this one it would compete with requests for the interpreter lock.
    refill = None if isinstance(store, MemoryStore) or cfg.materialize == "never" else (
        lambda: refill_in_child(data_dir, cfg.store, cfg.namespace, cfg.allowed_lateness_ms, cfg.seen_cap))
    metrics = metrics or Metrics()
    service = RecommenderService(cfg, info=info, sets=sets, store=store, write_store=write_store, clock=clock,
                                 state=ServingState(snap), metrics=metrics, epoch=epoch, refill=refill, observer=_observer(cfg, metrics))
    if service.observer.feedback is not None:
        service.live.on_feedback = service.observer.feedback.on_feedback
    return service


def _observer(cfg: ServerConfig, metrics: Metrics) -> RequestObserver:
    """The served log (and its feedback log) when asked for; written by threads off the request path."""
    if cfg.served_log is None:
        return RequestObserver()
    written, dropped = metrics.served_log.labels("written"), metrics.served_log.labels("dropped")
    writer = ServedLogWriter(cfg.served_log, rotate_s=cfg.log_rotate_s, rotate_bytes=int(cfg.log_rotate_mb * (1 << 20)),
                             on_drop=dropped.inc, on_written=written.inc)
    feedback = FeedbackLogWriter(cfg.served_log)
    log.info("served log: %s (%.0f %% of OK answers, every error and degraded answer)", cfg.served_log, cfg.log_sample * 100)
    return RequestObserver(served_log=writer, log_sample=cfg.log_sample, feedback=feedback)
