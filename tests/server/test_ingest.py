"""Live events through IngestEvents update the online features with the feature store's
streaming code, and the next recommendation for that user reflects them."""
from __future__ import annotations

import time

import numpy as np

from features.eventlog import EventLog
from server.client import LiveEvent


def test_ingested_events_change_features_and_the_next_recommendation(memory_server, client, small_sim):
    ev = EventLog(small_sim / "events").read()
    user = int(np.bincount(ev.user_id).argsort()[-2])  # an active user no other test changes
    before = client.get_features("user", user)[0]
    rec = client.recommend(user, k=10)
    item = rec.item_ids[0]
    now = client.status().now_ms
    assert now >= before.feature_ts_ms

    events = [LiveEvent(9_000_000_000 + i, now - 10 + i, user, item, t, v) for i, (t, v) in enumerate([("impression", 1), ("play", 42.0), ("play", 30.0), ("like", 1)])]
    s = client.ingest(events)
    assert (s.received, s.accepted, s.duplicates, s.late, s.invalid) == (4, 4, 0, 0, 0)

    after = client.get_features("user", user)[0]
    assert after.values["plays_1h"] == before.values["plays_1h"] + 2
    assert after.values["likes_7d"] == before.values["likes_7d"] + 1
    assert after.feature_ts_ms == now - 10 + 3
    assert 0 <= after.staleness_ms < 60_000

    # The played item is now seen: the very next recommendation (no waiting on any cache) drops it.
    again = client.recommend(user, k=10)
    assert item not in again.item_ids
    assert not again.degraded

    # At-least-once delivery: a redelivered stream changes nothing.
    dup = client.ingest(events)
    assert (dup.accepted, dup.duplicates) == (0, 4)
    assert client.get_features("user", user)[0].values["plays_1h"] == after.values["plays_1h"]

    # An event far behind the watermark goes to the dead letters, counted as late.
    late = client.ingest([LiveEvent(9_000_000_100, now - 3 * 3_600_000, user, item, "play", 5.0)])
    assert (late.accepted, late.late) == (0, 1)
    assert memory_server.service.dead_letters.count >= 1

    # The in-memory item table catches up with the item's new plays without a restart.
    snap_rows = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        snap = memory_server.service.state.current
        snap_rows = snap.items.rows(np.asarray([int(item)]))
        frame = snap.items.features(snap_rows, now + 1000)
        if frame.column("plays_1h")[0] >= 2:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the item table did not refresh after live events")
    assert client.get_features("item", item)[0].values["plays_1h"] >= 2
