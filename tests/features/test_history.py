"""The user tower's history input: training builds it point-in-time with `history_at`, the
server reads it from the seen record. Both must give the same list for the same (user, t)."""
from __future__ import annotations

import numpy as np
import pytest

from features.eventlog import EventLog
from features.events import EventBatch, EventType
from features.history import PAD, engagement_mask, history_at, history_row, last_distinct
from features.online.memory import MemoryStore
from server.seen import append_seen, bootstrap_seen, decode_seen, seen_key


def test_last_distinct_keeps_the_most_recent_occurrence_most_recent_last():
    assert last_distinct(np.array([5, 3, 5, 7, 3, 9]), 10).tolist() == [5, 7, 3, 9]
    assert last_distinct(np.array([5, 3, 5, 7, 3, 9]), 2).tolist() == [3, 9]
    assert last_distinct(np.array([], dtype=np.int64), 4).tolist() == []


def test_history_row_right_aligns_and_pads_in_front():
    assert history_row(np.array([4, 8]), 4).tolist() == [PAD, PAD, 4, 8]
    assert history_row(np.array([1, 2, 3, 4, 5]), 3).tolist() == [3, 4, 5]
    assert history_row(np.array([], dtype=np.int64), 2).tolist() == [PAD, PAD]


@pytest.mark.parametrize("cap", [5, 50])
def test_training_history_equals_the_servers_seen_record_bootstrapped_from_the_log(small_sim, cap):
    events = EventLog(small_sim / "events").read(must_exist=True)
    ev = events.deduplicated()
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ev), size=40, replace=False)
    users, ts = ev.user_id[pick], ev.ts[pick]
    H = history_at(ev, "simulated", users, ts, cap)
    for r, (u, t) in enumerate(zip(users.tolist(), ts.tolist())):
        store = MemoryStore()
        # the server's start-up path, over the raw (not deduplicated) log, up to t
        bootstrap_seen(store, lambda: events, "simulated", t, cap=1000)
        (raw,) = store.get_many([seen_key(u)])
        assert history_row(decode_seen(raw), cap).tolist() == H[r].tolist(), (u, t)


def test_live_events_extend_the_record_as_the_log_would(small_sim):
    events = EventLog(small_sim / "events").read(must_exist=True).deduplicated()
    eng = events.take(np.flatnonzero(engagement_mask(events, "simulated")))
    t_mid = int(np.quantile(eng.ts, 0.5))
    store = MemoryStore()
    bootstrap_seen(store, lambda: events, "simulated", t_mid, cap=1000)
    later = events.take(np.flatnonzero(events.ts >= t_mid)).sorted()
    for a in range(0, len(later), 97):  # live batches, in order
        append_seen(store, later.take(np.arange(a, min(a + 97, len(later)))), "simulated", cap=1000)
    end = int(events.ts.max()) + 1
    users = np.unique(eng.user_id)[:25]
    H = history_at(events, "simulated", users, end, 30)
    for r, u in enumerate(users.tolist()):
        (raw,) = store.get_many([seen_key(u)])
        assert history_row(decode_seen(raw), 30).tolist() == H[r].tolist()


def test_a_row_never_sees_its_own_time_or_later():
    n = 5
    ev = EventBatch(event_id=np.arange(n), ts=np.array([100, 200, 200, 50, 60]), user_id=np.array([1, 1, 1, 2, 2]),
                    item_id=np.array([10, 11, 12, 10, 13]), creator_id=np.zeros(n, np.int64), topic=np.zeros(n, np.int64), session_id=np.zeros(n, np.int64),
                    type=np.array([EventType.PLAY, EventType.PLAY, EventType.LIKE, EventType.PLAY, EventType.IMPRESSION]), value=np.zeros(n))
    H = history_at(ev, "simulated", np.array([1, 1, 1, 2, 3]), np.array([100, 200, 201, 99, 999]), 3)
    assert H.tolist() == [[PAD, PAD, PAD], [PAD, PAD, 10], [10, 11, 12], [PAD, PAD, 10], [PAD, PAD, PAD]]
