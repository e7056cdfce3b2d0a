"""The online store on a real Redis Cluster of 3 masters and 3 replicas (six private
redis-server processes): what only a cluster shows. The store contract itself runs on the
same kind of cluster as the "cluster" backend of tests/features/test_online_contract.py.

- an entity's records and markers share one hash slot, entities spread over every master;
- a commit refused by one master half-way (the others already wrote) is finished exactly once
  by redelivering the batch;
- writers racing on the same entities lose no update;
- a consumer per master ingests while a reader reads and a master is killed with SIGKILL:
  its replica is promoted, no event is lost or counted twice (compared with a memory store
  fed the same events once), and reads come back;
- erasing a user finds their keys on every master.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import Iterator

import numpy as np
import pytest

redis = pytest.importorskip("redis")

from redis.cluster import RedisCluster  # noqa: E402

from features.deletion import delete_user  # noqa: E402
from features.eventlog import EventLog  # noqa: E402
from features.events import MS_PER_DAY, EventBatch  # noqa: E402
from features.lookup import FeatureLookup, record_keys  # noqa: E402
from features.materialize import materialize  # noqa: E402
from features.online.base import KeyGroup, StoreUnavailable  # noqa: E402
from features.online.memory import MemoryStore  # noqa: E402
from features.online.redis_store import RedisStore  # noqa: E402
from features.redis_stream import RedisStreamConsumer, publish_events  # noqa: E402
from features.repo import feature_sets  # noqa: E402
from features.served_values import values_key  # noqa: E402
from features.streaming import StreamingIngestor  # noqa: E402
from features.verify import values_match  # noqa: E402
from redis_server import RedisClusterServers  # noqa: E402

pytestmark = pytest.mark.redis
SETS = feature_sets("simulated", 20)
LATENESS_MS = 30 * MS_PER_DAY  # consumers run in parallel, out of event-time order: nothing is late here
DEDUPE_MS = 60 * MS_PER_DAY


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    """This module's own 3+3 cluster: its failover test kills a master, which must not
    disturb the session's cluster that the contract suite uses."""
    with RedisClusterServers() as c:
        yield c


@pytest.fixture
def store(cluster: RedisClusterServers) -> Iterator[RedisStore]:
    s = RedisStore(cluster.url, namespace=f"c{uuid.uuid4().hex[:10]}")
    yield s
    s.close()


def _events(small_sim, n: int | None = None) -> EventBatch:
    ev = EventLog(small_sim / "events").read()
    return ev if n is None else ev.take(np.arange(n))


def _ingestor(store, name: str = "ingest") -> StreamingIngestor:
    return StreamingIngestor(store, SETS, name=name, allowed_lateness_ms=LATENESS_MS, dedupe_ttl_ms=DEDUPE_MS)


def _reference(events: EventBatch, batch: int = 200) -> MemoryStore:
    """The exactly-once reference: a memory store fed every event once."""
    ref = MemoryStore("ref")
    ing = _ingestor(ref)
    for a in range(0, len(events), batch):
        ing.ingest(events.take(np.arange(a, min(a + batch, len(events)))))
    return ref


def _assert_same_features(store, ref, events: EventBatch) -> None:
    t = int(events.ts.max()) + 1
    for fs in SETS:
        codes = np.unique(fs.entity.codes(events.take(np.flatnonzero(fs.event_mask(events))))[0])
        got = FeatureLookup(store, [fs]).read(fs.name, codes, t).frame
        want = FeatureLookup(ref, [fs]).read(fs.name, codes, t).frame
        assert values_match(got.values, want.values).all(), fs.name
        assert (got.missing == want.missing).all() and (got.feature_ts == want.feature_ts).all(), fs.name


def _master_of(admin: RedisCluster, key: str) -> int:
    return admin.get_node_from_key(key).port


def _wait_replicated(cluster: RedisClusterServers, timeout_s: float = 10.0) -> None:
    """Until every replica has everything its master wrote (offsets equal)."""
    deadline = time.monotonic() + timeout_s
    for port in cluster.masters():
        with redis.Redis(port=port) as m:
            while True:
                info = m.info("replication")
                if info.get("connected_slaves") and int(info["slave0"]["offset"]) >= int(info["master_repl_offset"]):
                    break
                assert time.monotonic() < deadline, f"replica of {port} did not catch up"
                time.sleep(0.02)


# -- layout --------------------------------------------------------------------------------


def test_an_entitys_records_and_markers_share_a_slot_and_entities_spread_over_every_master(store, cluster, small_sim):
    events = _events(small_sim, 300)
    _ingestor(store).ingest(events)
    admin = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        owners = set()
        for fs in SETS:
            codes = np.unique(fs.entity.codes(events.take(np.flatnonzero(fs.event_mask(events))))[0])
            for key in record_keys(fs, codes[:20]):
                state, values = store.key_name(key), store.key_name(values_key(key))
                assert admin.get(state) is not None and admin.get(values) is not None
                assert admin.keyslot(state) == admin.keyslot(values)
                markers = list(admin.scan_iter(match=f"{store.namespace}:__dedupe__:{{{key.entity_id}}}:*"))
                assert markers and {admin.keyslot(m) for m in markers} == {admin.keyslot(state)}
                owners.add(_master_of(admin, state))
        assert owners == set(cluster.masters())
        assert store.seen(events.event_id.tolist()) == [True] * len(events)  # commit markers: every commit is done
    finally:
        admin.close()


def test_a_cluster_store_written_before_hash_tags_reads_the_same_after_migration(store, cluster):
    """The old cluster layout was the single-node one (plain names): it must not read as empty."""
    from features.online.base import RecordKey

    ns = store.namespace
    old = {f"{ns}:clicks:v1:user:42": b"state", f"{ns}:clicks:v1.v:user:42": b"values", f"{ns}:__dedupe__:7": b"1",
           f"{ns}:__meta__:stream:ingest": b'{"watermark": 5}', f"{ns}:__count__:rate:1": b"3"}
    admin = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        for name, value in old.items():
            admin.set(name, value, px=3_600_000 if "__meta__" not in name else None)
        key = RecordKey("clicks", "v1", "user", "42")
        assert store.get_many([key]) == [None]  # what an unmigrated store would serve
        assert store.migrate_untagged_keys() == 4  # records, marker, meta; the counter keeps its name
        assert store.get_many([key, values_key(key)]) == [b"state", b"values"]
        assert store.seen([7]) == [True] and store.get_meta("stream:ingest") == '{"watermark": 5}'
        assert 0 < admin.pttl(store.key_name(key)) <= 3_600_000
        assert store.incr_many(["rate:1"], [1], 60_000) == [4]
        assert not any(admin.exists(name) for name in old if "__count__" not in name)
        assert store.migrate_untagged_keys() == 0  # idempotent
    finally:
        admin.close()


# -- exactly once across slot groups ----------------------------------------------------------


def test_a_commit_refused_by_one_master_half_way_is_finished_exactly_once_by_redelivery(store, cluster, small_sim):
    """min-replicas-to-write 2 makes one master refuse writes (it has one replica) while the
    others accept theirs: a commit cut between slot groups, as a crash would cut it."""
    events = _events(small_sim, 400)
    ing = _ingestor(store)
    refusing = cluster.masters()[1]
    with redis.Redis(port=refusing) as m:
        m.config_set("min-replicas-to-write", 2)
        try:
            with pytest.raises(StoreUnavailable, match="NOREPLICAS"):
                ing.ingest(events)
        finally:
            m.config_set("min-replicas-to-write", 0)
    written = list(store.iter_keys())
    with RedisCluster(host="127.0.0.1", port=cluster.ports[0]) as admin:
        on = {_master_of(admin, store.key_name(k)) for k in written}
    assert written and refusing not in on  # some groups went in, none on the refusing master
    assert store.seen(events.event_id.tolist()) == [False] * len(events)  # no commit is complete
    res = ing.ingest(events)  # the redelivery
    assert (res.accepted, res.duplicates, res.late) == (len(events), 0, 0)
    _assert_same_features(store, _reference(events), events)
    again = ing.ingest(events)
    assert (again.accepted, again.duplicates) == (0, len(events))
    assert ing.stats().accepted == len(events)


def test_writers_racing_on_the_same_entities_lose_no_update(store, small_sim):
    """Four writers, each with its own share of the events, all touching the same items and
    users: every slot group's script checks what it read, so a lost update would show here."""
    events = _events(small_sim, 800)
    parts = [events.take(np.arange(i, len(events), 4)) for i in range(4)]
    errors: list[BaseException] = []

    def write(part: EventBatch) -> None:
        try:
            ing = _ingestor(RedisStore(store.url, namespace=store.namespace), name="racing")
            for a in range(0, len(part), 25):
                ing.ingest(part.take(np.arange(a, min(a + 25, len(part)))))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    _assert_same_features(store, _reference(events), events)
    assert _ingestor(store, name="racing").stats().accepted == len(events)


def test_after_a_manual_failover_a_commit_is_refused_once_then_lands_and_reads_follow(store, cluster):
    """CLUSTER FAILOVER on a replica swaps it with its master; the store's slot table still
    names the old master. The first commit meets MOVED there: those groups are refused whole
    (StoreUnavailable), the other masters' groups land, the slot table is refreshed, and the
    retry lands everywhere. Reads follow the move at once (their fallback follows MOVED)."""
    from features.online.base import RecordKey, Write

    keys = [RecordKey("f", "v1", "item", str(i)) for i in range(60)]
    store.commit([Write(k, b"a", 3_600_000) for k in keys])
    old = cluster.masters()[0]
    new = cluster.replica_of(old)
    with RedisCluster(host="127.0.0.1", port=new) as admin:
        moved = {k for k in keys if _master_of(admin, store.key_name(k)) == old}
    assert moved and len(moved) < len(keys)
    with redis.Redis(port=new) as r:
        r.execute_command("CLUSTER", "FAILOVER")
    RedisClusterServers._wait(lambda: new in cluster.masters() and old not in cluster.masters(), "the manual failover")
    cluster.wait_healthy()
    with pytest.raises(StoreUnavailable, match="refused a commit group"):
        store.commit([Write(k, b"b", 3_600_000) for k in keys])
    assert store.get_many(keys) == [b"a" if k in moved else b"b" for k in keys]
    store.commit([Write(k, b"b", 3_600_000) for k in keys])
    assert store.get_many(keys) == [b"b"] * len(keys)


# -- a consumer per master, a master killed mid-ingest -----------------------------------------


def _stream_per_master(client: RedisCluster, masters: list[int]) -> list[str]:
    """One stream name per master (a hash tag that lands there), in `masters` order."""
    names: dict[int, str] = {}
    for i in range(1000):
        name = f"events:{{s{i}}}"
        port = client.get_node_from_key(name).port
        names.setdefault(port, name)
        if len(names) == len(masters):
            return [names[p] for p in masters]
    raise LookupError("no hash tag found for some master")


def test_a_consumer_per_master_through_a_master_kill_loses_nothing_and_counts_nothing_twice(cluster, small_sim):
    events = _events(small_sim)
    ns = f"f{uuid.uuid4().hex[:8]}"
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    masters = cluster.masters()
    streams = _stream_per_master(client, masters)
    users = events.user_id % len(streams)
    for i, stream in enumerate(streams):  # each user's events go to one stream, in order
        publish_events(client, stream, events.take(np.flatnonzero(users == i)))
    _wait_replicated(cluster)  # what was published survives the kill
    # the reader: 1 user + every item, as the server's get_groups reads them
    reader_store = RedisStore(cluster.url, namespace=ns)
    items = [str(i) for i in np.unique(events.item_id)]
    groups = [KeyGroup(SETS[0].name, SETS[0].version + ".v", "user", ["1"]), KeyGroup(SETS[1].name, SETS[1].version + ".v", "item", items)]
    reads: list[tuple[float, bool]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                reader_store.get_groups(groups)
                reads.append((t, True))
            except StoreUnavailable:
                reads.append((t, False))
            time.sleep(0.01)

    consumers = [  # each its own clients, as separate processes would have
        RedisStreamConsumer(RedisCluster(host="127.0.0.1", port=cluster.ports[0]), stream,
                            _ingestor(RedisStore(cluster.url, namespace=ns, wait_replicas=1), name=f"stream-s{i}"),
                            consumer=f"c{i}", batch_size=60, block_ms=200, retry_s=(0.05, 0.5))
        for i, stream in enumerate(streams)
    ]
    crashed: list[BaseException] = []

    def consume(c: RedisStreamConsumer) -> None:
        try:
            c.run(idle_exit_s=3.0)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            crashed.append(exc)

    runs = [threading.Thread(target=consume, args=(c,)) for c in consumers]
    reader = threading.Thread(target=read)
    reader.start()
    for r in runs:
        r.start()
    victim = masters[0]
    deadline = time.monotonic() + 60
    while sum(c.stats.messages for c in consumers) < len(events) // 3:
        assert time.monotonic() < deadline, "the consumers made no progress"
        time.sleep(0.01)
    killed_at = time.monotonic()
    cluster.node(victim).kill()
    # a supervisor restarts the crashed server once its replica took over; it rejoins as that
    # replica's replica (until then the promoted master has none, and wait_replicas=1 commits
    # touching it are refused: nothing is acknowledged that a second loss could take)
    RedisClusterServers._wait(lambda: len(cluster.masters()) == len(masters), "the replica's promotion")
    cluster.node(victim).revive()
    for r in runs:
        r.join(120)
    stop.set()
    reader.join(10)
    cluster.wait_healthy()
    try:
        assert not crashed, crashed
        assert not any(r.is_alive() for r in runs), "a consumer did not finish"
        assert victim not in cluster.masters()
        failed_after = [t for t, ok in reads if t >= killed_at and not ok]
        back = [t for t, ok in reads if t >= killed_at and ok and (not failed_after or t > failed_after[-1])]
        assert back, "reads never recovered"
        recovered_s = back[0] - killed_at
        print(f"\nreads after the kill: {len(failed_after)} failed, first success after the last failure "
              f"{recovered_s:.2f} s after the kill; consumer outages: {[c.stats.outages for c in consumers]}")
        assert recovered_s < 10.0
        assert sum(c.stats.outages for c in consumers) >= 1  # the kill did land mid-ingest
        check = RedisStore(cluster.url, namespace=ns)
        _assert_same_features(check, _reference(events), events)
        stats = [_ingestor(check, name=f"stream-s{i}").stats() for i in range(len(streams))]
        assert sum(st.accepted for st in stats) == len(events) and sum(st.late for st in stats) == 0  # each event counted once
        for stream in streams:
            assert client.xpending(stream, "parity-features")["pending"] == 0
        check.close()
    finally:
        reader_store.close()
        client.close()


# -- erasure --------------------------------------------------------------------------------


def test_erasing_a_user_removes_their_keys_from_every_master(store, cluster, sim_copy):
    log = EventLog(sim_copy / "events")
    materialize(log, store, SETS)
    ev = log.read()
    users, counts = np.unique(ev.user_id, return_counts=True)
    uid = int(users[np.argmax(counts)])

    def theirs(port: int) -> list[bytes]:
        with redis.Redis(port=port) as node:
            return [k for k in node.scan_iter(match=f"{store.namespace}:*", count=1000)
                    if k.decode().endswith(f":user:{{{uid}}}") or f":{{{uid}|" in k.decode()]

    before = {p: theirs(p) for p in cluster.masters()}
    assert sum(1 for keys in before.values() if keys) >= 2  # the user's records live on several masters
    rep = delete_user(uid, log=log, store=store, sets=SETS, reason="erasure on a cluster")
    assert rep.online_keys_deleted == sum(len(k) for k in before.values())  # state and values records
    assert all(theirs(p) == [] for p in cluster.masters())


def test_reads_survive_a_node_that_forgot_the_read_script(store, cluster):
    """A node restarted or failed over has no scripts: its group answers NOSCRIPT, which the
    read handles by loading the script there and reading that group again."""
    fs = SETS[0]
    ids = [str(i) for i in range(1, 200)]
    keys = record_keys(fs, np.asarray(ids, dtype=np.int64))
    from features.online.base import Write

    store.commit([Write(k, f"v{k.entity_id}".encode(), 60_000) for k in keys])
    group = [KeyGroup(fs.name, fs.version, "user", ids)]
    assert store.get_groups(group) == [f"v{i}".encode() for i in ids]  # scripts loaded on every master
    for port in cluster.masters():
        redis.Redis(port=port).script_flush()
    assert store.get_groups(group) == [f"v{i}".encode() for i in ids]
    shas = set(store._read_shas.values())
    assert len(shas) == 1  # loaded again where it was missing, not answered by the slow fallback
    assert all(redis.Redis(port=p).script_exists(*shas) == [True] for p in cluster.masters())
