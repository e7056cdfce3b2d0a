"""Redis backend of the online store (single node or Redis Cluster).

Every key is touched by single-key commands only (GET, SET, EXISTS, UNLINK, INCRBY), batched with
pipelines, so nothing ever needs two keys in one hash slot: the same code runs against a
single server and against a RedisCluster client. MGET / multi-key UNLINK are avoided on
purpose because they fail with CROSSSLOT on a cluster.
"""
from __future__ import annotations

import contextlib
import random
import re
import time
from typing import Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

try:
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.cluster import RedisCluster
    from redis.connection import SSLConnection
    from redis.exceptions import ClusterDownError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.exceptions import WatchError
    from redis.retry import Retry
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the package
    if exc.name != "redis" and not (exc.name or "").startswith("redis."):
        raise
    raise ImportError(
        "the redis online store needs the redis package: pip install redis (or pip install -e .)"
    ) from exc

from features.online.base import KeyGroup, OnlineStore, RecordKey, Snapshot, StoreUnavailable, TransactionConflict, Write, format_key
from features.online.memory import (
    RESERVED_FEATURE_SETS,
    check_group,
    check_counters,
    check_feature_set,
    check_filter,
    check_meta_name,
    check_namespace,
    check_record_key,
    check_writes,
)

__all__ = ["RedisStore"]

# Errors that mean "the backend is not there / did not answer", as opposed to a bug in the
# request. ClusterDownError is a ResponseError subclass but means the same thing to callers.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ClusterDownError)

_SCHEMES = ("redis", "rediss")
_SCAN_COUNT = 1000  # keys per SCAN call (a hint to the server)
_UNLINK_BATCH = 500  # keys per UNLINK pipeline in delete_matching
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def escape_glob(text: str) -> str:
    """Escape SCAN MATCH special characters so an id like 'a*b' matches only itself."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def redact_url(url: str) -> str:
    """The URL as it may appear in error messages and logs: never with its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _describe_client(client: "redis.Redis | RedisCluster") -> str:
    """A URL-like label for a caller-supplied client, for error messages."""
    kwargs = client.get_connection_kwargs()
    host, port = kwargs.get("host"), kwargs.get("port")
    if isinstance(client, RedisCluster):
        node = client.get_default_node()
        if node is not None:
            host, port = node.host, node.port
        return f"redis-cluster://{host}:{port}"
    connection_class = getattr(client.connection_pool, "connection_class", None)
    scheme = "rediss" if connection_class is not None and issubclass(connection_class, SSLConnection) else "redis"
    return f"{scheme}://{host}:{port}/{kwargs.get('db', 0)}"


class RedisStore(OnlineStore):
    """Online store on Redis.

    Records are plain string keys `{ns}:{feature_set}:{version}:{entity_type}:{entity_id}`
    holding opaque bytes with a PX expiry; dedupe markers are `{ns}:__dedupe__:{event_id}`,
    metadata is `{ns}:__meta__:{name}` and counters (incr_many) are `{ns}:__count__:{name}`.

    Pass `client=` to reuse a configured `redis.Redis` or `redis.cluster.RedisCluster`
    (it must use decode_responses=False, since values are bytes); the caller then owns it
    and `close()` leaves it open. Otherwise a client is built from `url` with short socket
    timeouts and a single quick retry, because a serving path would rather fall back than
    wait seconds on a dead server.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        namespace: str = "parity",
        socket_timeout_s: float = 0.5,
        client: "redis.Redis | RedisCluster | None" = None,
    ) -> None:
        check_namespace(namespace)
        if socket_timeout_s <= 0:
            raise ValueError(f"socket_timeout_s must be positive, got {socket_timeout_s!r}")
        self.namespace = namespace
        self._prefix = f"{namespace}:"
        if client is None:
            scheme = urlsplit(url).scheme
            if scheme not in _SCHEMES:
                raise ValueError(f"redis url must start with redis:// or rediss://, got {redact_url(url)!r}")
            self.url = redact_url(url)
            self._client: redis.Redis | RedisCluster = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                # One retry covers a pooled connection the server closed meanwhile (restart,
                # idle timeout); redis-py's default of 10 with backoff would hold a request
                # for seconds against a server that is really gone.
                retry=Retry(ExponentialWithJitterBackoff(cap=0.05, base=0.01), retries=1),
            )
            self._owns_client = True
        else:
            if client.get_connection_kwargs().get("decode_responses"):
                raise ValueError("the redis client must use decode_responses=False: records are opaque bytes")
            self._client = client
            self._owns_client = False
            self.url = _describe_client(client)
        self._cluster = isinstance(self._client, RedisCluster)

    # -- helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        """Turn "server not reachable / too slow" into the contract's StoreUnavailable."""
        try:
            yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis online store at {self.url} unavailable during {op}: {exc}") from exc

    def _key(self, key: RecordKey) -> str:
        return format_key(self.namespace, key)

    def _marker_key(self, event_id: int) -> str:
        return f"{self.namespace}:__dedupe__:{event_id}"

    def _meta_key(self, name: str) -> str:
        return f"{self.namespace}:__meta__:{name}"

    def _counter_key(self, name: str) -> str:
        return f"{self.namespace}:__count__:{name}"

    def _parse_key(self, raw: bytes | str) -> RecordKey | None:
        """A scanned key back to a RecordKey, or None for anything that is not a record."""
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
        if not raw.startswith(self._prefix):
            return None
        parts = raw[len(self._prefix) :].split(":")
        if len(parts) != 4 or parts[0] in RESERVED_FEATURE_SETS:
            return None
        key = RecordKey(*parts)
        try:
            check_record_key(key)
        except ValueError:
            return None  # a foreign key that merely shares our namespace
        return key

    def _scan(self, pattern: str) -> Iterator[bytes]:
        return self._client.scan_iter(match=pattern, count=_SCAN_COUNT)

    # -- contract ------------------------------------------------------------------------

    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        """One round trip: MGET on a single node (one command and one reply instead of 501 of
        each: 1 user + 500 items read in 2.3 ms instead of 4.4 ms, bench/RESULTS.md), a pipeline
        of GETs on a cluster (one round trip per node; MGET there fails with CROSSSLOT)."""
        for key in keys:
            check_record_key(key)
        if not keys:
            return []
        with self._guard("get_many"):
            if not self._cluster:
                return list(self._client.mget([self._key(k) for k in keys]))
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(self._key(key))
            return list(pipe.execute())

    def get_groups(self, groups: Sequence[KeyGroup]) -> list[bytes | None]:
        """`get_many` without a RecordKey per entity: each group's key prefix is checked once
        and its ids in one regex pass (building and checking 1,000 RecordKeys was half the time
        of reading 1 user + 500 items)."""
        names: list[str] = []
        for g in groups:
            check_group(g)
            prefix = f"{self.namespace}:{g.feature_set}:{g.version}:{g.entity_type}:"
            names += [prefix + i for i in g.entity_ids]
        if not names:
            return []
        with self._guard("get_many"):
            if not self._cluster:
                return list(self._client.mget(names))
            pipe = self._client.pipeline(transaction=False)
            for n in names:
                pipe.get(n)
            return list(pipe.execute())

    def commit(
        self,
        writes: Sequence[Write],
        *,
        dedupe_ids: Sequence[int] = (),
        dedupe_ttl_ms: int = 0,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """Write records, dedupe markers and metadata together.

        Single node: one MULTI/EXEC transaction holding `SET key value PX ttl` per record,
        `SET {ns}:__dedupe__:{id} 1 PX dedupe_ttl_ms` per event id and `SET {ns}:__meta__:{name}`
        per metadata entry. Redis runs EXEC as one unit, so no reader and no restarted
        consumer can observe records without their markers: at-least-once delivery plus the
        `seen()` check gives an exactly-once effect. (Every queued command is a plain SET, so
        none can fail at EXEC time and leave a partial transaction, and re-sending the whole
        transaction -- the client's one retry after a dropped connection -- rewrites the same
        values instead of applying anything twice. If the connection is lost after EXEC was
        sent the outcome is unknown and StoreUnavailable is raised; a replay is then
        deduplicated if EXEC did apply.)

        Redis Cluster: a transaction must stay within one hash slot and our keys are spread
        over all slots, so cluster mode falls back to two non-transactional pipelines: first
        records and metadata, then -- only after those succeeded -- the dedupe markers.
        Writing markers LAST means a failure can never mark an event applied whose records are
        missing (no lost updates). KNOWN LIMITATION: it is not exactly-once: a crash or
        connection loss between the record write and the marker write leaves the records
        applied but unmarked, so a redelivered event is applied a second time (and a
        concurrent reader may see records whose markers are not yet there). Counting features
        can therefore over-count by the events of one failed commit on a cluster.
        """
        meta_items = check_writes(writes, dedupe_ids, dedupe_ttl_ms, meta)
        if not writes and not dedupe_ids and not meta_items:
            return
        with self._guard("commit"):
            if not self._cluster:
                pipe = self._client.pipeline(transaction=True)
                self._queue_records(pipe, writes, meta_items)
                self._queue_markers(pipe, dedupe_ids, dedupe_ttl_ms)
                pipe.execute()
                return
            if writes or meta_items:
                pipe = self._client.pipeline(transaction=False)
                self._queue_records(pipe, writes, meta_items)
                pipe.execute()
            if dedupe_ids:
                pipe = self._client.pipeline(transaction=False)
                self._queue_markers(pipe, dedupe_ids, dedupe_ttl_ms)
                pipe.execute()

    def _queue_records(self, pipe: "redis.client.Pipeline", writes: Sequence[Write], meta: Mapping[str, str]) -> None:
        for w in writes:
            pipe.set(self._key(w.key), w.value, px=w.ttl_ms)
        for name, value in meta.items():
            pipe.set(self._meta_key(name), value)

    def _queue_markers(self, pipe: "redis.client.Pipeline", dedupe_ids: Sequence[int], dedupe_ttl_ms: int) -> None:
        for event_id in dedupe_ids:
            pipe.set(self._marker_key(event_id), b"1", px=dedupe_ttl_ms)

    def seen(self, event_ids: Sequence[int]) -> list[bool]:
        """One pipelined batch of single-key EXISTS on the marker keys."""
        if not event_ids:
            return []
        with self._guard("seen"):
            pipe = self._client.pipeline(transaction=False)
            for event_id in event_ids:
                pipe.exists(self._marker_key(event_id))
            return [bool(n) for n in pipe.execute()]

    def transact(self, keys, event_ids, meta_names, fn, *, max_attempts: int = 50):
        """Optimistic concurrency: WATCH every key read, read them in one MGET, let `fn`
        decide, then MULTI/EXEC; if another writer touched a watched key EXEC aborts
        (WatchError) and the whole read-decide-write runs again on fresh values.

        Single node only: WATCH and MGET across hash slots are not allowed on a cluster,
        where this falls back to the base class's unisolated version (one writer only).
        """
        if self._cluster:
            return super().transact(keys, event_ids, meta_names, fn)
        for key in keys:
            check_record_key(key)
        for name in meta_names:
            check_meta_name(name)
        rk = [self._key(k) for k in keys] + [self._marker_key(i) for i in event_ids] + [self._meta_key(n) for n in meta_names]
        n_k, n_e = len(keys), len(event_ids)
        with self._guard("transact"):
            for attempt in range(max_attempts):
                with self._client.pipeline(transaction=True) as pipe:
                    try:
                        if rk:
                            pipe.watch(*rk)
                        vals = pipe.mget(rk) if rk else []
                        snap = Snapshot(list(vals[:n_k]), [v is not None for v in vals[n_k : n_k + n_e]],
                                        {n: (None if v is None else v.decode("utf-8")) for n, v in zip(meta_names, vals[n_k + n_e :])})
                        c = fn(snap)
                        meta_items = check_writes(c.writes, c.dedupe_ids, c.dedupe_ttl_ms, c.meta)
                        pipe.multi()
                        self._queue_records(pipe, c.writes, meta_items)
                        self._queue_markers(pipe, c.dedupe_ids, c.dedupe_ttl_ms)
                        pipe.execute()
                        return c
                    except WatchError:
                        time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise TransactionConflict(f"gave up after {max_attempts} attempts: other writers kept changing the same keys on {self.url}")

    def incr_many(self, names: Sequence[str], amounts: Sequence[int], ttl_ms: int) -> list[int]:
        """Per counter `SET key 0 PX ttl NX` (creates it with its expiry, or does nothing)
        then `INCRBY key amount` (keeps the expiry): single-key commands in one pipeline.

        Single node: the pipeline is one MULTI/EXEC, so all counters move or none does.
        Cluster: a plain pipeline (one round trip per node); each pair is idempotent in its
        first half, so a connection lost midway leaves some counters incremented and others
        not, never a counter without expiry. (If a counter expires in the instant between
        its SET NX and its INCRBY, the INCRBY recreates it without expiry; its window is in
        its name, so it is never read again: a few leaked bytes, not a wrong count.)
        A dropped connection makes the client resend once, which may count a batch twice;
        callers size their caps for it (features.contribution).
        """
        check_counters(names, amounts, ttl_ms)
        if not names:
            return []
        with self._guard("incr_many"):
            pipe = self._client.pipeline(transaction=not self._cluster)
            for name, amount in zip(names, amounts):
                key = self._counter_key(name)
                pipe.set(key, b"0", px=ttl_ms, nx=True)
                pipe.incrby(key, amount)
            return [int(v) for v in pipe.execute()[1::2]]

    def get_meta(self, name: str) -> str | None:
        check_meta_name(name)
        with self._guard("get_meta"):
            raw = self._client.get(self._meta_key(name))
        return None if raw is None else raw.decode("utf-8")

    def set_meta(self, name: str, value: str) -> None:
        check_meta_name(name)
        if not isinstance(value, str):
            raise TypeError(f"meta value for {name!r} must be str, got {type(value).__name__}")
        with self._guard("set_meta"):
            self._client.set(self._meta_key(name), value)

    def delete(self, keys: Sequence[RecordKey]) -> int:
        """One pipeline of single-key UNLINKs (cluster-safe); counts keys that existed."""
        for key in keys:
            check_record_key(key)
        if not keys:
            return 0
        with self._guard("delete"):
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.unlink(self._key(key))
            return sum(int(n) for n in pipe.execute())

    def delete_matching(
        self, feature_set: str, version: str | None = None, entity_type: str | None = None, entity_prefix: str | None = None
    ) -> int:
        """SCAN MATCH over the key prefix, then UNLINK in pipelined batches.

        Not atomic: a record written while the scan runs may survive. Callers retire a
        feature set after its writers stopped, and erasure re-runs are idempotent.
        Glob characters in the filters are escaped, and every scanned key is re-checked
        in Python, so the pattern only narrows the scan and can never widen a delete.
        """
        check_filter(feature_set, version, entity_type, entity_prefix)
        pattern = ":".join(
            [
                escape_glob(self.namespace),
                escape_glob(feature_set),
                "*" if version is None else escape_glob(version),
                "*" if entity_type is None else escape_glob(entity_type),
                ("" if entity_prefix is None else escape_glob(entity_prefix)) + "*",
            ]
        )

        def wanted(key: RecordKey) -> bool:
            return (
                key.feature_set == feature_set
                and (version is None or key.version == version)
                and (entity_type is None or key.entity_type == entity_type)
                and (entity_prefix is None or key.entity_id.startswith(entity_prefix))
            )

        with self._guard("delete_matching"):
            return self._unlink_scanned(pattern, lambda raw: (k := self._parse_key(raw)) is not None and wanted(k))

    def delete_counters(self, match: Callable[[str], bool]) -> int:
        prefix = self._counter_key("")

        def keep(raw: bytes | str) -> bool:
            k = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            return k.startswith(prefix) and match(k[len(prefix):])

        with self._guard("delete_counters"):
            return self._unlink_scanned(escape_glob(prefix) + "*", keep)

    def clear_namespace(self) -> int:
        with self._guard("clear_namespace"):
            return self._unlink_scanned(escape_glob(self.namespace) + ":*", lambda raw: True)

    def _unlink_scanned(self, pattern: str, keep) -> int:
        """SCAN `pattern`, UNLINK the keys `keep` accepts in pipelined batches; returns the count."""
        deleted = 0
        batch: list[bytes] = []
        for raw in self._scan(pattern):
            if not keep(raw):
                continue
            batch.append(raw)
            if len(batch) >= _UNLINK_BATCH:
                deleted += self._unlink(batch)
                batch = []
        if batch:
            deleted += self._unlink(batch)
        return deleted

    def _unlink(self, raw_keys: Sequence[bytes]) -> int:
        pipe = self._client.pipeline(transaction=False)
        for raw in raw_keys:
            pipe.unlink(raw)
        return sum(int(n) for n in pipe.execute())

    def iter_keys(self, feature_set: str | None = None) -> Iterable[RecordKey]:
        """Lazily SCAN the namespace (every primary on a cluster), yielding record keys.

        SCAN may return a key twice if the keyspace is rehashed meanwhile; audits that need
        exact counts should collect into a set.
        """
        if feature_set is not None:
            check_feature_set(feature_set)
        pattern = escape_glob(self.namespace) + ":" + ("*" if feature_set is None else escape_glob(feature_set) + ":*")
        return self._iter_keys(pattern, feature_set)

    def _iter_keys(self, pattern: str, feature_set: str | None) -> Iterator[RecordKey]:
        with self._guard("iter_keys"):
            for raw in self._scan(pattern):
                key = self._parse_key(raw)
                if key is not None and (feature_set is None or key.feature_set == feature_set):
                    yield key

    def close(self) -> None:
        """Close the connection pool if this store created it; a passed-in client stays open."""
        if self._owns_client:
            self._client.close()
