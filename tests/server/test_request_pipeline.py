"""The request path computes what training and the offline evaluation compute: the same ranker
inputs as the point-in-time join, the same ANN candidates; plus cold start (new items through
the item tower's content path, a catalogue that grows while serving) and the small pure parts."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.assemble import RETRIEVAL_COLUMNS, RankerInputs, retrieval_columns
from features.catalog import ItemCatalog
from features.datasets import ITEMS_FILE, read_items
from features.eventlog import EventLog
from features.history import history_at
from features.pit import PitJoiner
from server import pipeline
from server.app import BackgroundServer
from server.bootstrap import build_service
from server.caches import Breaker, Generations
from server.client import ParityClient
from server.pipeline import Ranked, Timer
from server.seen import decode_seen, encode_seen


@pytest.fixture(scope="module")
def service(release_dir, small_sim, server_config):
    svc = build_service(server_config(release_dir, small_sim))
    yield svc
    svc.cpu.shutdown()
    svc.io.shutdown()


def test_online_ranker_inputs_equal_the_training_point_in_time_join(service, small_sim):
    from models.data import feature_matrix  # the training path (test process only)

    snap = service.state.current
    now = service.clock.now_ms()
    events = EventLog(small_sim / "events").read().deduplicated()
    users = np.bincount(events.user_id).argsort()[-3:]
    sets = [service.sets_by_name[n] for n in snap.runtime.inputs.sets]
    joiner = PitJoiner(sets, events)
    catalog = ItemCatalog.from_table(read_items(small_sim))
    for user in users.tolist():
        uf = snap.plan.decode(user, snap.plan.read_records(service.store, user, now), now)
        items = catalog.item_id
        rt = snap.runtime
        # the list-relative retrieval columns are the request's own (not features): given, and written as given
        retrieval = retrieval_columns(np.linspace(1.0, -1.0, len(items)), items, pipeline.user_history(uf, 20)[0], rt.item_item)
        online = pipeline.feature_matrix(snap, uf, snap.items.rows(items), now, retrieval=retrieval)
        base = [c for c in rt.inputs.columns if c not in RETRIEVAL_COLUMNS]
        spec = RankerInputs(rt.inputs.user_set, rt.inputs.item_set, rt.inputs.pair_sets, rt.inputs.affinity, tuple(base))
        offline = feature_matrix(spec, joiner, sets, catalog, np.full(len(items), user), items, now)
        cols = list(rt.inputs.columns)
        np.testing.assert_allclose(online[:, [cols.index(c) for c in base]], offline, rtol=1e-6, atol=1e-6, equal_nan=True)
        for c in (c for c in cols if c in RETRIEVAL_COLUMNS):
            v, m = retrieval[c]
            np.testing.assert_allclose(online[:, cols.index(c)], np.where(m, np.nan, v).astype(np.float32), equal_nan=True)
        np.testing.assert_array_equal(pipeline.user_matrix(snap, uf)[0], rt.user_inputs(online[:1])[0])


def test_the_trend_inputs_are_served_as_the_batch_path_derives_them(service, small_sim):
    """Every release reads the trend inputs (features.assemble.TREND_COLUMNS, the topic share);
    the server derives them from its item and pair blocks, training from the join: same numbers."""
    from features.assemble import TOPIC_SHARE
    from models.data import feature_matrix

    snap = service.state.current
    rt = snap.runtime
    now = service.clock.now_ms()
    trend = [c for c in rt.inputs.columns if c.startswith("trend.")]
    assert TOPIC_SHARE in trend and "trend.item_plays_1d_7d" in trend and "trend.user_topic_recency" in trend
    events = EventLog(small_sim / "events").read().deduplicated()
    user = int(np.bincount(events.user_id).argmax())
    sets = [service.sets_by_name[n] for n in rt.inputs.sets]
    catalog = ItemCatalog.from_table(read_items(small_sim))
    items = catalog.item_id
    uf = snap.plan.decode(user, snap.plan.read_records(service.store, user, now), now)
    retrieval = retrieval_columns(np.linspace(1.0, -1.0, len(items)), items, pipeline.user_history(uf, 20)[0], rt.item_item)
    online = pipeline.feature_matrix(snap, uf, snap.items.rows(items), now, retrieval=retrieval)
    base = tuple(c for c in rt.inputs.columns if c not in RETRIEVAL_COLUMNS)
    offline = feature_matrix(RankerInputs(rt.inputs.user_set, rt.inputs.item_set, rt.inputs.pair_sets, rt.inputs.affinity, base),
                             PitJoiner(sets, events), sets, catalog, np.full(len(items), user), items, now)
    cols = list(rt.inputs.columns)
    for c in trend:
        np.testing.assert_allclose(online[:, cols.index(c)], offline[:, base.index(c)], rtol=1e-6, equal_nan=True)
    assert len(np.unique(online[:, cols.index("trend.item_plays_1d_7d")])) > 1  # it moves from item to item


def test_ann_candidates_are_the_offline_evaluations(service, small_sim):
    snap = service.state.current
    now = service.clock.now_ms()
    events = EventLog(small_sim / "events").read()
    user = int(np.bincount(events.user_id).argmax())
    uf = snap.plan.decode(user, snap.plan.read_records(service.store, user, now), now)
    engaged = (events.type == 1) | (events.type == 2)
    seen = set(events.item_id[engaged & (events.user_id == user)].tolist())
    assert set(uf.seen.tolist()) == seen
    cand = pipeline.retrieve(snap, uf, np.empty(0, np.int64), now, service.cfg, Timer())
    # the training-time history of this user as of now is what the server's seen record gives the tower
    # (the record holds the whole log: as of its end, or of now if the clock has passed it)
    H = history_at(events.deduplicated(), "simulated", np.array([user]), max(now, int(events.ts.max()) + 1), snap.runtime.history_len)
    assert pipeline.user_history(uf, snap.runtime.history_len).tolist() == H.tolist()
    emb = snap.runtime.user_embeddings(pipeline.user_matrix(snap, uf), H)
    ids, _ = snap.runtime.retrieve(emb, len(snap.runtime.vocab))
    k = pipeline.release_policy(service.cfg.candidates, snap.runtime.release.meta.candidates).retrieve_k  # the release's quota
    expect = [x for x in ids[0].tolist() if x not in seen][:k]
    assert cand.ids[cand.source == 0].tolist() == expect
    assert not seen & set(cand.ids.tolist())


def _append_item(data_dir, item_id: int, publish_ts: int) -> None:
    t = read_items(data_dir)
    row = {c: t.column(c)[0].as_py() for c in t.column_names}
    row.update(item_id=item_id, publish_ts=publish_ts, title=f"new {item_id}")
    new = pa.concat_tables([t, pa.Table.from_pylist([row], schema=t.schema)])
    tmp = data_dir / (ITEMS_FILE + ".tmp")
    pq.write_table(new, tmp)
    tmp.replace(data_dir / ITEMS_FILE)


def test_new_items_are_recommended_through_their_content_embedding_even_when_added_while_serving(release_dir, sim_copy, server_config, admin_token):
    cfg = server_config(release_dir, sim_copy, item_refresh_s=0.1, response_cache_ttl_s=0.0)
    with BackgroundServer(cfg) as s, ParityClient(f"127.0.0.1:{s.port}", timeout_s=5, admin_token=admin_token) as c:
        now = c.status().now_ms
        assert c.status().catalogue_items == 60
        _append_item(sim_copy, 100_000, now - 3_600_000)
        _append_item(sim_copy, 100_001, now + 86_400_000)  # not published yet: never recommended
        s.run(s.service.refresh_items())
        assert c.status().catalogue_items == 62
        assert s.service.state.current.new_ids.tolist() == [100_000, 100_001]
        rec = c.recommend(3, k=200)
        got = {i.item_id: i.source for i in rec.items}
        assert got.get("100000") == "content"
        assert "100001" not in got
        assert np.isfinite(c.rank(3, ["100000"]).items[0].score)


def test_post_process_orders_by_score_then_id_and_caps_creators():
    ids = np.arange(10, dtype=np.int64)
    scores = np.asarray([0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=np.float32)
    creators = np.asarray([1, 1, 1, 1, 2, -1, -1, 2, 3, 3])
    r = Ranked(ids, scores, np.zeros(10, np.int8))
    assert pipeline.post_process(r, creators, 5, 0).tolist() == [0, 1, 2, 3, 4]
    assert pipeline.post_process(r, creators, 5, 2).tolist() == [0, 1, 4, 5, 6]  # unknown creators are not capped
    assert pipeline.post_process(r, creators, 10, 1).tolist() == [0, 4, 5, 6, 8, 1, 2, 3, 7, 9]  # backfilled


def test_seen_records_keep_the_most_recent_distinct_items():
    raw = encode_seen(np.asarray([5, 6, 5, 7, 8]), cap=3)
    assert decode_seen(raw).tolist() == [5, 7, 8]
    assert decode_seen(None).tolist() == []


def test_breaker_opens_on_failure_and_lets_one_probe_through_later():
    now = [0.0]
    b = Breaker(1.0, clock=lambda: now[0])
    assert b.allow()
    b.failure()
    assert not b.allow()
    now[0] = 1.5
    assert b.allow() and not b.allow()  # one probe
    b.success()
    assert b.allow() and b.allow()


def test_generations_change_when_users_get_live_events():
    g = Generations(max_users=2)
    a = g.get(1)
    g.bump(1)
    assert g.get(1) != a
    g.bump(2)
    g.bump(3)  # evicts user 1: its keys change epoch, never collide with old ones
    assert g.get(1) != a


def test_pair_features_read_after_retrieval_give_the_same_answers_as_prefetched_ones(release_dir, small_sim, server_config):
    """With too many pair values to prefetch, a second round trip reads them for the candidates
    only; the answers must not change. A one-day tick pins both servers to the same as-of time."""
    import asyncio

    from parity_api.v1 import recommender_pb2 as pb
    from server.validation import validate_rank, validate_recommend

    day = 86_400_000
    one = build_service(server_config(release_dir, small_sim, as_of_tick_ms=day, response_cache_ttl_s=0.0))
    two = build_service(server_config(release_dir, small_sim, as_of_tick_ms=day, response_cache_ttl_s=0.0, pair_prefetch_limit=0))
    assert not one.state.current.plan.deferred and len(two.state.current.plan.deferred) == 2

    async def run():
        await one.start()
        await two.start()
        try:
            for user in (3, 17, 2_000_000):
                q = validate_recommend(pb.RecommendRequest(user_id=str(user), k=20, include_latency=True), one.cfg)
                a, b = await one.recommend(q), await two.recommend(q)
                assert [i for i, _, _ in a.items] == [i for i, _, _ in b.items]
                np.testing.assert_allclose([s for _, s, _ in a.items], [s for _, s, _ in b.items], rtol=1e-6)
                assert "pair_features" in dict(b.latency) and not b.degraded
                r = validate_rank(pb.RankRequest(user_id=str(user), item_ids=["1", "2", "30"]), one.cfg)
                np.testing.assert_allclose([s for _, s, _, _ in (await one.rank(r)).items], [s for _, s, _, _ in (await two.rank(r)).items], rtol=1e-6)
        finally:
            await one.close()
            await two.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def candidates_service(small_sim, server_config, tmp_path_factory):
    """A release whose rankers learned on candidate lists (the MovieLens way), served."""
    from pipeline.train import train_release

    rel = train_release(small_sim, tmp_path_factory.mktemp("cand-releases"), profile="tiny", seed=0, ranker_rows="candidates")
    svc = build_service(server_config(rel.path, small_sim))
    yield svc
    svc.cpu.shutdown()
    svc.io.shutdown()


def test_a_candidate_list_rankers_inputs_online_equal_the_offline_evaluations(candidates_service, small_sim):
    """The retrieval columns (rank and score gap in the list, item-item score for the history)
    come out of the server exactly as parity eval computes them: offline features +
    retrieval_columns of the exact scores and of the history as of now."""
    from features.assemble import RETRIEVAL_COLUMNS, RankerInputs, retrieval_columns
    from models.data import feature_matrix

    svc = candidates_service
    snap = svc.state.current
    rt = snap.runtime
    assert rt.inputs.uses_retrieval and rt.release.manifest["config"]["ranker_rows"] == "candidates"
    now = svc.clock.now_ms()
    events = EventLog(small_sim / "events").read().deduplicated()
    sets = [svc.sets_by_name[n] for n in rt.inputs.sets]
    joiner = PitJoiner(sets, events)
    catalog = ItemCatalog.from_table(read_items(small_sim))
    base = RankerInputs(rt.inputs.user_set, rt.inputs.item_set, rt.inputs.pair_sets, rt.inputs.affinity,
                        tuple(c for c in rt.inputs.columns if c not in RETRIEVAL_COLUMNS))
    for user in np.bincount(events.user_id).argsort()[-2:].tolist():
        uf = snap.plan.decode(user, snap.plan.read_records(svc.store, user, now), now)
        timer = Timer()
        cand = pipeline.retrieve(snap, uf, np.empty(0, np.int64), now, svc.cfg, timer)
        ranked = pipeline.rank(snap, uf, cand, now, timer)
        H = history_at(events, "simulated", np.array([user]), max(now, int(events.ts.max()) + 1), rt.history_len)
        emb = rt.user_embeddings(snap.runtime.user_inputs(feature_matrix(base, joiner, sets, catalog, np.array([user]), cand.ids[:1], now)), H)
        Hii = history_at(events, "simulated", np.array([user]), max(now, int(events.ts.max()) + 1), rt.item_item.history_len)
        rc = retrieval_columns(rt.item_scores(emb[0], cand.ids), cand.ids, Hii[0], rt.item_item)
        assert rt.inputs.uses_item_item and not rc["retrieval.item_item"][1].all()  # a heavy user's history scores candidates
        Xb = feature_matrix(base, joiner, sets, catalog, np.full(len(cand.ids), user), cand.ids, now)
        pos = {c: j for j, c in enumerate(base.columns)}
        X = np.stack([np.where(rc[c][1], np.nan, rc[c][0]) if c in rc else Xb[:, pos[c]] for c in rt.inputs.columns], axis=1)
        np.testing.assert_allclose(ranked.scores, rt.score(X.astype(np.float32), "student_int8"), rtol=1e-5, atol=1e-6)
        assert sorted(rc["retrieval.rank"][0].tolist()) == list(range(len(cand.ids)))
        # Rank (given items, no retrieval) computes the user embedding itself
        s = pipeline.score_items(snap, uf, cand.ids[:5], now, Timer()).scores
        assert s.shape == (5,) and np.isfinite(s).all()
