"""`Client`: sync a signed bundle, rank on the device, record this session's events."""
from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from mobile_sdk import hybrid, loader
from mobile_sdk.bundle import Manifest, PublicKey, parse_manifest
from mobile_sdk.errors import BundleError, NoBundle, SyncError
from mobile_sdk.features import build_features, history, item_item_scores
from mobile_sdk.loader import DeviceBundle
from mobile_sdk.session import Event, SessionLog, engaged_items, session_features
from mobile_sdk.store import Store
from mobile_sdk.sync import SyncResult, cache_reader, run_sync

log = logging.getLogger(__name__)
_TOKEN = re.compile(r"[0-9a-f]{64}")

SOURCE_USER = "user"  # the user file's candidates
SOURCE_POPULAR = "popular"  # no user file: popular then newest
SOURCE_REQUEST = "request"  # the caller's candidates
SOURCE_SERVER = "server"  # hybrid: the server answered


class Ranking(list):
    """Best first: `(item_id, score)` tuples; `source` says where the candidates came from
    (user, popular, request, or server in hybrid mode); `fallback_reason` says why hybrid
    mode answered from the device (None when it did not fall back)."""

    def __init__(self, items: Iterable[tuple[int, float]] = (), *, source: str, bundle_version: int | None = None,
                 now_ms: int | None = None, fallback_reason: str | None = None, release_id: str | None = None,
                 elapsed_ms: float = 0.0) -> None:
        super().__init__(items)
        self.source = source
        self.bundle_version = bundle_version
        self.now_ms = now_ms
        self.fallback_reason = fallback_reason
        self.release_id = release_id
        self.elapsed_ms = elapsed_ms

    @property
    def item_ids(self) -> list[int]:
        return [i for i, _ in self]

    def __repr__(self) -> str:
        return f"Ranking(source={self.source!r}, fallback_reason={self.fallback_reason!r}, items={list.__repr__(self)})"


MAX_CANDIDATES = 2000  # per rank call (a user file holds 200)
MAX_FUTURE_MS = 5 * 60_000  # features.event_rules.DEFAULT_MAX_FUTURE_MS, the server's bound


def _check_k(k: object) -> int:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


class Client:
    """A device's view of a bundle. `public_key`: PEM bytes or a path to signing.pub.
    `user_token`: the 64-hex token the backend issued for this device's user (None: anonymous).
    A cache from an earlier run is loaded (and re-verified) here, without network."""

    def __init__(self, base_url: str, cache_dir: str | Path, public_key: bytes | str | Path, user_token: str | None = None,
                 *, timeout_s: float = 10.0, transport: hybrid.Transport | None = None, max_session_events: int = 512,
                 max_manifest_bytes: int = 4 << 20, sync_budget_s: float = 120.0) -> None:
        if user_token is not None and (not isinstance(user_token, str) or not _TOKEN.fullmatch(user_token)):
            raise ValueError("user_token must be 64 lowercase hex chars (parity export token)")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not isinstance(sync_budget_s, (int, float)) or not sync_budget_s > 0:
            raise ValueError(f"sync_budget_s must be > 0, got {sync_budget_s!r}")
        self.base_url = base_url
        self.user_token = user_token
        self.timeout_s = float(timeout_s)
        self.transport = transport
        self.max_manifest_bytes = max_manifest_bytes
        self.sync_budget_s = float(sync_budget_s)  # a whole sync, however slowly a server drips bytes
        self._key = PublicKey.load(public_key)
        self._store = Store(cache_dir)
        self._session = SessionLog(max_session_events)
        self._sync_lock = threading.Lock()
        self._bundle: DeviceBundle | None = None
        self._etag: str | None = None
        self._floor: Manifest | None = None
        self.load_error: str | None = None  # why the cached bundle was not usable, if it was not
        self._hybrid_pool = None
        self.rank_seconds_ewma = 0.0  # recent on-device rank time: hybrid mode starts its fallback this long before the deadline
        self._load_cached()

    # --- bundle ------------------------------------------------------------------------------
    def _load_cached(self) -> None:
        state = self._store.read_state()
        if state is None:
            return
        try:
            man = parse_manifest(state.manifest, self._key)
            self._floor = man  # a replay check even when the files below fail to load
            self._bundle = loader.load(man, self.user_token, cache_reader(self._store))
            self._etag = state.etag
        except BundleError as exc:
            self.load_error = f"cached bundle refused: {exc}"
            log.warning("%s", self.load_error)

    @property
    def bundle(self) -> DeviceBundle | None:
        return self._bundle

    @property
    def version(self) -> int | None:
        b = self._bundle
        return None if b is None else b.version

    def sync(self) -> SyncResult:
        """Fetch, verify and swap in the newest bundle; raises SyncError and keeps the current one on any failure."""
        with self._sync_lock:
            try:
                result, bundle, etag = run_sync(self.base_url, self._store, self._key, self.user_token, self._bundle,
                                                self._floor, self._etag, self.timeout_s, self.max_manifest_bytes, self.sync_budget_s)
            except SyncError as exc:
                log.warning("sync failed, keeping version %s: %s", self.version, exc.reason)
                raise
            except OSError as exc:  # the cache directory itself failed
                raise SyncError(f"cache: {type(exc).__name__}: {exc}") from None
            if bundle is not None:
                self._bundle, self._floor = bundle, bundle.manifest
                self._etag = etag
                self.load_error = None
            return result

    # --- session -----------------------------------------------------------------------------
    def record(self, event: Event | Mapping) -> None:
        """Keep one of this session's events: ts (ms), item_id, type, value, and optional topic, creator_id.
        An event stamped more than MAX_FUTURE_MS ahead of this device's clock is refused: the
        session log drops what no window counts any more, measured from its latest event, so one
        event from a wrong clock would otherwise empty the session (the server's event rules
        refuse the same)."""
        e = Event.coerce(event)
        if e.ts > time.time() * 1000 + MAX_FUTURE_MS:
            raise ValueError(f"event ts {e.ts} is more than {MAX_FUTURE_MS // 60_000} min ahead of this device's clock")
        b = self._bundle
        self._session.record(e, None if b is None else b.manifest.model.session)

    def session_events(self) -> list[Event]:
        return self._session.events()

    def engaged_events(self) -> list[Event]:
        """This session's engaging events (plays, likes, ratings), kept past the session window."""
        return self._session.engaged_events()

    def clear_session(self) -> None:
        self._session.clear()

    def session_features(self, item_ids: Iterable[int], now_ms: int) -> dict[str, np.ndarray]:
        """The session columns for these items (all in the item table) as of now_ms."""
        b = self._require_bundle()
        ids = np.asarray(list(item_ids), dtype=np.int64)
        rows = b.items.rows(ids)
        if np.any(rows < 0):
            raise KeyError(f"items not in the item table: {ids[rows < 0].tolist()}")
        return self._session_columns(b, rows, int(now_ms), self._session.events())

    def _session_columns(self, b: DeviceBundle, rows: np.ndarray, now_ms: int, events: list[Event]) -> dict[str, np.ndarray]:
        t = b.items
        ev_rows = t.rows(np.array([e.item_id for e in events], dtype=np.int64))
        ev_topic = np.array([e.topic if e.topic is not None else (t.topic[r] if r >= 0 else -1)
                             for e, r in zip(events, ev_rows)], dtype=np.int64)
        ev_creator = np.array([e.creator_id if e.creator_id is not None else (t.creator_id[r] if r >= 0 else -1)
                               for e, r in zip(events, ev_rows)], dtype=np.int64)
        return session_features(b.manifest.model.session, events, now_ms, t.item_id[rows], t.topic[rows],
                                t.creator_id[rows], ev_topic, ev_creator)

    # --- ranking -----------------------------------------------------------------------------
    def _require_bundle(self) -> DeviceBundle:
        b = self._bundle
        if b is None:
            why = self.load_error or "this device has not synced a bundle yet"
            raise NoBundle(f"no verified bundle on this device: {why}")
        return b

    def rank(self, user_id: int | str | None = None, candidates: Iterable[int] | None = None,
             context: Mapping[str, float] | None = None, k: int = 10) -> Ranking:
        """Rank on the device (BUNDLE_FORMAT.md "Ranking"). The user file is the one of this
        client's `user_token`; `user_id` is what hybrid mode sends the server."""
        t0 = time.perf_counter()
        k = _check_k(k)
        b = self._require_bundle()
        now_ms = int((context or {}).get("now_ms", time.time() * 1000))
        if candidates is not None:
            ids, source = [int(i) for i in candidates], SOURCE_REQUEST
            if len(ids) > MAX_CANDIDATES:  # the session features are (candidates x events): bound them
                raise ValueError(f"candidates: {len(ids)} items, at most {MAX_CANDIDATES} per rank call")
        elif b.user is not None:
            ids, source = b.user.candidates.tolist(), SOURCE_USER
        else:
            ids, source = list(b.lists.popular) + list(b.lists.newest), SOURCE_POPULAR
        events = self._session.events()
        engaged = self._session.engaged_events()
        removed = engaged_items(engaged) | (set(b.user.recent.tolist()) if b.user is not None else set())
        ids = [i for i in dict.fromkeys(ids) if i not in removed]
        ids_arr = np.asarray(ids, dtype=np.int64)
        rows = b.items.rows(ids_arr)
        ids_arr, rows = ids_arr[rows >= 0], rows[rows >= 0]
        if len(ids_arr) == 0:
            return Ranking([], source=source, bundle_version=b.version, now_ms=now_ms,
                           elapsed_ms=(time.perf_counter() - t0) * 1e3)
        session = self._session_columns(b, rows, now_ms, events) if b.manifest.model.session.features else {}
        user_emb = b.user.embedding if b.user is not None else None
        ii = None
        spec = b.manifest.model.item_item
        if spec is not None and any(c.kind == "item_item" for c in b.plan):
            hist = history(b.user.recent if b.user is not None else None, engaged, spec, now_ms)
            ii = item_item_scores(b.items, hist, rows)
        x = build_features(b.plan, b.items, rows, user_emb, now_ms, session, ii)
        scores = b.ranker.score(x)
        order = np.lexsort((ids_arr, -np.where(np.isnan(scores), -np.inf, scores)))[:k]
        elapsed = time.perf_counter() - t0
        self.rank_seconds_ewma = 0.8 * self.rank_seconds_ewma + 0.2 * elapsed if self.rank_seconds_ewma else elapsed
        return Ranking([(int(ids_arr[i]), float(scores[i])) for i in order], source=source, bundle_version=b.version,
                       now_ms=now_ms, elapsed_ms=elapsed * 1e3)

    # --- hybrid ------------------------------------------------------------------------------
    def recommend(self, user_id: int | str, k: int = 10, deadline_s: float = 0.040,
                  context: Mapping[str, float] | None = None) -> Ranking:
        """Ask the server within `deadline_s`; answer from the device when it is slow, down,
        errs or says degraded (see mobile_sdk.hybrid)."""
        return hybrid.recommend(self, user_id, _check_k(k), deadline_s, context)

    def close(self) -> None:
        pool, self._hybrid_pool = self._hybrid_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if self.transport is not None and hasattr(self.transport, "close"):
            self.transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
