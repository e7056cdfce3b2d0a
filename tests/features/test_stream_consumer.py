"""The Redis Streams consumer against a real (private) redis-server: kill -9 mid-stream,
restart, and nothing is lost or counted twice; no message, however hostile, stops it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from features.batch import BatchEngine
from features.catalog import ItemCatalog
from features.contribution import ContributionLimiter
from features.datasets import load_info, read_items
from features.event_rules import EventRules
from features.eventlog import EventLog
from features.lookup import FeatureLookup
from features.online.base import StoreUnavailable
from features.online.memory import MemoryStore
from features.online.redis_store import RedisStore
from features.redis_stream import RedisStreamConsumer, publish_events
from features.repo import feature_sets
from features.state import StateLayout
from features.streaming import StreamingIngestor
from features.verify import values_match

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[2]
SETS = feature_sets("simulated", 20)


def _consumer(url: str, data: Path, name: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "parity", "features", "stream", "--redis", url, "--stream", "events", "--events", str(data),
           "--consumer", name, "--batch", "40", "--idle-exit", "2", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _entries_read(client: redis.Redis) -> int:
    for g in client.xinfo_groups("events"):
        if g["name"] in (b"parity-features", "parity-features"):
            return int(g.get("entries-read") or 0)
    return 0


def _assert_online_equals_batch(url: str, events) -> None:
    store = RedisStore(url, namespace="parity")
    t = int(events.ts.max()) + 1
    lookup = FeatureLookup(store, SETS)
    for fs in SETS:
        eng = BatchEngine(StateLayout(fs), events)
        online = lookup.read(fs.name, eng.entities, t).frame
        batch = eng.features_asof(eng.entities, np.full(len(eng.entities), t))
        assert values_match(online.values, batch.values).all(), fs.name
        assert (online.missing == batch.missing).all() and (online.feature_ts == batch.feature_ts).all()
    stats = StreamingIngestor(store, SETS, name="stream-events").stats()
    assert stats.accepted == len(np.unique(events.event_id))  # each event counted exactly once
    store.close()


def test_kill_9_mid_stream_then_restart_loses_nothing_and_counts_nothing_twice(small_sim, redis_url):
    events = EventLog(small_sim / "events").read()
    client = redis.Redis.from_url(redis_url)
    pub = subprocess.run([sys.executable, "-m", "parity", "features", "publish", "--redis", redis_url, "--stream", "events",
                          "--events", str(small_sim)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert pub.returncode == 0 and f"published {len(events)} events" in pub.stdout, pub.stderr
    assert client.xlen("events") == len(events)
    first = _consumer(redis_url, small_sim, "consumer-1")
    deadline = time.monotonic() + 60
    while _entries_read(client) < len(events) // 5:
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline, "consumer made no progress"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    read_at_kill = _entries_read(client)
    assert read_at_kill < len(events), "the kill must land mid-stream"
    # A different consumer takes over what the dead one left pending.
    second = _consumer(redis_url, small_sim, "consumer-2", "--claim-idle-ms", "0")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["late"] == 0 and summary["malformed"] == 0
    assert client.xpending("events", "parity-features")["pending"] == 0
    _assert_online_equals_batch(redis_url, events)


def test_malformed_and_late_messages_go_to_the_dead_letter_stream(redis_url, small_sim):
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(redis_url, namespace="dl")
    ing = StreamingIngestor(store, SETS, allowed_lateness_ms=0)
    events = EventLog(small_sim / "events").read()
    publish_events(client, "s", events.take(np.arange(len(events) - 1, len(events))))  # newest first
    publish_events(client, "s", events.take(np.arange(0, 3)))  # far behind the watermark
    client.xadd("s", {"event_id": "x", "ts": "1"})
    cons = RedisStreamConsumer(client, "s", ing, block_ms=100)
    stats = cons.run(idle_exit_s=0.3)
    assert (stats.accepted, stats.late, stats.malformed) == (1, 3, 1)
    dead = client.xrange("s:dead")
    assert len(dead) == 4
    reasons = sorted(d[1][b"reason"].decode().split(":")[0] for d in dead)
    assert reasons == ["late"] * 3 + ["malformed"]
    assert ing.stats().late == 3
    store.close()


# -- poison-proof consumption ------------------------------------------------------------------

POISON = {"event_id": "2", "ts": "1768262770000", "user_id": "5", "item_id": "7", "creator_id": "1", "topic": "2",
          "session_id": "-1", "type": "300", "value": "10"}
VALID = {**POISON, "event_id": "3", "type": "1"}  # a 10 s play of item 7


def _rules(data: Path) -> EventRules:
    return EventRules.from_dataset(load_info(data), ItemCatalog.from_table(read_items(data)))


def _pending(client: redis.Redis, stream: str) -> int:
    return int(client.xpending(stream, "parity-features")["pending"])


def test_a_type_300_message_is_dead_lettered_and_the_valid_event_behind_it_applied_on_the_first_run(redis_url):
    """The tester's reproduction: type=300 overflowed int8 in EventBatch, parse_messages let the
    OverflowError through, the message stayed pending and every restart crashed on it."""
    client = redis.Redis.from_url(redis_url)
    client.xadd("ev", POISON)
    client.xadd("ev", VALID)
    store = RedisStore(redis_url, namespace="poison")
    for run in (1, 2):  # a restart must find nothing left to do
        cons = RedisStreamConsumer(client, "ev", StreamingIngestor(store, SETS), block_ms=100)  # the default rules
        stats = cons.run(idle_exit_s=0.3)
        assert (stats.messages, stats.accepted, stats.out_of_range) == ((2, 1, 1) if run == 1 else (0, 0, 0))
        assert _pending(client, "ev") == 0
    (dead,) = client.xrange("ev:dead")
    assert dead[1][b"reason"].decode().startswith("out of range: type: must be one of")
    assert dead[1][b"type"] == b"300" and dead[1][b"source_id"] == client.xrange("ev")[0][0]
    assert StreamingIngestor(store, SETS).stats().accepted == 1
    store.close()


def test_hostile_messages_are_dead_lettered_with_their_reason_and_the_consumer_never_dies(redis_url, small_sim):
    client = redis.Redis.from_url(redis_url)
    now = int(time.time() * 1000)
    good = {**VALID, "ts": str(now - 1000)}
    hostile = [
        ({**good, "event_id": str(1 << 63)}, "out of range: event_id"),
        ({**good, "event_id": "10", "type": "9"}, "out of range: type"),
        ({**good, "event_id": "11", "user_id": "-5"}, "out of range: user_id"),
        ({**good, "event_id": "12", "item_id": "-1"}, "out of range: item_id"),
        ({**good, "event_id": "13", "topic": "99999"}, "out of range: topic"),
        ({**good, "event_id": "14", "ts": str(now + 86_400_000)}, "out of range: ts"),
        ({**good, "event_id": "15", "value": "1e7"}, "implausible: value"),
        ({**good, "event_id": b"\xff\xfe\xfd"}, "malformed: event_id"),
        ({**good, "event_id": "16", "value": "A" * 1_000_000}, "malformed: value"),
        ({"ts": "1", b"\xff": b"\xfe"}, "malformed: event_id"),
    ]
    for fields, _ in hostile:
        client.xadd("ev", fields)
    client.xadd("ev", {**good, "event_id": "20", "extra": "ignored", "another": "x" * 100_000})  # extra fields: fine
    ing = StreamingIngestor(RedisStore(redis_url, namespace="hostile"), SETS)
    stats = RedisStreamConsumer(client, "ev", ing, block_ms=100, rules=_rules(small_sim)).run(idle_exit_s=0.3)
    assert (stats.messages, stats.accepted) == (len(hostile) + 1, 1)
    assert (stats.out_of_range, stats.implausible, stats.malformed) == (6, 1, 3) and stats.dead_lettered == len(hostile)
    assert _pending(client, "ev") == 0
    dead = client.xrange("ev:dead")
    assert len(dead) == len(hostile)
    for d, (_, reason) in zip(dead, hostile):
        assert d[1][b"reason"].decode().startswith(reason + ": "), d[1][b"reason"]
    assert all(len(v) <= 1100 for _, d in dead for v in d.values())  # a huge field is capped in its dead letter
    assert all(len(d[1][b"reason"]) < 200 for d in dead)


def test_messages_deleted_while_pending_are_acknowledged_and_counted(redis_url):
    client = redis.Redis.from_url(redis_url)
    ing = StreamingIngestor(RedisStore(redis_url, namespace="deleted"), SETS)
    cons = RedisStreamConsumer(client, "ev", ing, block_ms=100, claim_idle_ms=0)
    cons.ensure_group()
    now = int(time.time() * 1000)
    ids = [client.xadd("ev", {**VALID, "event_id": str(i), "ts": str(now)}) for i in range(4)]
    client.xreadgroup("parity-features", "consumer-1", {"ev": ">"}, count=2)  # this consumer, then it "crashed"
    client.xreadgroup("parity-features", "dead-consumer", {"ev": ">"}, count=2)  # another one that died
    client.xdel("ev", ids[0], ids[2])  # one of each consumer's pending messages is deleted
    stats = cons.run(idle_exit_s=0.3)
    assert (stats.accepted, stats.deleted, stats.messages) == (2, 2, 4)
    assert _pending(client, "ev") == 0
    dead = client.xrange("ev:dead")
    assert sorted(d[1][b"source_id"] for d in dead) == sorted([ids[0], ids[2]])
    assert all(d[1][b"reason"].startswith(b"deleted: ") for d in dead)


class _Poisonable:
    """An ingestor that raises on some event ids, like a bug that only certain data triggers."""

    def __init__(self, inner: StreamingIngestor, bad: set[int]) -> None:
        self.inner, self.bad, self.calls = inner, bad, 0

    def __setattr__(self, name, value):
        if name == "dead_letters":
            self.inner.dead_letters = value
        object.__setattr__(self, name, value)

    def ingest(self, events):
        self.calls += 1
        hit = self.bad & set(events.event_id.tolist())
        if hit:
            raise ValueError(f"cannot fold event {min(hit)}")
        return self.inner.ingest(events)


def test_an_ingestor_that_raises_on_some_events_has_them_isolated_and_dead_lettered(redis_url):
    client = redis.Redis.from_url(redis_url)
    now = int(time.time() * 1000)
    for i in range(40):
        client.xadd("ev", {**VALID, "event_id": str(100 + i), "user_id": str(i), "ts": str(now)})
    ing = _Poisonable(StreamingIngestor(MemoryStore("bisect"), SETS), {113, 131})
    stats = RedisStreamConsumer(client, "ev", ing, block_ms=100).run(idle_exit_s=0.3)
    assert (stats.accepted, stats.poison) == (38, 2)
    assert _pending(client, "ev") == 0
    reasons = sorted(d[1][b"reason"].decode() for d in client.xrange("ev:dead"))
    assert reasons == ["poison: the ingestor refused it: ValueError: cannot fold event 113",
                       "poison: the ingestor refused it: ValueError: cannot fold event 131"]
    assert ing.calls < 40  # bisection: fewer calls than events


class _FlakyStore(MemoryStore):
    """Unavailable for the first `failures` commits; records what was pending meanwhile."""

    def __init__(self, client: redis.Redis, failures: int) -> None:
        super().__init__("flaky")
        self.client, self.failures, self.pending_during_outage = client, failures, []

    def transact(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            self.pending_during_outage.append(_pending(self.client, "ev"))
            raise StoreUnavailable("simulated outage")
        return super().transact(*args, **kwargs)


def test_a_store_outage_acknowledges_nothing_and_the_batch_is_retried(redis_url):
    client = redis.Redis.from_url(redis_url)
    now = int(time.time() * 1000)
    for i in range(5):
        client.xadd("ev", {**VALID, "event_id": str(i), "ts": str(now)})
    store = _FlakyStore(client, failures=2)
    cons = RedisStreamConsumer(client, "ev", StreamingIngestor(store, SETS), block_ms=100, retry_s=(0.01, 0.02))
    stats = cons.run(idle_exit_s=0.3)
    assert store.pending_during_outage == [5, 5]  # read, not acknowledged
    assert (stats.outages, stats.accepted, stats.dead_lettered) == (2, 5, 0)
    assert _pending(client, "ev") == 0 and client.xlen("ev:dead") == 0


class _RedirectingClient(redis.Redis):
    """A stream client whose ack transactions first meet the given cluster refusals, as a
    consumer's did in CI while a killed master came back as a replica (MovedError)."""

    def __init__(self, url: str, refusals: list[Exception]) -> None:
        super().__init__(connection_pool=redis.ConnectionPool.from_url(url))
        self.refusals = refusals

    def pipeline(self, *args, **kwargs):
        pipe = super().pipeline(*args, **kwargs)
        refusals, run = self.refusals, pipe.execute

        def execute(*a, **kw):
            if refusals:
                pipe.reset()
                raise refusals.pop(0)
            return run(*a, **kw)

        pipe.execute = execute
        return pipe


def test_a_cluster_redirect_on_the_ack_is_an_outage_not_a_crash(redis_url):
    from redis.exceptions import ClusterDownError, MovedError, ReadOnlyError, TryAgainError

    refusals = [MovedError("3999 127.0.0.1:7001"), TryAgainError("TRYAGAIN"), ClusterDownError("CLUSTERDOWN"),
                ReadOnlyError("READONLY You can't write against a read only replica.")]
    client = _RedirectingClient(redis_url, list(refusals))
    now = int(time.time() * 1000)
    for i in range(5):
        client.xadd("ev", {**VALID, "event_id": str(i), "ts": str(now)})
    store = MemoryStore("redirect")
    cons = RedisStreamConsumer(client, "ev", StreamingIngestor(store, SETS), block_ms=100, retry_s=(0.01, 0.02))
    stats = cons.run(idle_exit_s=0.3)
    # each refusal left the batch pending; the re-read found its events already applied. The
    # consumer counts the acknowledged pass (once per message), the store the one that applied.
    assert client.refusals == [] and stats.outages == len(refusals)
    assert (stats.messages, stats.accepted, stats.duplicates, stats.dead_lettered) == (5, 0, 5, 0)
    assert _pending(client, "ev") == 0 and client.xlen("ev:dead") == 0
    assert StreamingIngestor(store, SETS).stats().accepted == 5  # counted once


def test_a_bug_on_the_ack_still_raises(redis_url):
    client = _RedirectingClient(redis_url, [redis.exceptions.ResponseError("ERR wrong number of arguments")])
    client.xadd("ev", {**VALID, "event_id": "1", "ts": str(int(time.time() * 1000))})
    cons = RedisStreamConsumer(client, "ev", StreamingIngestor(MemoryStore("bug"), SETS), block_ms=100, retry_s=(0.01, 0.02))
    with pytest.raises(redis.exceptions.ResponseError, match="wrong number"):
        cons.run(idle_exit_s=0.3)
    assert _pending(client, "ev") == 1  # nothing acknowledged


def test_events_over_a_users_contribution_cap_are_dead_lettered_as_rate_limited(redis_url, small_sim):
    client = redis.Redis.from_url(redis_url)
    now = int(time.time() * 1000)
    for i in range(30):
        client.xadd("ev", {**VALID, "event_id": str(i), "ts": str(now - 30 + i)})
    store = RedisStore(redis_url, namespace="limited")
    cons = RedisStreamConsumer(client, "ev", StreamingIngestor(store, SETS), block_ms=100, rules=_rules(small_sim),
                               limiter=ContributionLimiter(store), batch_size=7)
    stats = cons.run(idle_exit_s=0.3)
    assert (stats.accepted, stats.rate_limited) == (20, 10)
    dead = client.xrange("ev:dead")
    assert len(dead) == 10 and dead[0][1][b"reason"] == b"rate limited: user 5 sent more than 20 play events for item 7 within one 1 h window"
    assert _pending(client, "ev") == 0
    store.close()


def _stream_cli(url: str, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "parity", "features", "stream", "--redis", url, "--stream", "ev", "--events", str(data),
           "--idle-exit", "2", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_cli_consumer_survives_the_poison_message_and_applies_what_follows(redis_url, small_sim):
    client = redis.Redis.from_url(redis_url)
    client.xadd("ev", POISON)
    client.xadd("ev", VALID)
    now = int(time.time() * 1000)
    for i in range(25):  # one user replaying one item: over the default cap of 20 per hour
        client.xadd("ev", {**VALID, "event_id": str(1000 + i), "user_id": "9", "ts": str(now - 100 + i)})
    first = _stream_cli(redis_url, small_sim)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert (summary["messages"], summary["accepted"], summary["out_of_range"], summary["rate_limited"]) == (27, 21, 1, 5)
    assert _pending(client, "ev") == 0 and client.xlen("ev:dead") == 6
    second = _stream_cli(redis_url, small_sim)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1])["messages"] == 0
    assert StreamingIngestor(RedisStore(redis_url, namespace="parity"), SETS, name="stream-ev").stats().accepted == 21
