"""The Redis Streams consumer against a real (private) redis-server: kill -9 mid-stream,
restart, and nothing is lost or counted twice."""
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
from features.eventlog import EventLog
from features.lookup import FeatureLookup
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
