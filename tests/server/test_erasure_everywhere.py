"""Erasure everywhere: after Admin DeleteUser, a search of every store finds nothing of the
user, the audit says what went, and their next request is answered as a new user's."""
from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

from features.contribution import ContributionLimiter
from features.datasets import load_info
from features.eventlog import EventLog
from features.lookup import record_keys
from features.offline import OfflineStore
from features.repo import feature_sets
from monitor.erase import rows_of_user
from server.app import BackgroundServer
from server.client import LiveEvent, ParityClient
from server.erasure import ERASURE_AUDIT
from server.seen import seen_key


def _heavy_user(data) -> int:
    ev = EventLog(data / "events").read()
    users, counts = np.unique(ev.user_id, return_counts=True)
    return int(users[np.argmax(counts)])


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_deleted_user_is_nowhere_and_is_served_as_new(backend, request, sim_copy, release_dir, server_config, admin_token, tmp_path):
    data = sim_copy
    info = load_info(data)
    sets = feature_sets(info.kind, info.n_topics)
    OfflineStore(data / "offline").build(EventLog(data / "events"), sets)
    user, stranger = _heavy_user(data), 98_765_432
    extra = {} if backend == "memory" else {"store": request.getfixturevalue("redis_url"), "namespace": f"erase-{uuid.uuid4().hex[:8]}"}
    cfg = server_config(release_dir, data, served_log=tmp_path / "served", log_sample=1.0, drift_interval_s=0, **extra)
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        svc = s.service
        first = c.recommend(user, k=5)
        c.recommend(user, k=5)  # cached
        now = svc.clock.now_ms()
        c.ingest([LiveEvent(8_000_001, now + 1, user, first.items[0].item_id, "impression", 1.0, request_id=first.request_id),
                  LiveEvent(8_000_002, now + 2, user, first.items[0].item_id, "play", 30.0, request_id=first.request_id)])
        assert s.run(_has_seen(svc, user))
        c.recommend(user, k=5)  # cached again after the live events invalidated the first copy
        out = c.delete_user(user, "user asked to be forgotten")
        assert out["online_keys_deleted"] > 0 and out["served_log_rows_removed"] > 0 and out["cache_entries_dropped"] > 0

        # every store, searched
        assert len(EventLog(data / "events").read(user_ids=[user])) == 0
        off = OfflineStore(data / "offline")
        assert all(user not in off.events(fs).user_id for fs in sets if off.has(fs))
        store = svc.write_store
        for fs in sets:
            if fs.entity.keys[0] == "user_id" and not fs.entity.is_pair:
                assert store.get_many(record_keys(fs, [user])) == [None]
        leftover = [k for k in store.iter_keys() if k.entity_id.split("|")[0] == str(user) and k.entity_type.startswith("user")]
        assert leftover == []
        assert store.get_many([seen_key(user)]) == [None]
        assert store.delete_counters(ContributionLimiter(store).user_counters(user)) == 0
        assert rows_of_user(tmp_path / "served", user) == 0
        assert not any(k.endswith(f":{user}") for k in svc.records.stale._d)
        audit = [json.loads(x) for x in (data / "events" / ERASURE_AUDIT).read_text().splitlines()]
        assert audit[-1]["user_id"] == user and audit[-1]["audit_id"] == out["audit_id"] and "user asked" in audit[-1]["reason"]

        # served as a new user: the same answer as someone never seen, once the item table caught up
        s.run(svc.refresh_items(force=True))
        again, fresh = c.recommend(user, k=5), c.recommend(stranger, k=5)
        assert [i.item_id for i in again.items] == [i.item_id for i in fresh.items]
        np.testing.assert_allclose([i.score for i in again.items], [i.score for i in fresh.items], rtol=1e-6)
        assert not again.degraded
        # a second erasure finds nothing
        assert c.delete_user(user, "again")["online_keys_deleted"] == 0


async def _has_seen(svc, user):
    return svc.write_store.get_many([seen_key(user)])[0] is not None


@pytest.mark.redis
def test_an_erasure_on_one_worker_reaches_the_memory_of_the_others(sim_copy, release_dir, server_config, admin_token, redis_url, tmp_path):
    """Two workers of a fleet share the Redis store and the served-log folder. Worker B holds the
    user in its caches (kept for 10 minutes here) and in the served-log part it is writing;
    DeleteUser runs on A; within a poll B forgets them: its answer is a new user's and its part
    has none of their rows."""
    data = sim_copy
    user, stranger = _heavy_user(data), 98_765_433
    common = dict(store=redis_url, namespace=f"fleet-{uuid.uuid4().hex[:8]}", served_log=tmp_path / "served", log_sample=1.0,
                  drift_interval_s=0, rollout_poll_s=0.2, feature_cache_ttl_s=600.0, response_cache_ttl_s=600.0)
    with BackgroundServer(server_config(release_dir, data, **common)) as a, BackgroundServer(server_config(release_dir, data, **common)) as b, \
            ParityClient(f"127.0.0.1:{a.port}", timeout_s=10.0, admin_token=admin_token) as ca, \
            ParityClient(f"127.0.0.1:{b.port}", timeout_s=10.0, admin_token=admin_token) as cb:
        before = cb.recommend(user, k=5)
        assert cb.recommend(user, k=5).items == before.items  # cached in B
        assert any(k.endswith(f":{user}") for k in b.service.records.stale._d)
        ca.delete_user(user, "user asked to be forgotten")
        deadline = time.monotonic() + 10
        while b.service._erasure_seq < 1:  # B's poll (every 0.2 s here)
            assert time.monotonic() < deadline, "worker B never applied the erasure notice"
            time.sleep(0.05)
        assert not any(k.endswith(f":{user}") for k in b.service.records.stale._d)
        assert rows_of_user(tmp_path / "served", user) == 0  # B's part was finished and rewritten too
        b.run(b.service.refresh_items(force=True))
        again, fresh = cb.recommend(user, k=5), cb.recommend(stranger, k=5)
        assert [i.item_id for i in again.items] == [i.item_id for i in fresh.items]
        assert a.service._erasure_seq == 1 and b.service.erasures.since(0).users == (user,)


def test_erasure_notices_keep_the_recent_ones_and_say_when_a_worker_missed_some():
    from features.online.memory import MemoryStore
    from server import erasure_notices
    from server.erasure_notices import ErasureNotices

    n = ErasureNotices(MemoryStore())
    assert n.since(0).seq == 0 and n.since(0).users == ()
    assert [n.publish(u) for u in (7, 8, 7)] == [1, 2, 3]
    assert n.since(1).users == (8, 7) and not n.since(1).missed_some and n.since(3).users == ()
    old = erasure_notices.KEEP
    erasure_notices.KEEP = 2
    try:
        n.publish(9)
        got = n.since(1)
        assert got.seq == 4 and got.users == (7, 9) and got.missed_some  # notice 2 (user 8) is gone: forget everyone
        assert not n.since(2).missed_some
    finally:
        erasure_notices.KEEP = old
