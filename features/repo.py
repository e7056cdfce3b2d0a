"""The feature repository: Parity's feature sets, declared in one readable place.

Two catalogues share one shape: the video platform (impressions, plays, likes, skips) and
MovieLens (ratings). Tiles: 15 min for the 1 h window, 2 h for 1 day, 1 day for 7 and 30
days, so a record holds at most 30 tiles per ring.
"""
from __future__ import annotations

from features.definitions import Agg, Entity, Feature, FeatureSet, Source, Window
from features.events import MS_PER_DAY, MS_PER_HOUR, MS_PER_MINUTE, EventType

__all__ = ["USER", "ITEM", "USER_TOPIC", "USER_CREATOR", "feature_sets", "W1H", "W1D", "W7D", "W30D"]

USER = Entity("user", ("user_id",))
ITEM = Entity("item", ("item_id",))
USER_TOPIC = Entity("user_topic", ("user_id", "topic"))
USER_CREATOR = Entity("user_creator", ("user_id", "creator_id"))

W1H = Window(MS_PER_HOUR, 15 * MS_PER_MINUTE)
W1D = Window(MS_PER_DAY, 2 * MS_PER_HOUR)
W7D = Window(7 * MS_PER_DAY, MS_PER_DAY)
W30D = Window(30 * MS_PER_DAY, MS_PER_DAY)

_SUFFIX = {W1H: "1h", W1D: "1d", W7D: "7d", W30D: "30d"}


def _windowed(prefix: str, agg: Agg, source: str, windows: tuple[Window, ...]) -> list[Feature]:
    return [Feature(f"{prefix}_{_SUFFIX[w]}", agg, source, window=w) for w in windows]


def _video_sets(n_topics: int) -> tuple[FeatureSet, ...]:
    impressions = Source("impressions", (EventType.IMPRESSION,), "one")
    plays = Source("plays", (EventType.PLAY,), "value")  # value: seconds watched
    likes = Source("likes", (EventType.LIKE,), "one")
    skips = Source("skips", (EventType.SKIP,), "one")
    engaged = Source("engaged", (EventType.PLAY, EventType.LIKE), "one")
    ttl = 30 * MS_PER_DAY
    user = FeatureSet(
        "user_activity",
        USER,
        (impressions, plays, likes, skips, engaged),
        tuple(
            _windowed("impressions", Agg.COUNT, "impressions", (W1H, W1D, W7D))
            + _windowed("plays", Agg.COUNT, "plays", (W1H, W1D, W7D))
            + _windowed("watch_s", Agg.SUM, "plays", (W1D, W7D))
            + _windowed("watch_s_mean", Agg.MEAN, "plays", (W7D,))
            + _windowed("watch_s_max", Agg.MAX, "plays", (W7D,))
            + _windowed("likes", Agg.COUNT, "likes", (W7D,))
            + _windowed("skips", Agg.COUNT, "skips", (W1D, W7D))
            + [
                Feature("watch_s_decayed_1d", Agg.DECAYED_SUM, "plays", half_life_ms=MS_PER_DAY),
                Feature("last_watch_s", Agg.LAST, "plays"),
                Feature(
                    "topic_affinity", Agg.DECAYED_VECTOR, "engaged", half_life_ms=3 * MS_PER_DAY,
                    dim=n_topics, index_column="topic", description="decayed plays+likes per topic",
                ),
            ]
        ),
        ttl,
        "What a user did recently: volume, watch time, likes, skips, topic tastes.",
    )
    item = FeatureSet(
        "item_popularity",
        ITEM,
        (impressions, plays, likes, skips),
        tuple(
            _windowed("impressions", Agg.COUNT, "impressions", (W1H, W1D, W7D))
            + _windowed("plays", Agg.COUNT, "plays", (W1H, W1D, W7D))
            + _windowed("likes", Agg.COUNT, "likes", (W1D, W7D))
            + _windowed("skips", Agg.COUNT, "skips", (W1D,))
            + _windowed("watch_s_mean", Agg.MEAN, "plays", (W7D,))
            + [Feature("plays_decayed_6h", Agg.DECAYED_SUM, "plays", half_life_ms=6 * MS_PER_HOUR)]
        ),
        ttl,
        "How an item is doing: exposure, plays, likes, skips, trend.",
    )
    user_topic = FeatureSet(
        "user_topic",
        USER_TOPIC,
        (plays, engaged),
        tuple(
            _windowed("plays", Agg.COUNT, "plays", (W7D,))
            + _windowed("watch_s", Agg.SUM, "plays", (W7D,))
            + [Feature("engaged_decayed_3d", Agg.DECAYED_SUM, "engaged", half_life_ms=3 * MS_PER_DAY)]
        ),
        ttl,
        "A user's engagement with one topic.",
    )
    user_creator = FeatureSet(
        "user_creator",
        USER_CREATOR,
        (plays, likes, engaged),
        tuple(
            _windowed("plays", Agg.COUNT, "plays", (W7D,))
            + _windowed("likes", Agg.COUNT, "likes", (W7D,))
            + [Feature("engaged_decayed_7d", Agg.DECAYED_SUM, "engaged", half_life_ms=7 * MS_PER_DAY)]
        ),
        ttl,
        "A user's engagement with one creator.",
    )
    return user, item, user_topic, user_creator


def _rating_sets(n_topics: int) -> tuple[FeatureSet, ...]:
    ratings = Source("ratings", (EventType.RATING,), "value")
    ttl = 365 * MS_PER_DAY
    half = 30 * MS_PER_DAY
    user = FeatureSet(
        "user_ratings",
        USER,
        (ratings,),
        tuple(
            _windowed("ratings", Agg.COUNT, "ratings", (W1D, W7D, W30D))
            + _windowed("rating_mean", Agg.MEAN, "ratings", (W7D, W30D))
            + _windowed("rating_max", Agg.MAX, "ratings", (W30D,))
            + [
                Feature("rating_decayed_30d", Agg.DECAYED_SUM, "ratings", half_life_ms=half),
                Feature("last_rating", Agg.LAST, "ratings"),
                Feature("genre_affinity", Agg.DECAYED_VECTOR, "ratings", half_life_ms=half, dim=n_topics, index_column="topic"),
            ]
        ),
        ttl,
        "How much and how well a user rates, and which genres.",
    )
    item = FeatureSet(
        "item_ratings",
        ITEM,
        (ratings,),
        tuple(
            _windowed("ratings", Agg.COUNT, "ratings", (W1D, W7D, W30D))
            + _windowed("rating_mean", Agg.MEAN, "ratings", (W30D,))
            + [
                Feature("ratings_decayed_30d", Agg.DECAYED_SUM, "ratings", half_life_ms=half),
                Feature("last_rating", Agg.LAST, "ratings"),
            ]
        ),
        ttl,
        "How often and how well an item is rated.",
    )
    user_genre = FeatureSet(
        "user_genre",
        USER_TOPIC,
        (ratings,),
        tuple(
            _windowed("ratings", Agg.COUNT, "ratings", (W30D,))
            + _windowed("rating_mean", Agg.MEAN, "ratings", (W30D,))
            + [Feature("rating_decayed_30d", Agg.DECAYED_SUM, "ratings", half_life_ms=half)]
        ),
        ttl,
        "A user's ratings within one genre.",
    )
    return user, item, user_genre


def feature_sets(kind: str = "simulated", n_topics: int = 20) -> tuple[FeatureSet, ...]:
    """The feature sets for a dataset kind ("simulated" or "movielens")."""
    if kind == "simulated":
        return _video_sets(n_topics)
    if kind == "movielens":
        return _rating_sets(n_topics)
    raise ValueError(f"unknown dataset kind {kind!r}; allowed: simulated, movielens")
