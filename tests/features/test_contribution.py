"""The per-user contribution cap: one user cannot move an item aggregate much, the counters
are shared through the online store, windows follow event time, and a redelivered batch is
not refused because its first delivery was counted."""
from __future__ import annotations

import numpy as np
import pytest

from features.contribution import ContributionLimiter, ContributionLimits
from features.event_rules import RATE_LIMITED
from features.events import MS_PER_HOUR, EventBatch, EventType
from features.lookup import FeatureLookup
from features.online.base import OnlineStore, StoreUnavailable
from features.online.memory import MemoryStore
from features.repo import feature_sets
from features.streaming import StreamingIngestor

T0 = 1_790_000_000_000 // MS_PER_HOUR * MS_PER_HOUR  # the start of an hour
SETS = feature_sets("simulated", 20)


def plays(n: int, *, user: int = 1, item: int = 12, start_id: int = 1, ts: int = T0, etype: EventType = EventType.PLAY) -> EventBatch:
    return EventBatch(
        event_id=np.arange(start_id, start_id + n, dtype=np.int64), ts=np.full(n, ts, np.int64) + np.arange(n),
        user_id=np.full(n, user, np.int64), item_id=np.full(n, item, np.int64), creator_id=np.full(n, -1, np.int64),
        topic=np.full(n, 3, np.int32), session_id=np.full(n, -1, np.int64), type=np.full(n, int(etype), np.int8),
        value=np.full(n, 30.0 if etype == EventType.PLAY else 1.0),
    )


def test_2000_plays_of_one_item_from_one_user_admit_only_the_per_item_cap(online_store: OnlineStore) -> None:
    limiter = ContributionLimiter(online_store)
    a = limiter.filter(plays(2000))
    assert len(a.admitted) == 20 and a.index.tolist() == list(range(20))
    assert len(a.refused) == 1980 and {r.kind for r in a.refused} == {RATE_LIMITED}
    r = a.refused[0]
    assert (r.index, r.field) == (20, "item_id")
    assert r.reason == "rate limited: user 1 sent more than 20 play events for item 12 within one 1 h window"


def test_a_poisoning_user_cannot_put_an_item_on_top_of_the_aggregates() -> None:
    """2,000 plays of item 12 from one user: item 12's play count stays at the cap, below an
    item that 30 different users played once each."""
    store = MemoryStore("poison")
    ingestor = StreamingIngestor(store, SETS)
    limiter = ContributionLimiter(store)
    honest = EventBatch.concat([plays(1, user=100 + u, item=7, start_id=10_000 + u) for u in range(30)])
    attack = plays(2000, user=1, item=12, start_id=1)
    for batch in (honest, attack):
        ingestor.ingest(limiter.filter(batch).admitted)
    frame = FeatureLookup(store, SETS).read("item_popularity", np.asarray([7, 12]), T0 + MS_PER_HOUR // 2).frame
    plays_1h = frame.values[:, frame.columns.index("plays_1h")]
    assert plays_1h.tolist() == [30.0, 20.0]


def test_the_per_item_cap_is_per_event_type_and_per_item() -> None:
    limiter = ContributionLimiter(MemoryStore("types"))
    batch = EventBatch.concat([plays(25, start_id=1), plays(25, start_id=100, etype=EventType.LIKE), plays(25, start_id=200, item=13)])
    a = limiter.filter(batch)
    assert len(a.admitted) == 60 and len(a.refused) == 15


def test_the_per_user_cap_counts_every_item_and_type(online_store: OnlineStore) -> None:
    limiter = ContributionLimiter(online_store, ContributionLimits(max_per_item=5, max_per_user=12))
    batch = EventBatch.concat([plays(5, item=i, start_id=100 * i) for i in range(1, 5)])  # 20 events, 5 per item
    a = limiter.filter(batch)
    assert a.index.tolist() == list(range(12))
    assert {r.field for r in a.refused} == {"user_id"}
    assert a.refused[0].reason == "rate limited: user 1 sent more than 12 events within one 1 h window"
    # Other users are not affected.
    assert len(limiter.filter(plays(5, user=2, start_id=10_000)).admitted) == 5


def test_windows_follow_event_time_and_the_next_window_starts_afresh() -> None:
    limiter = ContributionLimiter(MemoryStore("tiles"))
    assert len(limiter.filter(plays(30, ts=T0)).admitted) == 20
    assert len(limiter.filter(plays(30, ts=T0 + MS_PER_HOUR, start_id=1000)).admitted) == 20
    assert len(limiter.filter(plays(5, ts=T0 + 10, start_id=2000)).admitted) == 0  # a late event still counts in its own window


def test_a_replay_decides_the_same_however_it_is_batched() -> None:
    events = EventBatch.concat([plays(30, item=i, start_id=100 * i, ts=T0 + i * 1000) for i in range(1, 4)]).sorted()
    whole = ContributionLimiter(MemoryStore("a")).filter(events).index
    chunked = ContributionLimiter(MemoryStore("b"))
    parts = [chunked.filter(events.take(np.arange(a, min(a + 7, len(events))))).index + a for a in range(0, len(events), 7)]
    assert np.concatenate(parts).tolist() == whole.tolist()


def test_counters_are_shared_by_every_limiter_on_one_store(online_store: OnlineStore) -> None:
    """Two server replicas (or a replica and a stream consumer) share one budget."""
    first, second = ContributionLimiter(online_store), ContributionLimiter(online_store)
    assert len(first.filter(plays(15)).admitted) == 15
    assert len(second.filter(plays(15, start_id=100)).admitted) == 5


def test_a_redelivered_batch_is_not_refused_because_its_first_delivery_was_counted(online_store: OnlineStore) -> None:
    ingestor = StreamingIngestor(online_store, SETS)
    limiter = ContributionLimiter(online_store)
    batch = plays(18)
    first = limiter.filter(batch)
    assert len(first.admitted) == 18
    ingestor.ingest(first.admitted)
    again = limiter.filter(batch)  # at-least-once: the same events once more (their ack was lost)
    assert len(again.admitted) == 18 and again.refused == ()
    assert ingestor.ingest(again.admitted).duplicates == 18
    # ... and they were not counted twice: two more fresh plays still fit under the cap of 20.
    assert len(limiter.filter(plays(3, start_id=500)).admitted) == 2


def test_duplicates_within_a_batch_are_counted_once() -> None:
    limiter = ContributionLimiter(MemoryStore("dups"))
    batch = plays(15)
    a = limiter.filter(EventBatch.concat([batch, batch]))
    assert len(a.admitted) == 30 and a.refused == ()  # the copies pass on to the ingestor's dedupe


def test_a_store_outage_propagates_and_admits_nothing() -> None:
    class Down(MemoryStore):
        def incr_many(self, names, amounts, ttl_ms):
            raise StoreUnavailable("down")

    with pytest.raises(StoreUnavailable):
        ContributionLimiter(Down("down")).filter(plays(3))


def test_counters_expire_with_their_ttl_so_the_store_does_not_grow() -> None:
    now = [1_700_000_000.0]  # the store's wall clock, in seconds, moved by hand
    limiter = ContributionLimiter(MemoryStore("ttl", clock=lambda: now[0]), ContributionLimits(max_per_item=2, window_ms=60_000))
    assert len(limiter.filter(plays(3)).admitted) == 2
    now[0] += 119
    assert len(limiter.filter(plays(1, start_id=10)).admitted) == 0
    now[0] += 2  # 2 windows after the counter was made: it is gone (space reclaimed)
    assert len(limiter.filter(plays(1, start_id=20)).admitted) == 1
    assert ContributionLimits().ttl_ms == 2 * MS_PER_HOUR


@pytest.mark.parametrize("kwargs,error", [(dict(max_per_item=0), ValueError), (dict(max_per_user=1.5), TypeError),
                                          (dict(window_ms=0), ValueError), (dict(window_ms=60_000, counter_ttl_ms=1000), ValueError)])
def test_limits_are_validated_where_given(kwargs, error) -> None:
    with pytest.raises(error):
        ContributionLimits(**kwargs)


def test_an_empty_batch_costs_no_round_trip() -> None:
    class Counting(MemoryStore):
        calls = 0

        def seen(self, ids):
            Counting.calls += 1
            return super().seen(ids)

    a = ContributionLimiter(Counting("e")).filter(EventBatch.empty())
    assert len(a.admitted) == 0 and Counting.calls == 0
