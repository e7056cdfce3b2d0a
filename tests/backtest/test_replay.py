"""The backtest runs the server's path on parity eval's held-out slice: fresh it is eval, stale
records are read as of the past and decoded now, a dropped read is the server's degraded
answer, and a read past its budget is a dropped read."""
from __future__ import annotations

import numpy as np

from backtest.conditions import FRESH, USER_RECORD, Condition
from backtest.latency import LatencyModel
from backtest.replay import Replay
from features.batch import BatchEngine
from features.eventlog import EventLog
from features.events import EventType
from features.state import StateLayout
from pipeline.evaluate import evaluate_release

HOUR = 3_600_000


def test_the_fresh_and_complete_condition_is_parity_evals_int8_two_stage_to_the_last_digit(replay, release_dir, small_sim):
    ev = evaluate_release(release_dir, small_sim)
    res = replay.run([Condition(FRESH, "fresh")])
    assert res.users == ev.users and res.release_id == ev.release_id
    assert res.fresh.ndcg == ev.two_stage["student_int8"]["ndcg@10"]
    assert res.fresh.recall == ev.two_stage["student_int8"]["recall@10"]


def _recent_play(small_sim):
    """(user, t): just after one of the user's plays, so their 1-hour play count is positive at t."""
    events = EventLog(small_sim / "events").read().deduplicated()
    i = int(np.flatnonzero(events.type == EventType.PLAY)[-1])
    return int(events.user_id[i]), int(events.ts[i]) + 1, events


def test_a_stale_record_is_read_as_of_t_minus_s_at_t_so_a_one_hour_count_rolls_to_zero(replay, small_sim):
    user, t, events = _recent_play(small_sim)
    snap = replay.snapshot(replay.item_table(t))
    fs = replay.sets["user_activity"]
    col = "user_activity.plays_1h"

    def read(staleness_ms: int):
        rr, _, _ = replay.read_user(snap, user, t, Condition("user_activity", "staleness", staleness_ms=staleness_ms), np.random.default_rng(0))
        return snap.plan.decode(user, rr.raw, t).columns

    batch = BatchEngine(StateLayout(fs), events).features_asof(np.array([user]), np.array([t]))  # the batch path as of t
    fresh = read(0)
    assert fresh[col][0][0] == batch.column("plays_1h")[0] >= 1 and not fresh[col][1][0]
    for c in fs.columns:  # every column of the fresh read is the batch path's value at t
        assert fresh[f"user_activity.{c}"][0][0] == batch.column(c)[0]
    stale = read(2 * HOUR)
    assert stale[col][0][0] == 0.0 and not stale[col][1][0]  # a count reads 0 (not missing) once its window has rolled past
    assert stale["user_activity.plays_7d"][0][0] >= 0 and stale["user_activity.plays_7d"][1][0] == fresh["user_activity.plays_7d"][1][0]
    half = read(30 * 60_000)  # between: only plays older than 30 minutes, still inside the hour window
    assert 0 <= half[col][0][0] <= fresh[col][0][0]


def test_staleness_shifts_only_the_varied_set(replay, small_sim):
    user, t, _ = _recent_play(small_sim)
    snap = replay.snapshot(replay.item_table(t))
    rr0, _, _ = replay.read_user(snap, user, t, Condition(FRESH, "fresh"), np.random.default_rng(0))
    rr1, _, _ = replay.read_user(snap, user, t, Condition("user_topic", "staleness", staleness_ms=2 * HOUR), np.random.default_rng(0))
    keys = snap.plan.keys(user)
    assert [a for a, k in zip(rr0.raw, keys) if k.feature_set != "user_topic"] == [b for b, k in zip(rr1.raw, keys) if k.feature_set != "user_topic"]


def test_a_dropped_user_record_is_exactly_the_servers_degraded_answer(release_dir, small_sim, monkeypatch):
    """The real server with its store failing (StoreUnavailable) answers from defaults, degraded;
    the backtest's dropped user read gives the same list with the same scores."""
    from features.online.base import StoreUnavailable
    from server.app import BackgroundServer
    from server.client import ParityClient
    from server.config import ServerConfig

    day = 86_400_000  # a one-day as-of tick pins the server's request time
    cfg = ServerConfig(release=release_dir, data_dir=small_sim, port=0, metrics_port=None, cpu_threads=2, io_threads=2,
                       as_of_tick_ms=day, response_cache_ttl_s=0.0, feature_cache_ttl_s=0.0)
    with BackgroundServer(cfg) as srv, ParityClient(f"127.0.0.1:{srv.port}", timeout_s=5.0) as c:
        now = srv.service.clock.now_ms()
        t = now - now % day

        def down(keys):
            raise StoreUnavailable("the test took the store down")

        monkeypatch.setattr(srv.service.records.store, "get_many", down)
        monkeypatch.setattr(srv.service.records.store, "get_groups", down)  # the request path's reads
        users = (3, 10**9)  # a known user and one the log never saw
        served = {u: c.recommend(u, k=10) for u in users}
    until = int(EventLog(small_sim / "events").max_ts()) + 1  # the server materialised its store at the log's end
    rp = Replay(release_dir, small_sim, per_creator_cap=cfg.per_creator_cap)
    snap = rp.snapshot(rp.item_table(until))
    for u in users:
        out = rp.request(snap, u, t, Condition(USER_RECORD, "missing", missing=1.0), np.random.default_rng(0))
        assert served[u].degraded and out.degraded and len(served[u].items) == 10
        assert [int(i) for i in served[u].item_ids] == out.ids[out.top].tolist()
        assert [it.score for it in served[u].items] == [float(s) for s in out.scores[out.top]]


def test_a_read_slower_than_the_budget_is_a_read_the_store_did_not_answer(release_dir, small_sim):
    slow = Replay(release_dir, small_sim, max_users=12, budget_ms=20, latency=LatencyModel.lognormal(500, 900))
    res = slow.run([Condition(USER_RECORD, "latency"), Condition(USER_RECORD, "missing", missing=1.0), Condition(FRESH, "fresh")])
    late, gone, fresh = res.results
    assert late.read_misses == 1.0 and late.degraded == 1.0
    assert (late.ndcg, late.recall, late.auc, late.user_missing) == (gone.ndcg, gone.recall, gone.auc, gone.user_missing)
    assert late.user_missing == 1.0 and fresh.user_missing < 1.0
    fast = Replay(release_dir, small_sim, max_users=12, budget_ms=20, latency=LatencyModel.lognormal(0.5, 2))
    quick, fresh2 = fast.run([Condition(USER_RECORD, "latency"), Condition(FRESH, "fresh")]).results
    assert quick.read_misses == 0.0 and (quick.ndcg, quick.recall, quick.auc) == (fresh2.ndcg, fresh2.recall, fresh2.auc)


def test_every_record_of_a_set_dropped_reads_as_that_set_missing(replay):
    res = replay.run([Condition(FRESH, "fresh"), Condition("user_activity", "missing", missing=1.0)])
    fresh, gone = res.results
    assert gone.user_missing == 1.0 and fresh.user_missing < 1.0
    assert gone.degraded == 0.0  # an absent record is "not found", not a store fault


def test_pair_sets_read_in_a_second_round_trip_give_the_same_answers(release_dir, small_sim):
    """With nothing prefetched (pair_prefetch_limit 0) the server reads pair sets after retrieval
    for the candidates only; fresh, the answers are the prefetched ones. When the first read
    fails, the breaker it opened refuses the second: the same answers as every record missing."""
    conds = [Condition(FRESH, "fresh"), Condition(USER_RECORD, "missing", missing=1.0), Condition("user_topic", "staleness", staleness_ms=24 * HOUR)]
    pre = Replay(release_dir, small_sim, max_users=10).run(conds).results
    rp = Replay(release_dir, small_sim, max_users=10, server={"pair_prefetch_limit": 0})
    assert rp.base.plan.deferred
    two = rp.run(conds).results
    for a, b in zip(pre, two):
        assert (a.ndcg, a.recall, a.auc, a.user_missing) == (b.ndcg, b.recall, b.auc, b.user_missing), a.condition.label
    assert two[1].degraded == 1.0
