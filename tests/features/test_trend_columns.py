"""Trend inputs (`features.assemble.TREND_COLUMNS`, the topic share): derived by `assemble` from
columns the ranker already reads, so the batch path and the server's block-at-a-time path give
the same numbers by construction; the formula, its missing policy and which releases read them."""
from __future__ import annotations

import numpy as np
import pytest

from features.assemble import TOPIC_SHARE, TREND_COLUMNS, Block, RankerInputs, assemble, ranker_inputs
from features.repo import feature_sets

ITEM = ("item_popularity.plays_1h", "item_popularity.plays_1d", "item_popularity.plays_7d", "item_popularity.impressions_1d",
        "item_popularity.impressions_7d")
PAIR = ("user_topic.engaged_decayed_3d", "user_topic.plays_7d")
TRENDS = ("trend.item_plays_1d_7d", "trend.item_plays_1h_1d", "trend.item_impressions_1d_7d", "trend.user_topic_recency")


def _spec() -> RankerInputs:
    user = [f"user_activity.topic_affinity[{d}]" for d in range(4)]
    return RankerInputs("user_activity", "item_popularity", (("user_topic", "topic"),), "user_activity.topic_affinity",
                        tuple(user + list(ITEM) + list(PAIR) + ["cross.topic_affinity", TOPIC_SHARE] + list(TRENDS)))


def _inputs(rng: np.random.Generator, n: int, aff=None):
    aff = rng.random(4) if aff is None else np.asarray(aff, dtype=np.float64)
    user = {f"user_activity.topic_affinity[{d}]": (np.array([aff[d]]), np.array([False])) for d in range(4)}
    per_row = {c: (rng.integers(0, 50, n).astype(np.float64), rng.random(n) < 0.2) for c in ITEM + PAIR}
    items = dict(item_topic=rng.integers(-1, 5, n), item_publish_ts=np.zeros(n, np.int64), item_duration_s=np.full(n, 30.0),
                 request_ts=10**12)
    return user, per_row, items


def test_a_trend_is_the_short_windows_rate_over_the_long_ones_with_one_event_of_smoothing():
    spec = _spec()
    cols = {c: (np.zeros(3), np.zeros(3, bool)) for c in ITEM + PAIR}
    cols["item_popularity.plays_1d"] = (np.array([10.0, 0.0, 5.0]), np.array([False, False, True]))  # the last one missing
    cols["item_popularity.plays_7d"] = (np.array([7.0, 70.0, 35.0]), np.zeros(3, bool))
    cols.update({f"user_activity.topic_affinity[{d}]": (np.array([1.0]), np.array([False])) for d in range(4)})
    X = assemble(spec, cols, item_topic=np.zeros(3, np.int64), item_publish_ts=np.zeros(3), item_duration_s=np.ones(3), request_ts=1)
    got = X[:, spec.columns.index("trend.item_plays_1d_7d")]
    # (short + 1) / (long / 7 + 1); a missing count reads as 0
    np.testing.assert_allclose(got, [11.0 / 2.0, 1.0 / 11.0, 1.0 / 6.0], rtol=1e-6)
    assert not np.isnan(X[:, [spec.columns.index(t) for t in TRENDS]]).any()


@pytest.mark.parametrize("n", [1, 3, 41])
def test_trends_from_blocks_equal_trends_from_columns_bit_for_bit(n):
    """The server writes item and pair inputs as blocks, training gives them column by column."""
    rng = np.random.default_rng(n)
    spec = _spec()
    user, per_row, items = _inputs(rng, n)
    want = assemble(spec, {**user, **per_row}, **items)
    ib = Block.of(ITEM, np.stack([per_row[c][0] for c in ITEM], axis=1), np.stack([per_row[c][1] for c in ITEM], axis=1))
    pb = Block.of(PAIR[::-1], np.stack([per_row[c][0] for c in PAIR[::-1]], axis=1), np.stack([per_row[c][1] for c in PAIR[::-1]], axis=1))
    got = assemble(spec, user, **items, blocks=[ib, pb])
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
    assert np.isfinite(got[:, [spec.columns.index(t) for t in TRENDS]]).all()


def test_the_topic_share_is_the_items_topic_over_the_users_whole_affinity_vector():
    rng = np.random.default_rng(0)
    spec = _spec()
    user, per_row, items = _inputs(rng, 4, aff=[1.0, 3.0, 0.0, 4.0])
    items["item_topic"] = np.array([0, 1, 3, -1])
    X = assemble(spec, {**user, **per_row}, **items)
    share = X[:, spec.columns.index(TOPIC_SHARE)]
    np.testing.assert_allclose(share[:3], [1 / 8, 3 / 8, 4 / 8], rtol=1e-6)
    assert np.isnan(share[3])  # an unknown topic: missing, as the affinity is
    user, per_row, items = _inputs(rng, 2, aff=[0.0, 0.0, 0.0, 0.0])
    assert np.isnan(assemble(spec, {**user, **per_row}, **items)[:, spec.columns.index(TOPIC_SHARE)]).all()  # no interest yet


def test_a_trend_whose_columns_the_ranker_does_not_read_is_named():
    rng = np.random.default_rng(2)
    spec = _spec()
    spec = RankerInputs(spec.user_set, spec.item_set, spec.pair_sets, spec.affinity,
                        tuple(c for c in spec.columns if c != "item_popularity.plays_7d"))
    user, per_row, items = _inputs(rng, 3)
    with pytest.raises(KeyError, match="trend.item_plays_1d_7d"):
        assemble(spec, {**user, **per_row}, **items)


@pytest.mark.parametrize("kind", ["simulated", "movielens"])
def test_every_release_reads_the_trends_its_feature_sets_support(kind):
    sets = feature_sets(kind, 20)
    with_trend, without = ranker_inputs(sets), ranker_inputs(sets, trend=False)
    added = [c for c in with_trend.columns if c not in without.columns]
    assert list(with_trend.columns[: len(without.columns)]) == list(without.columns)  # appended after the old inputs
    assert added[0] == TOPIC_SHARE and all(c.startswith("trend.") for c in added)
    for name in added[1:]:
        short, long, _ = TREND_COLUMNS[name]
        assert short in without.columns and long in without.columns
    want = {"simulated": {"trend.item_plays_1d_7d", "trend.item_plays_1h_1d", "trend.item_impressions_1d_7d", "trend.user_topic_recency"},
            "movielens": {"trend.item_ratings_7d_30d", "trend.item_ratings_1d_7d", "trend.user_genre_recency"}}[kind]
    assert set(added[1:]) == want
