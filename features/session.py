"""Session features: what the user did in the last 30 minutes, as the device can compute it.

They are declared as ordinary feature sets, so the batch engine and the point-in-time join
compute them with the same code as every other windowed aggregate (training rows of the
device ranker read them through `PitJoiner`), and the device bundle's `SessionSpec`
(mobile_sdk/BUNDLE_FORMAT.md, "Session features") is generated from these declarations by
`session_spec`: one source of truth for both sides.

Window 30 min in 5 min tiles: as of t, tiles floor(t/5min)-5 … floor(t/5min), events with
ts < t. TTL = window + tile (35 min): the oldest event inside the window is less than one
window old (t < (c+1)·tile and ts >= (c-n+1)·tile, so t - ts < n·tile = window), hence a
state that still holds an in-window event is never expired, and a state that did expire has
no event left in the window (its windowed values would be 0 anyway). The extra tile is slack,
not meaning. Missing (no state) therefore reads 0 for count and sum and NaN for mean, exactly
as the device computes them with no matching event (`session_values`).

The device records only this user's session, so every entity starts with the user:
`user` (all events), `user_topic`, `user_creator` and `user_item` (the candidate's topic,
creator or item).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from features.definitions import Agg, Entity, Feature, FeatureSet, Source, Window
from features.events import MS_PER_MINUTE, EventType
from features.repo import USER, USER_CREATOR, USER_TOPIC

__all__ = ["USER_ITEM", "SESSION_WINDOW", "session_sets", "session_columns", "session_spec", "SessionSpec",
           "SessionFeatureSpec", "session_values"]

USER_ITEM = Entity("user_item", ("user_id", "item_id"))
SESSION_WINDOW = Window(30 * MS_PER_MINUTE, 5 * MS_PER_MINUTE)
SESSION_TTL_MS = SESSION_WINDOW.duration_ms + SESSION_WINDOW.tile_ms

# entity of a session set -> the short name used in column names and in the SessionSpec
_ENTITY_SHORT = {USER.name: "user", USER_TOPIC.name: "topic", USER_CREATOR.name: "creator", USER_ITEM.name: "item"}


def _set(short: str, entity: Entity, sources: tuple[Source, ...], feats: list[tuple[str, Agg, str]]) -> FeatureSet:
    return FeatureSet(
        f"session_{short}", entity, sources,
        tuple(Feature(name, agg, src, window=SESSION_WINDOW) for name, agg, src in feats),
        SESSION_TTL_MS, f"This session's events (30 min) per {entity.name}: what a device records on its own.",
    )


def session_sets(kind: str) -> tuple[FeatureSet, ...]:
    """The session feature sets of a dataset kind ("simulated" or "movielens")."""
    if kind == "simulated":
        engaged = Source("engaged", (EventType.PLAY, EventType.LIKE), "one")
        skips = Source("skips", (EventType.SKIP,), "one")
        imps = Source("impressions", (EventType.IMPRESSION,), "one")
        plays = Source("plays", (EventType.PLAY,), "value")
        return (
            _set("user", USER, (engaged, skips, imps, plays), [
                ("engaged", Agg.COUNT, "engaged"), ("skips", Agg.COUNT, "skips"),
                ("impressions", Agg.COUNT, "impressions"), ("watch_s", Agg.SUM, "plays")]),
            _set("topic", USER_TOPIC, (engaged, skips), [("engaged", Agg.COUNT, "engaged"), ("skips", Agg.COUNT, "skips")]),
            _set("creator", USER_CREATOR, (engaged,), [("engaged", Agg.COUNT, "engaged")]),
            _set("item", USER_ITEM, (imps,), [("impressions", Agg.COUNT, "impressions")]),
        )
    if kind == "movielens":
        ratings = Source("ratings", (EventType.RATING,), "value")  # a count ignores the value
        feats = [("ratings", Agg.COUNT, "ratings"), ("rating_mean", Agg.MEAN, "ratings")]
        return (_set("user", USER, (ratings,), feats), _set("topic", USER_TOPIC, (ratings,), feats))
    raise ValueError(f"unknown dataset kind {kind!r}; allowed: simulated, movielens")


def _short(fs: FeatureSet) -> str:
    return _ENTITY_SHORT[fs.entity.name]


def session_columns(kind: str) -> tuple[str, ...]:
    """`session.<entity>.<name>` in declaration order (the device ranker's column order)."""
    return tuple(f"session.{_short(fs)}.{f.name}" for fs in session_sets(kind) for f in fs.features)


@dataclass(frozen=True)
class SessionFeatureSpec:
    column: str
    entity: str  # user | topic | creator | item
    agg: str  # count | sum | mean
    types: tuple[int, ...]
    value: str  # one | value


@dataclass(frozen=True)
class SessionSpec:
    """BUNDLE_FORMAT.md's `model.session`."""

    window_ms: int
    tile_ms: int
    features: tuple[SessionFeatureSpec, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        for f in d["features"]:
            f["types"] = list(f["types"])
        d["features"] = list(d["features"])
        return d


def session_spec(kind: str) -> SessionSpec:
    """The SessionSpec generated from the session feature sets."""
    feats = []
    for fs in session_sets(kind):
        if fs.entity.name not in _ENTITY_SHORT:
            raise ValueError(f"session set {fs.name!r}: entity {fs.entity.name!r} is not one a device can match")
        for f in fs.features:
            if f.agg not in (Agg.COUNT, Agg.SUM, Agg.MEAN) or f.window != SESSION_WINDOW:
                raise ValueError(f"session feature {fs.name}.{f.name}: only count/sum/mean over the session window")
            src = fs.source(f.source)
            feats.append(SessionFeatureSpec(f"session.{_short(fs)}.{f.name}", _short(fs), f.agg.value,
                                            tuple(sorted(int(t) for t in src.event_types)), src.value))
    return SessionSpec(SESSION_WINDOW.duration_ms, SESSION_WINDOW.tile_ms, tuple(feats))


def session_values(kind: str, joined: pa.Table) -> np.ndarray:
    """(n, len(session_columns)) float64 from a point-in-time join table over `session_sets`:
    missing reads 0 for count and sum, NaN for mean (the device's "no matching event")."""
    cols = []
    for fs in session_sets(kind):
        for f in fs.features:
            v = joined.column(f"{fs.name}.{f.name}").to_numpy(zero_copy_only=False).astype(np.float64)
            m = joined.column(f"{fs.name}.{f.name}.missing").to_numpy(zero_copy_only=False)
            cols.append(np.where(m, np.nan if f.agg is Agg.MEAN else 0.0, v))
    return np.stack(cols, axis=1) if cols else np.zeros((joined.num_rows, 0))
