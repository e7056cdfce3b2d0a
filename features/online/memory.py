"""In-process online store: the reference backend for tests, notebooks and single-process runs.

It honours the same contract as the Redis backend (same validation, same TTL semantics,
same error types) so the shared contract suite can run against both and a bug found with
one backend is a bug in the contract, not in a test double.
"""
from __future__ import annotations

import functools
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from features.online.base import KeyGroup, OnlineStore, RecordKey, Snapshot, Write, _check_part, seen_pairs_of

__all__ = ["MemoryStore"]

# Feature-set names the backends use for their own bookkeeping keys. Rejecting them for
# records keeps `{ns}:__meta__:a:b:c` (meta "a:b:c") from ever being read back as a record.
RESERVED_FEATURE_SETS = frozenset({"__meta__", "__dedupe__", "__count__"})


def check_feature_set(feature_set: str) -> None:
    """Validate a feature-set name, including the names reserved for store bookkeeping."""
    _check_part("feature_set", feature_set)
    if feature_set in RESERVED_FEATURE_SETS:
        raise ValueError(f"feature_set {feature_set!r} is reserved for the store's own keys")


@functools.lru_cache(maxsize=4096)
def _check_key_prefix(feature_set: str, version: str, entity_type: str) -> None:
    # A handful of distinct prefixes recur on every request: check each once.
    check_feature_set(feature_set)
    _check_part("version", version)
    _check_part("entity_type", entity_type)


def check_record_key(key: RecordKey) -> None:
    """base.validate_key plus the reserved-name rule; shared by both backends so they agree."""
    _check_key_prefix(key.feature_set, key.version, key.entity_type)
    _check_part("entity_id", key.entity_id)


_BAD_ID = re.compile(r"[\s:{}]")  # what an entity id may not hold (base._PART's complement)


def check_group(g: KeyGroup) -> None:
    """check_record_key for a whole KeyGroup: the prefix once, the ids in one regex pass."""
    _check_key_prefix(g.feature_set, g.version, g.entity_type)
    try:
        joined = "\x00".join(g.entity_ids)
    except TypeError:
        raise ValueError(f"entity ids of {g.feature_set} must be strings") from None
    if g.entity_ids and ("" in g.entity_ids or _BAD_ID.search(joined)):
        bad = next(i for i in g.entity_ids if not i or _BAD_ID.search(i))
        raise ValueError(f"entity_id {bad!r} must be a non-empty string without ':', braces or whitespace")


def check_namespace(namespace: str) -> None:
    """A namespace is the first key part, so it obeys the same rules as the others."""
    _check_part("namespace", namespace)


def check_meta_name(name: str) -> None:
    """Meta names end a key; ':' is allowed, but not emptiness, braces or whitespace."""
    if not isinstance(name, str) or not name or "{" in name or "}" in name or any(c.isspace() for c in name):
        raise ValueError(f"meta name {name!r} must be a non-empty string without braces or spaces")


def check_writes(writes: Sequence[Write], dedupe_ids: Sequence[int], dedupe_ttl_ms: int,
                 meta: Mapping[str, str] | None = None) -> dict[str, str]:
    """Reject a whole commit before any of it is applied (validation is part of atomicity).

    Returns the metadata as a plain dict."""
    meta_items = dict(meta or {})
    for name, value in meta_items.items():
        check_meta_name(name)
        if not isinstance(value, str):
            raise TypeError(f"meta value for {name!r} must be str, got {type(value).__name__}")
    for w in writes:
        check_record_key(w.key)
        if not isinstance(w.value, bytes):
            raise TypeError(f"value for {w.key} must be bytes, got {type(w.value).__name__}")
        if not isinstance(w.ttl_ms, int) or isinstance(w.ttl_ms, bool) or w.ttl_ms <= 0:
            raise ValueError(f"ttl_ms for {w.key} must be a positive int, got {w.ttl_ms!r}")
    if dedupe_ids and (not isinstance(dedupe_ttl_ms, int) or dedupe_ttl_ms <= 0):
        # A marker without expiry would grow the store forever; one with expiry 0 would be
        # gone at once and silently allow double application.
        raise ValueError(f"dedupe_ttl_ms must be a positive int when dedupe_ids are given, got {dedupe_ttl_ms!r}")
    for event_id in dedupe_ids:
        if not isinstance(event_id, int) or isinstance(event_id, bool):
            raise TypeError(f"dedupe ids must be ints, got {event_id!r}")
    return meta_items


def check_counters(names: Sequence[str], amounts: Sequence[int], ttl_ms: int) -> None:
    """incr_many's arguments, checked whole before any counter moves (shared by both backends)."""
    if len(names) != len(amounts):
        raise ValueError(f"incr_many needs one amount per name, got {len(names)} names and {len(amounts)} amounts")
    if not isinstance(ttl_ms, int) or isinstance(ttl_ms, bool):
        raise TypeError(f"ttl_ms must be an int, got {ttl_ms!r}")
    if ttl_ms <= 0:
        raise ValueError(f"ttl_ms must be positive (a counter without expiry would grow the store forever), got {ttl_ms}")
    for name in names:
        check_meta_name(name)
    for amount in amounts:
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"counter amounts must be ints, got {amount!r}")
        if amount < 0:
            raise ValueError(f"counter amounts must be >= 0, got {amount}")


def check_filter(
    feature_set: str, version: str | None, entity_type: str | None, entity_prefix: str | None
) -> None:
    """Validate delete_matching filters with the key-part rules (a prefix obeys them too)."""
    check_feature_set(feature_set)
    if version is not None:
        _check_part("version", version)
    if entity_type is not None:
        _check_part("entity_type", entity_type)
    if entity_prefix is not None:
        _check_part("entity_prefix", entity_prefix)


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires_at: float  # seconds, on the store's clock


class MemoryStore(OnlineStore):
    """Dict-backed store guarded by one lock.

    Expiry is checked on every read against an injectable wall clock (seconds), so tests can
    advance time instead of sleeping; expired entries are dropped lazily when touched (and
    by iter_keys / delete_matching scans), which keeps every operation O(keys touched).
    """

    def __init__(self, namespace: str = "parity", *, clock: Callable[[], float] = time.time) -> None:
        check_namespace(namespace)
        self.namespace = namespace
        self.clock = clock
        self._lock = threading.Lock()
        self._records: dict[RecordKey, _Entry] = {}
        self._markers: dict[int, float] = {}  # event id -> expires_at
        self._meta: dict[str, str] = {}
        self._counters: dict[str, list] = {}  # name -> [value, expires_at]

    # -- helpers (call with the lock held) -------------------------------------------------

    def _live(self, key: RecordKey, now: float) -> _Entry | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del self._records[key]
            return None
        return entry

    def _marker_live(self, event_id: int, now: float) -> bool:
        expires_at = self._markers.get(event_id)
        if expires_at is None:
            return False
        if expires_at <= now:
            del self._markers[event_id]
            return False
        return True

    # -- contract ----------------------------------------------------------------------------

    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        for key in keys:
            check_record_key(key)
        return self._values(keys)

    def get_groups(self, groups: Sequence[KeyGroup]) -> list[bytes | None]:
        for g in groups:
            check_group(g)
        # plain tuples: equal to the RecordKey (a named tuple) they spell and hashed the same, so
        # they find its entry without building one per entity
        return self._values([(g.feature_set, g.version, g.entity_type, i) for g in groups for i in g.entity_ids])

    def _values(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        with self._lock:
            now = self.clock()
            out: list[bytes | None] = []
            for key in keys:
                entry = self._live(key, now)
                out.append(None if entry is None else entry.value)
            return out

    def commit(
        self,
        writes: Sequence[Write],
        *,
        dedupe_ids: Sequence[int] = (),
        dedupe_ttl_ms: int = 0,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Validate everything first, then apply all of it under the lock (all or nothing)."""
        meta_items = check_writes(writes, dedupe_ids, dedupe_ttl_ms, meta)
        with self._lock:
            now = self.clock()
            for w in writes:
                self._records[w.key] = _Entry(w.value, now + w.ttl_ms / 1000.0)
            for event_id in dedupe_ids:
                self._markers[event_id] = now + dedupe_ttl_ms / 1000.0
            self._meta.update(meta_items)

    def transact(self, keys, event_ids, meta_names, fn, *, touches=None):
        """Read, decide and write under the store's lock: trivially isolated in one process."""
        for key in keys:
            check_record_key(key)
        with self._lock:
            now = self.clock()
            seen = [self._marker_live(i, now) for i in event_ids]
            snap = Snapshot(
                [None if (e := self._live(k, now)) is None else e.value for k in keys],
                seen,
                {n: self._meta.get(n) for n in meta_names},
                seen_pairs_of(seen, touches),
            )
            c = fn(snap)
            meta_items = check_writes(c.writes, c.dedupe_ids, c.dedupe_ttl_ms, c.meta)
            for w in c.writes:
                self._records[w.key] = _Entry(w.value, now + w.ttl_ms / 1000.0)
            for event_id in c.dedupe_ids:
                self._markers[event_id] = now + c.dedupe_ttl_ms / 1000.0
            self._meta.update(meta_items)
            return c

    def clear_namespace(self) -> int:
        with self._lock:
            now = self.clock()
            live_counters = sum(1 for _, expires_at in self._counters.values() if expires_at > now)
            n = len(self._records) + len(self._markers) + len(self._meta) + live_counters
            self._records.clear()
            self._markers.clear()
            self._meta.clear()
            self._counters.clear()
            return n

    def incr_many(self, names: Sequence[str], amounts: Sequence[int], ttl_ms: int) -> list[int]:
        check_counters(names, amounts, ttl_ms)
        with self._lock:
            now = self.clock()
            out = []
            for name, amount in zip(names, amounts):
                c = self._counters.get(name)
                if c is None or c[1] <= now:
                    c = self._counters[name] = [0, now + ttl_ms / 1000.0]
                c[0] += amount
                out.append(c[0])
            return out

    def delete_counters(self, match: Callable[[str], bool]) -> int:
        with self._lock:
            gone = [n for n in self._counters if match(n)]
            for n in gone:
                del self._counters[n]
            return len(gone)

    def seen(self, event_ids: Sequence[int]) -> list[bool]:
        with self._lock:
            now = self.clock()
            return [self._marker_live(event_id, now) for event_id in event_ids]

    def get_meta(self, name: str) -> str | None:
        check_meta_name(name)
        with self._lock:
            return self._meta.get(name)

    def set_meta(self, name: str, value: str) -> None:
        check_meta_name(name)
        if not isinstance(value, str):
            raise TypeError(f"meta value for {name!r} must be str, got {type(value).__name__}")
        with self._lock:
            self._meta[name] = value

    def delete(self, keys: Sequence[RecordKey]) -> int:
        for key in keys:
            check_record_key(key)
        with self._lock:
            now = self.clock()
            deleted = 0
            for key in set(keys):  # a key listed twice existed once, as UNLINK counts it
                if self._live(key, now) is not None:
                    del self._records[key]
                    deleted += 1
            return deleted

    def delete_matching(
        self, feature_set: str, version: str | None = None, entity_type: str | None = None, entity_prefix: str | None = None
    ) -> int:
        check_filter(feature_set, version, entity_type, entity_prefix)
        with self._lock:
            now = self.clock()
            doomed = [
                key
                for key in self._records
                if key.feature_set == feature_set
                and (version is None or key.version == version)
                and (entity_type is None or key.entity_type == entity_type)
                and (entity_prefix is None or key.entity_id.startswith(entity_prefix))
            ]
            deleted = 0
            for key in doomed:
                if self._live(key, now) is not None:  # expired ones are dropped, not counted
                    del self._records[key]
                    deleted += 1
            return deleted

    def iter_keys(self, feature_set: str | None = None) -> Iterable[RecordKey]:
        """A snapshot taken under the lock, so callers may mutate the store while iterating."""
        if feature_set is not None:
            check_feature_set(feature_set)
        with self._lock:
            now = self.clock()
            keys = [
                key
                for key, entry in self._records.items()
                if entry.expires_at > now and (feature_set is None or key.feature_set == feature_set)
            ]
        return iter(keys)

    def close(self) -> None:
        """Nothing to release; data stays readable so a closed store behaves predictably."""
