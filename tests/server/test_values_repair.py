"""The server reads served-values records; where one is past its exact interval it reads the
state instead (same answer) and repairs the record off the request path, after which the same
request needs no state read."""
from __future__ import annotations

import pytest

from features.online.base import RecordKey
from features.served_values import expired, served_values
from server.app import BackgroundServer
from server.client import ParityClient


def _fallbacks(s) -> float:
    return s.service.metrics.values_fallbacks._value.get()


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_values_record_past_its_interval_is_answered_from_the_state_then_repaired(backend, release_dir, small_sim, server_config, admin_token, request):
    extra = {} if backend == "memory" else {"store": request.getfixturevalue("redis_url"), "namespace": f"vr-{backend}"}
    cfg = server_config(release_dir, small_sim, response_cache_ttl_s=0.0, feature_cache_ttl_s=0.0, drift_interval_s=0, **extra)
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        svc = s.service
        svc.values_repair.interval_s = 3600.0  # repairs only when this test drains
        plan = svc.state.current.plan
        now = svc.clock.now_ms()
        # a user whose values records were written at their last event and changed since (the replay clock is past it)
        user = next(u for u in range(1, 300) if len(plan.expired(svc.store.get_many(plan.keys(u)), now)))
        n_expired = len(plan.expired(svc.store.get_many(plan.keys(user)), now))
        before = _fallbacks(s)
        first = c.recommend(user, k=10)
        assert _fallbacks(s) - before >= n_expired  # read from the states
        assert svc.values_repair.pending() >= n_expired
        assert s.run(svc.values_repair.drain()) >= n_expired
        later = svc.clock.now_ms()
        assert len(plan.expired(svc.store.get_many(plan.keys(user)), later)) == 0  # the records answer again
        mid = _fallbacks(s)
        second = c.recommend(user, k=10)
        assert _fallbacks(s) == mid  # no state read this time
        assert [(i.item_id, round(i.score, 6)) for i in second.items] == [(i.item_id, round(i.score, 6)) for i in first.items]
        # a repaired record equals the state's values at its time
        key = plan.state_keys(user)[0]
        lay = plan.user_layout
        vk = RecordKey(key.feature_set, key.version + ".v", key.entity_type, key.entity_id)
        rec, st = svc.store.get_many([vk, key])
        assert not expired(lay, [rec], later)[0]
        got = served_values(lay).read([rec], later).frame
        from features.state import read_features
        want = read_features(lay, lay.decode([st])[0], later)
        assert (got.values == want.values).all() and (got.missing == want.missing).all()
