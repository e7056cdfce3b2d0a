"""A feature set served streaming, materialised or computed on read gives the server the same
values, so the same answers; the server reports each set's mode, staleness and bytes read;
live events reach an on_read set, and skip a materialised one until its next run."""
from __future__ import annotations

import numpy as np
import pytest

from features.modes import load_mode
from server.app import BackgroundServer
from server.client import LiveEvent, ParityClient

USERS = list(range(1, 25))


def _answers(c: ParityClient) -> dict:
    return {u: [(i.item_id, round(i.score, 5)) for i in c.recommend(u, k=10).items] for u in USERS}


@pytest.fixture(scope="module")
def streaming_answers(release_dir, small_sim):
    from tests.server.conftest import ADMIN_TOKEN, _make_config

    with BackgroundServer(_make_config(release_dir, small_sim, response_cache_ttl_s=0.0, drift_interval_s=0)) as s, \
            ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=ADMIN_TOKEN) as c:
        return _answers(c)


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
@pytest.mark.parametrize("modes", ["user_activity=on_read,user_topic=on_read:cap=8", "user_creator=on_read:cap=4,item_popularity=on_read",
                                   "user_activity=materialized:15m,user_creator=materialized:1h"])
def test_every_mode_gives_the_same_answers_and_the_server_reports_it(backend, modes, streaming_answers, release_dir, small_sim, server_config,
                                                                     admin_token, request):
    extra = {} if backend == "memory" else {"store": request.getfixturevalue("redis_url"), "namespace": f"modes-{abs(hash(modes)) % 10**6}",
                                           "materialize": "always"}
    cfg = server_config(release_dir, small_sim, response_cache_ttl_s=0.0, drift_interval_s=0, modes=modes, **extra)
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        assert _answers(c) == streaming_answers
        st = c.status()
        want = dict(m.split("=", 1) for m in modes.split(","))
        for name, spec in want.items():
            mode = load_mode(s.service.store, s.service.sets_by_name[name])
            assert mode.spec.startswith(spec.split(":")[0])
            if name in st.feature_sets:  # the item set is read in bulk, not per request
                assert st.feature_sets[name]["mode"] == mode.spec
        ua = st.feature_sets["user_activity"]
        assert ua["served"] > 0 and ua["bytes_read"] > 0 and ua["staleness_p50_ms"] >= 0


def test_live_events_reach_an_on_read_set_at_once_and_a_materialised_one_at_its_next_run(release_dir, small_sim, server_config, admin_token):
    cfg = server_config(release_dir, small_sim, response_cache_ttl_s=0.0, feature_cache_ttl_s=0.0, drift_interval_s=0,
                        modes="user_activity=on_read,user_topic=materialized:1h")
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=10.0, admin_token=admin_token) as c:
        now = c.status().now_ms
        user, item = 7, 3
        cat = s.service.state.current.items.catalog
        topic = int(cat.topic[cat.index(np.array([item]))[0]])
        before = c.get_features("user", user, ["user_activity"])[0]
        pair_before = c.get_features("user_topic", f"{user}|{topic}", ["user_topic"])[0]
        r = c.ingest([LiveEvent("8300000001", now - 1000, user, item, "play", 30.0)])
        assert r.accepted == 1
        after = c.get_features("user", user, ["user_activity"])[0]
        assert after.feature_ts_ms == now - 1000  # the on_read set saw the live event at once
        assert {k for k in after.values if after.values[k] != before.values.get(k)}
        # the materialised set was not written by the ingestor: it reads as of its last run
        pair_after = c.get_features("user_topic", f"{user}|{topic}", ["user_topic"])[0]
        assert pair_after.feature_ts_ms == pair_before.feature_ts_ms < now - 1000
        assert load_mode(s.service.store, s.service.sets_by_name["user_topic"]).every_ms == 3_600_000
