"""Redis backend of the online store (single node or Redis Cluster).

Reads, deletes and counters use single-key commands (GET, EXISTS, UNLINK, INCRBY) batched
with pipelines, so they run against a single server and a RedisCluster client alike (MGET
only on a single node: it fails with CROSSSLOT on a cluster). Commits differ: one MULTI/EXEC
on a single node; on a cluster, one Lua script per slot group, with keys hash-tagged so an
entity's records and markers share a slot (features/online/redis_cluster.py).
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
    from redis.crc import key_slot
    from redis.exceptions import AskError, ClusterDownError, NoScriptError, ReadOnlyError, RedisClusterException, RedisError, ResponseError, TryAgainError
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

from features.online.base import KeyGroup, OnlineStore, RecordKey, Snapshot, StoreUnavailable, Touches, TransactionConflict, Write, format_key, seen_pairs_of
from features.online.redis_cluster import CAS_SCRIPT, READ_SCRIPT, ClusterLayout, GroupCommit, split_commit
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

__all__ = ["RedisStore", "node_refused"]

# Errors that mean "the backend is not there / did not answer", as opposed to a bug in the
# request. ClusterDownError is a ResponseError subclass but means the same thing to callers.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ClusterDownError)

_NO_SHA = "0" * 40  # a script sha no node knows: the first read on a node gets NOSCRIPT and loads it

# Error replies of a node that cannot take writes now (no in-sync replicas under
# min-replicas-to-write, a replica or a loading node, a slot in migration): the group was not
# written, and the caller may try again later.
_REFUSED = frozenset({"NOREPLICAS", "READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "MOVED", "ASK"})


def node_refused(exc: BaseException) -> bool:
    """A node's answer that means "not here, not now" (redis-py strips MOVED/ASK from the text
    and gives them, TRYAGAIN and READONLY their own classes)."""
    return isinstance(exc, (*_UNAVAILABLE, AskError, TryAgainError, ReadOnlyError)) or (
        isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in _REFUSED)

_SCHEMES = ("redis", "rediss")
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # a spec's scheme -> redis-py's
# A cluster client's retry budget, as redis-py 8.1 spends it: a command that meets a dead node,
# a MOVED or CLUSTERDOWN is tried again up to CLUSTER_RETRIES times, after refreshing the slot
# table; a refused connection is retried at once, CLUSTERDOWN / an uncovered slot after 0.25 s
# (the backoff object below is not consulted on those paths). So while a master is down and
# not yet replaced, a read either rides the failover out or raises StoreUnavailable within
# ~0.1 s; tests/features/test_redis_cluster.py measures how long reads fail after a kill -9
# (failover = cluster-node-timeout + election). Callers on the request path fall back meanwhile.
CLUSTER_RETRIES = 6
CLUSTER_RETRY_BASE_S = 0.1
CLUSTER_RETRY_CAP_S = 1.0
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
        return f"redis+cluster://{host}:{port}"
    connection_class = getattr(client.connection_pool, "connection_class", None)
    scheme = "rediss" if connection_class is not None and issubclass(connection_class, SSLConnection) else "redis"
    return f"{scheme}://{host}:{port}/{kwargs.get('db', 0)}"


class RedisStore(OnlineStore):
    """Online store on Redis.

    Single node: records are plain string keys `{ns}:{feature_set}:{version}:{entity_type}:{entity_id}`
    holding opaque bytes with a PX expiry; dedupe markers are `{ns}:__dedupe__:{event_id}`,
    metadata is `{ns}:__meta__:{name}` and counters (incr_many) are `{ns}:__count__:{name}`.
    Redis Cluster: the same names with hash tags that put each entity's records and markers
    in one slot (features/online/redis_cluster.py), so a commit is atomic per entity. A
    cluster store written before the tags (plain names) reads as empty until
    `migrate_untagged_keys()` moved it; a single node's names are unchanged.

    Pass `client=` to reuse a configured `redis.Redis` or `redis.cluster.RedisCluster`
    (it must use decode_responses=False, since values are bytes); the caller then owns it
    and `close()` leaves it open. Otherwise a client is built from `url` with short socket
    timeouts: `redis://` / `rediss://` open one server with a single quick retry, because a
    serving path would rather fall back than wait seconds on a dead server;
    `redis+cluster://host:port` / `rediss+cluster://` open a cluster from that seed node
    with the retry budget CLUSTER_RETRIES (see there).

    `wait_replicas` (cluster only): after each commit, WAIT until that many replicas of every node written
    acknowledged it (at most `wait_timeout_ms`). Redis replicates asynchronously, so without
    it a master killed right after acknowledging a commit can take the commit with it when
    its replica is promoted (the stream consumer has acked the events by then: lost). With
    it, a commit that returns is on a replica too; if the WAIT times out, StoreUnavailable is
    raised and the caller redelivers (deduplicated if the commit did survive). LIMIT: a
    master whose replica was promoted runs alone until the failed node rejoins; commits that
    touch it raise StoreUnavailable meanwhile, although their writes are applied there, and
    a redelivery that finds such a group already applied completes without waiting for it.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        namespace: str = "parity",
        socket_timeout_s: float = 0.5,
        client: "redis.Redis | RedisCluster | None" = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 250,
    ) -> None:
        check_namespace(namespace)
        if socket_timeout_s <= 0:
            raise ValueError(f"socket_timeout_s must be positive, got {socket_timeout_s!r}")
        if not isinstance(wait_replicas, int) or wait_replicas < 0:
            raise ValueError(f"wait_replicas must be an int >= 0, got {wait_replicas!r}")
        if not isinstance(wait_timeout_ms, int) or wait_timeout_ms <= 0:
            raise ValueError(f"wait_timeout_ms must be a positive int, got {wait_timeout_ms!r}")
        if wait_replicas and client is None and wait_timeout_ms >= socket_timeout_s * 1000:
            # the WAIT's reply must arrive before the socket gives up on it
            raise ValueError(f"wait_timeout_ms ({wait_timeout_ms}) must be below socket_timeout_s ({socket_timeout_s} s)")
        self.namespace = namespace
        self._prefix = f"{namespace}:"
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        if client is None:
            scheme = urlsplit(url).scheme
            if scheme not in _SCHEMES and scheme not in _CLUSTER_SCHEMES:
                raise ValueError(f"redis url must start with redis://, rediss://, redis+cluster:// or rediss+cluster://, got {redact_url(url)!r}")
            self.url = redact_url(url)
            if scheme in _CLUSTER_SCHEMES:
                self._client: redis.Redis | RedisCluster = RedisCluster.from_url(
                    _CLUSTER_SCHEMES[scheme] + url[len(scheme):],
                    socket_timeout=socket_timeout_s,
                    socket_connect_timeout=socket_timeout_s,
                    retry=Retry(ExponentialWithJitterBackoff(cap=CLUSTER_RETRY_CAP_S, base=CLUSTER_RETRY_BASE_S), retries=CLUSTER_RETRIES),
                )
            else:
                self._client = redis.Redis.from_url(
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
        self._layout = ClusterLayout(namespace) if self._cluster else None
        if wait_replicas and not self._cluster:
            raise ValueError("wait_replicas is for Redis Cluster stores (redis+cluster://); a single node has no failover to survive here")
        self._cas_sha: str | None = None
        self._read_shas: dict[str, str] = {}  # node name -> READ_SCRIPT's sha there

    # -- helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        """Turn "server not reachable / too slow" into the contract's StoreUnavailable."""
        try:
            yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis online store at {self.url} unavailable during {op}: {exc}") from exc

    def key_name(self, key: RecordKey) -> str:
        """The Redis key that holds a record (hash-tagged on a cluster), for audits and tools."""
        check_record_key(key)
        return self._key(key)

    def _key(self, key: RecordKey) -> str:
        if self._layout is not None:
            return self._layout.record(key)
        return format_key(self.namespace, key)

    def _marker_key(self, event_id: int) -> str:
        """The marker `seen()` reads: on a cluster the commit marker (the whole commit is in)."""
        if self._layout is not None:
            return self._layout.commit_marker(event_id)
        return f"{self.namespace}:__dedupe__:{event_id}"

    def _meta_key(self, name: str) -> str:
        if self._layout is not None:
            return self._layout.meta(name)
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
        if self._layout is not None:
            entity = self._layout.untag(parts[3])
            if entity is None:
                return None
            parts[3] = entity
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
            return self._get_all([self._key(k) for k in keys])

    def get_groups(self, groups: Sequence[KeyGroup]) -> list[bytes | None]:
        """`get_many` without a RecordKey per entity: each group's key prefix is checked once
        and its ids in one regex pass (building and checking 1,000 RecordKeys was half the time
        of reading 1 user + 500 items)."""
        names: list[str] = []
        for g in groups:
            check_group(g)
            prefix = f"{self.namespace}:{g.feature_set}:{g.version}:{g.entity_type}:"
            if self._layout is None:
                names += [prefix + i for i in g.entity_ids]
            else:
                names += [f"{prefix}{{{i}}}" for i in g.entity_ids]
        if not names:
            return []
        with self._guard("get_many"):
            if not self._cluster:
                return list(self._client.mget(names))
            return self._get_all(names)

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

        Redis Cluster: a transaction must stay within one hash slot, so the commit is cut
        into slot groups (features/online/redis_cluster.py): one Lua script per entity id
        writes that entity's records (atomic there), sent per node in one round trip, then -- only after
        every one of them succeeded -- one script writes the metadata and the commit markers
        (what `seen()` reads) together. Markers LAST means a failure never marks an event
        applied whose records are missing (no lost updates). LIMITS: a reader may see one
        entity's new records while another entity's are not written yet (each entity is
        consistent in itself: its state and its served values always agree), and a crash
        between groups leaves the earlier groups written and the events unmarked. Writing
        the same records again is harmless (a plain commit sets values, it does not add);
        what must not run twice is a read-modify-write of counting state, which goes through
        `transact` with `touches`, where each group also holds its own per-event markers and
        a redelivered event is applied exactly to the groups that lack it.
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
            groups, meta_group = split_commit(self._layout, writes, dedupe_ids, dedupe_ttl_ms, meta_items, {})
            self._run_groups(list(groups.values()))
            if meta_group.write_keys:
                self._run_groups([meta_group])

    def _cas(self) -> str:
        if self._cas_sha is None:
            self._cas_sha = self._client.script_load(CAS_SCRIPT)
        return self._cas_sha

    def _run_groups(self, groups: Sequence[GroupCommit]) -> list[bool]:
        """Each group's CAS script; True where a group wrote, False where a key it checks had
        changed. Groups are sent per node on one connection of that node (every node's
        requests written before any reply is read: one round trip), routed by the client's
        slot table, with no redis-py retry in between: a retry on another connection would
        make a WAIT count that connection's writes (none) and acknowledge nothing real.
        With wait_replicas a WAIT follows each node's scripts on the same connection. A node
        that does not know the script yet (a replica promoted since) gets it and its groups
        are sent again. A node that cannot be reached or answers with an error (a slot moved,
        no in-sync replica under min-replicas-to-write, ...) fails the commit with
        StoreUnavailable after the slot table is refreshed; groups other nodes wrote stay
        written (see `commit` and `transact` for why that is safe)."""
        if not groups:
            return []
        out: list[bool | None] = [None] * len(groups)
        todo = list(range(len(groups)))
        for _ in range(3):
            sha = self._cas()
            nodes = self._client.nodes_manager
            by_node: dict[str, tuple] = {}
            for i in todo:
                keys, _ = groups[i].script_args()
                slot = key_slot(keys[0].encode())
                owners = nodes.slots_cache.get(slot)
                node = owners[0] if owners else nodes.get_node_from_slot(slot)
                by_node.setdefault(node.name, (node, []))[1].append(i)
            replies = self._send_per_node(
                [(node, [("EVALSHA", sha, len(k), *k, *a) for k, a in (groups[i].script_args() for i in idx)]) for node, idx in by_node.values()])
            missing: list[int] = []
            failure: BaseException | None = None
            for (node, idx), got in zip(by_node.values(), replies):
                if isinstance(got, BaseException):
                    failure = failure or got
                    continue
                for i, r in zip(idx, got):
                    if isinstance(r, NoScriptError):
                        missing.append(i)
                    elif isinstance(r, BaseException):
                        failure = failure or r
                    else:
                        out[i] = bool(r)
                if self.wait_replicas and len(got) > len(idx):
                    acked = got[len(idx)]
                    if isinstance(acked, BaseException) or int(acked) < self.wait_replicas:
                        failure = failure or StoreUnavailable(
                            f"redis cluster node {node.name}: a commit reached {acked} of {self.wait_replicas} replicas within {self.wait_timeout_ms} ms")
            if failure is not None:
                self._refresh_slots()
                if isinstance(failure, StoreUnavailable):
                    raise failure
                if node_refused(failure):
                    raise StoreUnavailable(f"redis cluster at {self.url} refused a commit group: {type(failure).__name__}: {failure}") from failure
                raise failure
            if not missing:
                return out  # type: ignore[return-value]
            self._cas_sha = None  # load it again, on every primary
            todo = missing
        raise StoreUnavailable(f"redis cluster at {self.url} kept answering NOSCRIPT for the commit script")

    def _send_per_node(self, batches: list[tuple], *, wait: bool = True) -> list:
        """Send each (node, commands) batch on one connection of its node -- plus a WAIT when
        wait_replicas is set and `wait` -- writing every batch before reading any reply, so the
        nodes work in parallel and the call costs one round trip. Per batch: the replies in
        order (an error reply as its exception), or the exception that lost the connection."""
        results: list = [None] * len(batches)
        held: list[tuple] = []
        try:
            for j, (node, commands) in enumerate(batches):
                if wait and self.wait_replicas:
                    commands = [*commands, ("WAIT", self.wait_replicas, self.wait_timeout_ms)]
                pool = node.redis_connection.connection_pool
                try:
                    conn = pool.get_connection()
                except _UNAVAILABLE as exc:
                    results[j] = exc
                    continue
                held.append((j, pool, conn, len(commands)))
                try:
                    conn.send_packed_command(conn.pack_commands(commands))
                except _UNAVAILABLE as exc:
                    results[j] = exc
            for j, _, conn, n in held:
                if results[j] is not None:
                    continue
                replies: list = []
                try:
                    for _ in range(n):
                        try:
                            replies.append(conn.read_response())
                        except ResponseError as exc:
                            replies.append(exc)
                    results[j] = replies
                except _UNAVAILABLE as exc:
                    results[j] = exc
        finally:
            for j, pool, conn, _ in held:
                if not isinstance(results[j], list):
                    conn.disconnect()  # replies may still be in flight: never hand them to the next user
                pool.release(conn)
        return results

    def _refresh_slots(self) -> None:
        """Re-read the slot table after a node failed us (best effort: if no node answers,
        the next call fails the same way and tries again)."""
        try:
            self._client.nodes_manager.initialize()
        except (RedisError, RedisClusterException, OSError):  # every node down: nothing to refresh from now
            pass

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

    def transact(self, keys, event_ids, meta_names, fn, *, touches: Touches | None = None, max_attempts: int = 50):
        """Optimistic concurrency: WATCH every key read, read them in one MGET, let `fn`
        decide, then MULTI/EXEC; if another writer touched a watched key EXEC aborts
        (WatchError) and the whole read-decide-write runs again on fresh values.

        Redis Cluster (WATCH and MGET cannot span slots): one pipelined read of everything,
        `fn`, then the commit cut into slot groups (features/online/redis_cluster.py), each
        group's script checking that the keys it read in its slot are unchanged before it
        writes; the meta group (metadata, commit markers) goes last, only once every entity
        group is in. A group that finds a change writes nothing and the whole read-decide-
        write runs again; groups already written stay written, and their per-group markers
        (placed by `touches`) make `fn` see those events as applied there (`seen_pairs`).
        LIMITS: isolation is per slot group: what `fn` read in a group it does not write is
        not checked, and between two groups' scripts a reader can see one entity updated and
        the other not yet. Without `touches` a retry after a partial commit re-runs `fn` on
        records that hold this commit's earlier writes: fine for idempotent writers (repair,
        one-group metadata updates), wrong for counting ones, which pass `touches`.
        """
        if self._cluster:
            return self._transact_cluster(keys, event_ids, meta_names, fn, touches, max_attempts)
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
                        seen = [v is not None for v in vals[n_k : n_k + n_e]]
                        snap = Snapshot(list(vals[:n_k]), seen,
                                        {n: (None if v is None else v.decode("utf-8")) for n, v in zip(meta_names, vals[n_k + n_e :])},
                                        seen_pairs_of(seen, touches))
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

    def _transact_cluster(self, keys, event_ids, meta_names, fn, touches: Touches | None, max_attempts: int):
        for key in keys:
            check_record_key(key)
        for name in meta_names:
            check_meta_name(name)
        lay = self._layout
        names = [lay.record(k) for k in keys]
        tags = [lay.tag(k) for k in keys]
        t_ev, t_key = ([], []) if touches is None else (list(touches[0]), list(touches[1]))
        pair_groups = sorted({(e, tags[k]) for e, k in zip(t_ev, t_key)})  # one group marker per (event, slot group)
        marker_names = [lay.group_marker(tag, event_ids[e]) for e, tag in pair_groups]
        pair_of = {p: j for j, p in enumerate(pair_groups)}
        commit_names = [lay.commit_marker(i) for i in event_ids]
        meta_keys = [lay.meta(n) for n in meta_names]
        reads = names + marker_names + commit_names + meta_keys
        n_k, n_m, n_c = len(names), len(marker_names), len(commit_names)
        with self._guard("transact"):
            for attempt in range(max_attempts):
                vals = self._get_all(reads)
                values = vals[:n_k]
                markers = vals[n_k : n_k + n_m]
                commits = vals[n_k + n_m : n_k + n_m + n_c]
                seen = [v is not None for v in commits]
                seen_pairs = [seen[e] or markers[pair_of[(e, tags[k])]] is not None for e, k in zip(t_ev, t_key)]
                meta = {n: (None if v is None else v.decode("utf-8")) for n, v in zip(meta_names, vals[n_k + n_m + n_c :])}
                c = fn(Snapshot(values, seen, meta, seen_pairs))
                marker_tags: dict[int, list[str]] = {}  # group markers still missing (one already there is not rewritten)
                for (e, tag), v in zip(pair_groups, markers):
                    if v is None:
                        marker_tags.setdefault(event_ids[e], []).append(tag)
                meta_items = check_writes(c.writes, c.dedupe_ids, c.dedupe_ttl_ms, c.meta)
                groups, meta_group = split_commit(lay, c.writes, c.dedupe_ids, c.dedupe_ttl_ms, meta_items, marker_tags)
                # each written group checks what was read in its slot: its records, its markers
                for name, tag, v in zip(names, tags, values):
                    if tag in groups:
                        groups[tag].check(name, v)
                for (e, tag), name, v in zip(pair_groups, marker_names, markers):
                    if tag in groups:
                        groups[tag].check(name, v)
                for name, v in zip(commit_names + meta_keys, commits + vals[n_k + n_m + n_c :]):
                    meta_group.check(name, v)
                order = list(groups.values())
                if all(self._run_groups(order)) and (not meta_group.write_keys or self._run_groups([meta_group])[0]):
                    return c
                time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise TransactionConflict(f"gave up after {max_attempts} attempts: other writers kept changing the same keys on {self.url}")

    def _get_all(self, names: Sequence[str]) -> list[bytes | None]:
        """GET of every name: one read script per node (GETs of all its keys in one command).

        redis-py's cluster pipeline routes and packs each GET in Python: 1 user + 500 items took
        ~18-37 ms that way on this machine (~1-3 ms on one node with MGET); this way ~4 ms
        (bench/results/cluster_store.json). Here keys are grouped by node with the
        client's slot table and each group is one EVALSHA of READ_SCRIPT (Redis >= 7: a script
        flagged allow-cross-slot-keys may read any keys its node serves). A group whose node
        answers with an error (a slot moved in a failover or a migration) or cannot be reached
        is read again through the cluster pipeline, which follows redirections and refreshes
        the slot table (bench/cluster_store.py measures both paths)."""
        if not names:
            return []
        nodes = self._client.nodes_manager
        # the slot table itself: get_node_from_slot's argument-checking wrapper cost ~7 ms per
        # 500 keys (a missing slot falls back to it, which raises what redis-py raises)
        table = nodes.slots_cache
        by_node: dict[str, tuple] = {}
        for i, name in enumerate(names):
            slot = key_slot(name.encode())
            owners = table.get(slot)
            node = owners[0] if owners else nodes.get_node_from_slot(slot)
            got = by_node.get(node.name)
            if got is None:
                got = by_node[node.name] = (node, [], [])
            got[1].append(i)
            got[2].append(name)
        out: list[bytes | None] = [None] * len(names)
        redo: list[int] = []
        groups = list(by_node.values())
        for (node, idx, keys), vals in zip(groups, self._read_nodes([(g[0], g[2]) for g in groups])):
            if isinstance(vals, Exception):
                redo += idx
                continue
            for i, v in zip(idx, vals):
                out[i] = v
        if redo:
            pipe = self._client.pipeline(transaction=False)
            for i in redo:
                pipe.get(names[i])
            for i, v in zip(redo, pipe.execute()):
                out[i] = v
        return out

    def _read_nodes(self, groups: list[tuple]) -> list:
        """READ_SCRIPT on every (node, keys) at once (`_send_per_node`: one round trip). Per
        group: the values, or the exception its node answered with (NOSCRIPT is handled here:
        the script is loaded there and that group read again)."""
        sent = self._send_per_node([(node, [("EVALSHA", self._read_shas.get(node.name, _NO_SHA), 0, *keys)]) for node, keys in groups],
                                   wait=False)
        results: list = []
        for (node, keys), r in zip(groups, sent):
            r = r[0] if isinstance(r, list) else r
            if isinstance(r, NoScriptError):
                try:
                    sha = self._read_shas[node.name] = node.redis_connection.script_load(READ_SCRIPT)
                    r = node.redis_connection.evalsha(sha, 0, *keys)
                except (*_UNAVAILABLE, ResponseError) as exc:
                    r = exc
            results.append(r)
        return results

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
        """SCAN MATCH over the key prefix (on every primary of a cluster), then UNLINK in
        pipelined batches.

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
                ("{" if self._cluster else "") + ("" if entity_prefix is None else escape_glob(entity_prefix)) + "*",
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

    def migrate_untagged_keys(self) -> int:
        """Move a cluster store written before hash tags (records, commit markers, metadata under
        their single-node names) to the tagged names, keeping each key's value and expiry;
        returns how many keys moved. Without this such a store reads as empty on a cluster.

        Per key: DUMP, RESTORE under the new name with its remaining TTL (never over a key the
        tagged layout already holds: that one is newer), UNLINK the old. Idempotent; run it with
        writers stopped (a write to an old name meanwhile would be left behind)."""
        if self._layout is None:
            raise ValueError("migrate_untagged_keys is for Redis Cluster stores: a single node keeps the untagged layout")
        lay = self._layout
        dedupe, meta = f"{self.namespace}:__dedupe__:", f"{self.namespace}:__meta__:"
        moved = 0
        with self._guard("migrate_untagged_keys"):
            for raw in list(self._scan(escape_glob(self.namespace) + ":*")):
                old = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
                if "{" in old:
                    continue  # already tagged
                if old.startswith(dedupe) and old[len(dedupe):].isdigit():
                    new = lay.commit_marker(int(old[len(dedupe):]))
                elif old.startswith(meta):
                    new = lay.meta(old[len(meta):])
                else:
                    parts = old[len(self._prefix):].split(":")
                    if len(parts) != 4 or parts[0] in RESERVED_FEATURE_SETS:
                        continue  # counters keep their names; anything else is not ours
                    key = RecordKey(*parts)
                    try:
                        check_record_key(key)
                    except ValueError:
                        continue
                    new = lay.record(key)
                dump, ttl = self._client.dump(raw), self._client.pttl(raw)
                if dump is None:
                    continue  # expired meanwhile
                try:
                    self._client.restore(new, max(int(ttl), 0), dump)
                except ResponseError as exc:
                    if "BUSYKEY" not in str(exc):
                        raise
                self._client.unlink(raw)
                moved += 1
        return moved

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
