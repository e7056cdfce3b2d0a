"""On-device ranking and session features, exactly as BUNDLE_FORMAT.md defines them."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mobile_sdk import Event

from bundle_factory import INPUTS, quantise, reference_scores
from conftest import NOW_MS, USER, chunk_v1, spec_v1

CTX = {"now_ms": NOW_MS}
TILE = 300_000

# A replayed session. The window as of NOW_MS: tiles >= floor(NOW_MS / tile) - 6 + 1, i.e. ts >= NOW_MS - 1_700_000.
EVENTS = [
    Event(NOW_MS - 1_750_000, 12, 1, 100.0),  # play, one tile too old: outside the window
    Event(NOW_MS - 1_600_000, 10, 1, 30.0),  # play (item 10: topic 0, creator 100)
    Event(NOW_MS - 900_000, 12, 2, 1.0),  # like (item 12: topic 1, creator 100)
    Event(NOW_MS - 300_000, 14, 0, 1.0),  # impression (item 14: topic 2, creator 103)
    Event(NOW_MS - 200_000, 14, 3, 1.0),  # skip
    Event(NOW_MS - 100_000, 16, 1, 60.0),  # play (item 16: topic -1, creator -1)
    Event(NOW_MS - 50_000, 99, 1, 10.0, topic=0),  # play of an item not in the table; topic given, creator unknown
    Event(NOW_MS, 10, 1, 999.0),  # ts == now_ms: not counted
]
# Hand-computed per "Session features", candidates 10, 12, 14, 16, 17 (topics 0, 1, 2, -1, 3; creators 100, 100, 103, -1, 104)
EXPECTED = {
    "session.topic.engaged": [2, 1, 0, 0, 0],  # plays/likes on the topic: 10 <- e2 and the topic-0 play of 99; 12 <- the like
    "session.creator.engaged": [2, 2, 0, 0, 0],  # creator 100: the play of 10 and the like of 12
    "session.user.play_s": [100.0] * 5,  # 30 + 60 + 10
    "session.user.play_mean": [100.0 / 3] * 5,
    "session.item.impressions": [0, 0, 1, 0, 0],
    "session.topic.skips": [0, 0, 1, 0, 0],
}


@pytest.fixture
def client(world):
    c = world.client()
    c.sync()
    return c


def replay(client, events=EVENTS) -> None:
    for e in events:
        client.record(e)


def test_session_features_of_a_replayed_session_equal_the_hand_computed_values(client):
    replay(client)
    got = client.session_features([10, 12, 14, 16, 17], NOW_MS)
    assert set(got) == set(EXPECTED)
    for column, want in EXPECTED.items():
        np.testing.assert_allclose(got[column], np.array(want, np.float32), rtol=0, atol=0, err_msg=column)


def test_session_features_with_no_matching_event_are_zero_for_counts_and_sums_and_nan_for_means(client):
    got = client.session_features([10, 14], NOW_MS)
    assert got["session.topic.engaged"].tolist() == [0, 0] and got["session.user.play_s"].tolist() == [0, 0]
    assert np.isnan(got["session.user.play_mean"]).all()
    replay(client, [Event(NOW_MS - 10_000, 10, 1, 5.0)])
    assert client.session_features([10], NOW_MS - 10_000)["session.user.play_s"].tolist() == [0.0]  # ts < now_ms only


def test_the_ranker_scores_the_columns_the_format_defines(client):
    """One candidate's row rebuilt by hand from the format's formulas, scored by the model's function.
    Item 13: topic 1 (the like of 12 counts), creator 102 (nothing), published 4 h before now."""
    replay(client)
    spec, chunk = spec_v1(), chunk_v1()
    row = list(chunk["item_id"]).index(13)
    qi, si = quantise(chunk["embedding"])
    e = qi[row].astype(np.float32) * si[row]
    qu, su = quantise(spec.users[USER].embedding)
    u = qu[0].astype(np.float32) * su[0]
    prod = u * e
    hour = 2 * math.pi * (NOW_MS % 86_400_000) / 86_400_000
    values = {"emb.dot": np.float32(prod.astype(np.float64).sum()), **{f"emb.prod[{j}]": prod[j] for j in range(4)},
              "item.ctr": spec.stats[13][0], "item.plays_7d": spec.stats[13][1],
              "item.age_h": (NOW_MS - int(chunk["publish_ts"][row])) / 3_600_000, "item.duration_s": chunk["duration_s"][row],
              "context.hour_sin": math.sin(hour), "context.hour_cos": math.cos(hour),
              "session.topic.engaged": 1, "session.creator.engaged": 0, "session.user.play_s": 100.0,
              "session.user.play_mean": 100.0 / 3, "session.item.impressions": 0, "session.topic.skips": 0}
    x = np.array([[values[c] for c in INPUTS]], np.float32)
    got = dict(client.rank(USER, candidates=[13], context=CTX))
    assert got[13] == pytest.approx(float(reference_scores(x)[0]), abs=1e-6)


def test_without_a_user_embedding_the_emb_columns_are_nan(world):
    c = world.client(None, cache="anon")
    c.sync()
    spec, chunk = spec_v1(), chunk_v1()
    row = list(chunk["item_id"]).index(17)  # publish_ts 0: age NaN too
    hour = 2 * math.pi * (NOW_MS % 86_400_000) / 86_400_000
    values = {"item.ctr": math.nan, "item.plays_7d": math.nan, "item.duration_s": chunk["duration_s"][row],
              "context.hour_sin": math.sin(hour), "context.hour_cos": math.cos(hour), "session.user.play_mean": math.nan}
    x = np.array([[values.get(col, math.nan if col.startswith(("emb.", "item.")) else 0.0) for col in INPUTS]], np.float32)
    assert dict(c.rank(candidates=[17], context=CTX))[17] == pytest.approx(float(reference_scores(x)[0]), abs=1e-6)
    assert 17 not in spec.stats


def test_ranking_is_best_first_with_ties_by_item_id_and_at_most_k(client):
    full = client.rank(USER, context=CTX, k=100)
    scores = [s for _, s in full]
    assert scores == sorted(scores, reverse=True)
    ids = full.item_ids
    assert ids.index(20) + 1 == ids.index(21) and dict(full)[20] == dict(full)[21]  # twins: equal score, lower id first
    assert client.rank(USER, context=CTX, k=3) == full[:3]
    with pytest.raises(ValueError):
        client.rank(USER, context=CTX, k=0)
    with pytest.raises(TypeError):
        client.rank(USER, context=CTX, k="3")


def test_recent_items_unknown_items_and_session_engaged_items_are_removed(client):
    base = client.rank(USER, context=CTX, k=100)
    assert base.source == "user"
    assert 11 not in base.item_ids and 99 not in base.item_ids  # recent; not in the item table
    replay(client, [Event(NOW_MS - 5_000, 10, 1, 3.0), Event(NOW_MS - 4_000, 12, 2), Event(NOW_MS - 3_000, 13, 4, 5.0),
                    Event(NOW_MS - 2_000, 14, 0), Event(NOW_MS - 1_000, 15, 3)])
    after = client.rank(USER, context=CTX, k=100).item_ids
    assert not {10, 12, 13} & set(after)  # played, liked, rated
    assert {14, 15} <= set(after)  # an impression or a skip is not engagement


def test_request_candidates_are_ranked_deduplicated_and_filtered(client):
    r = client.rank(USER, candidates=[14, 11, 14, 99, 17, 10], context=CTX)
    assert r.source == "request" and sorted(r.item_ids) == [10, 14, 17]


def test_without_a_user_file_popular_then_newest_are_ranked(world):
    c = world.client(None, cache="anon")
    c.sync()
    r = c.rank(context=CTX, k=100)
    assert r.source == "popular" and sorted(r.item_ids) == [10, 12, 13, 16, 17]  # 99 is not in the table


def test_the_session_log_is_bounded(world):
    c = world.client(max_session_events=3)
    c.sync()
    for i in range(10):
        c.record({"ts": NOW_MS - 10_000 + i, "item_id": 10 + i % 5, "type": 0})
    assert [e.ts for e in c.session_events()] == [NOW_MS - 10_000 + i for i in (7, 8, 9)]
    c.record(Event(NOW_MS + 3 * 1_800_000, 10, 0))  # an hour and a half later: the old events can never count again
    assert len(c.session_events()) == 1
    with pytest.raises(ValueError):
        c.record({"ts": NOW_MS, "item_id": 10, "type": 0, "user_id": 7})
    with pytest.raises(TypeError):
        c.record({"ts": "now", "item_id": 10, "type": 0})


def test_an_event_from_a_wrong_clock_is_refused_and_the_session_survives(world):
    """The session log drops what no window counts any more, measured from its latest event: one
    event stamped decades ahead would have emptied it (measured: 5 events -> 1)."""
    c = world.client()
    c.sync()
    for i in range(5):
        c.record(Event(NOW_MS - i * 60_000, 10 + i, 0, 1.0))
    before = c.session_features([12], NOW_MS)
    with pytest.raises(ValueError, match="ahead of this device's clock"):
        c.record(Event(NOW_MS + 10**12, 99, 0, 1.0))
    assert len(c.session_events()) == 5
    after = c.session_features([12], NOW_MS)
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before)


def test_a_huge_candidate_list_is_refused_with_a_clear_error(world):
    c = world.client()
    c.sync()
    with pytest.raises(ValueError, match="candidates: 2001 items"):
        c.rank(USER, candidates=range(2001), context=CTX)
    assert len(c.rank(USER, candidates=range(2000), context=CTX, k=3)) <= 3
