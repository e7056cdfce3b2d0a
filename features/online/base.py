"""The online-store contract every backend honours (memory, redis).

A backend stores opaque bytes: packing and unpacking feature state is a pure function in
features.codec, tested without a server. Keys follow
`{namespace}:{feature_set}:{version}:{entity_type}:{entity_id}` (on Redis Cluster with the
entity id as a hash tag, so one entity's records share a slot and commit together:
features/online/redis_cluster.py).

Expiry: every record is written with a TTL (the store reclaims space); readers also check
the record's own feature timestamp against the feature set's TTL, so an expired value
reads as missing even if the backend has not evicted it yet.
"""
from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

__all__ = ["RecordKey", "KeyGroup", "Write", "OnlineStore", "StoreUnavailable", "format_key", "Commit", "Snapshot", "TransactionConflict", "Touches", "seen_pairs_of"]


class StoreUnavailable(RuntimeError):
    """The backend could not be reached or did not answer in time."""


class TransactionConflict(RuntimeError):
    """Other writers kept changing the keys a transaction read; it gave up after retrying."""


class RecordKey(NamedTuple):
    """One record's address. A named tuple, not a frozen dataclass: the memory store builds and
    hashes one per entity a request reads (hundreds of pair records), and a tuple is built and
    hashed about 4x faster (measured: 300 keys built and looked up, 1.69 ms vs 0.43 ms)."""

    feature_set: str
    version: str
    entity_type: str
    entity_id: str


@dataclass(frozen=True, slots=True)
class KeyGroup:
    """Records of one feature set version and entity type, by entity id: the request path's
    shape of a read, which a backend can turn into keys without a RecordKey per entity."""

    feature_set: str
    version: str
    entity_type: str
    entity_ids: Sequence[str]

    def keys(self) -> list[RecordKey]:
        return [RecordKey(self.feature_set, self.version, self.entity_type, i) for i in self.entity_ids]


@dataclass(frozen=True, slots=True)
class Write:
    key: RecordKey
    value: bytes
    ttl_ms: int


@dataclass(frozen=True)
class Snapshot:
    """What a transaction read: record values, whether event ids are marked, metadata.

    `seen[i]`: event i's whole commit is done (every record it changes is written).
    `seen_pairs[j]`, one per (event, key) pair the transaction named in `touches`: the event
    is already applied to that key. One store commits atomically, so there it is just the
    event's `seen`; a store that commits group by group (Redis Cluster) can hold an event
    applied to some groups and not yet to others after a crash, and a redelivery must then
    apply it exactly where it is missing."""

    values: list  # bytes | None per key
    seen: list  # bool per event id
    meta: dict  # name -> str | None
    seen_pairs: Sequence[bool] = ()  # bool per touches pair


Touches = tuple[Sequence[int], Sequence[int]]


def seen_pairs_of(seen: Sequence[bool], touches: Touches | None) -> list[bool]:
    """seen_pairs for a store whose commit is one atomic unit: each pair's event's `seen`."""
    if touches is None:
        return []
    return [bool(seen[e]) for e in touches[0]]


@dataclass(frozen=True)
class Commit:
    """What a transaction writes if nothing it read changed meanwhile."""

    writes: Sequence[Write] = ()
    dedupe_ids: Sequence[int] = ()
    dedupe_ttl_ms: int = 0
    meta: Mapping[str, str] | None = None


def format_key(namespace: str, key: RecordKey) -> str:
    return f"{namespace}:{key.feature_set}:{key.version}:{key.entity_type}:{key.entity_id}"


_PART = re.compile(r"[^\s:{}]+")  # compiled once: this runs for every key on the request path


def _check_part(name: str, value: str) -> None:
    if not isinstance(value, str) or _PART.fullmatch(value) is None:
        raise ValueError(f"{name} {value!r} must be non-empty without ':', braces or spaces")


def validate_key(key: RecordKey) -> None:
    _check_part("feature_set", key.feature_set)
    _check_part("version", key.version)
    _check_part("entity_type", key.entity_type)
    _check_part("entity_id", key.entity_id)


class OnlineStore(abc.ABC):
    """One small interface; every method is one network round trip at most (per node)."""

    namespace: str

    @abc.abstractmethod
    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        """Values in key order; None where absent or expired. One round trip."""

    def get_groups(self, groups: Sequence[KeyGroup]) -> list[bytes | None]:
        """`get_many` of every group's keys, concatenated, in one round trip."""
        return self.get_many([k for g in groups for k in g.keys()])

    @abc.abstractmethod
    def commit(
        self,
        writes: Sequence[Write],
        *,
        dedupe_ids: Sequence[int] = (),
        dedupe_ttl_ms: int = 0,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Atomically write records, mark event ids as applied and update metadata.

        Atomic means a reader or a restarted consumer sees all of it or none of it: this is
        what turns at-least-once delivery into an exactly-once effect.
        """

    @abc.abstractmethod
    def seen(self, event_ids: Sequence[int]) -> list[bool]:
        """Whether each event id was marked applied by an earlier commit. One round trip."""

    @abc.abstractmethod
    def get_meta(self, name: str) -> str | None:
        """Small metadata values (watermarks, materialisation state)."""

    @abc.abstractmethod
    def set_meta(self, name: str, value: str) -> None: ...

    @abc.abstractmethod
    def incr_many(self, names: Sequence[str], amounts: Sequence[int], ttl_ms: int) -> list[int]:
        """Add amounts[i] to counter names[i], atomically per counter; the new values in order.

        One round trip (per node on a cluster; single-key commands only). A counter that
        does not exist or has expired starts at 0 and expires ttl_ms after the call that
        created it; later increments keep that expiry (fixed windows: put the window in the
        name). A name listed twice is incremented twice, the second value including the
        first. Names obey the metadata-name rules and live in their own part of the
        namespace (`{ns}:__count__:{name}` on Redis), which clear_namespace empties too.
        Amounts are ints >= 0. Everything is validated before anything is incremented.
        Used for small shared tallies, e.g. per-user rate limits at the ingest edge
        (features.contribution).
        """

    @abc.abstractmethod
    def delete_counters(self, match: Callable[[str], bool]) -> int:
        """Delete the counters (incr_many) whose name `match` accepts; returns how many.
        Scans every counter: for erasure (a user's rate-limit tallies carry their id), not for
        the request path."""

    @abc.abstractmethod
    def delete(self, keys: Sequence[RecordKey]) -> int:
        """Delete records; returns how many existed."""

    @abc.abstractmethod
    def delete_matching(
        self, feature_set: str, version: str | None = None, entity_type: str | None = None, entity_prefix: str | None = None
    ) -> int:
        """Delete every record of a feature set (optionally one version, one entity id prefix).

        Used to retire a feature set and to erase a user from pair entities ("42|*").
        """

    @abc.abstractmethod
    def iter_keys(self, feature_set: str | None = None) -> Iterable[RecordKey]:
        """All live record keys (optionally of one feature set); for audits and tests."""

    @abc.abstractmethod
    def clear_namespace(self) -> int:
        """Delete everything under this store's namespace (records, markers, metadata).

        For scratch namespaces (`parity features verify`); returns how many keys went."""

    def transact(
        self,
        keys: Sequence[RecordKey],
        event_ids: Sequence[int],
        meta_names: Sequence[str],
        fn: Callable[[Snapshot], Commit],
        *,
        touches: Touches | None = None,
    ) -> Commit:
        """Read keys, markers and metadata, let `fn` decide, commit only if nothing changed.

        This is what makes several writers (server replicas ingesting live events) safe on
        one store: a read-modify-write whose inputs changed meanwhile is retried, so no
        update is lost and no event is applied twice. `fn` may run more than once and must
        not call the store. This default is NOT isolated (one writer only); backends override.

        `touches` = (event positions, key positions): event_ids[touches[0][j]] may change
        keys[touches[1][j]]. It tells a store that commits group by group where each event's
        dedupe markers belong, and gives `fn` `Snapshot.seen_pairs`. Without it a store that
        commits group by group marks events only as a whole (commit markers).
        """
        seen = self.seen(event_ids)
        snap = Snapshot(self.get_many(keys), seen, {n: self.get_meta(n) for n in meta_names}, seen_pairs_of(seen, touches))
        c = fn(snap)
        self.commit(c.writes, dedupe_ids=c.dedupe_ids, dedupe_ttl_ms=c.dedupe_ttl_ms, meta=c.meta)
        return c

    def close(self) -> None:  # pragma: no cover - backends override when they hold resources
        pass

    def __enter__(self) -> "OnlineStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
