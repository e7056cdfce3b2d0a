"""Closed-loop feedback: what a user would do with the list the server just showed them.

Why: a canary with a worse model can only be caught by its business numbers if traffic
produces feedback that depends on what was served. The simulator writes a fixed log; this
module answers *a served list* with the impressions, plays and likes a user would produce,
so a demo or a test can drive Recommend -> feedback -> IngestEvents(request_id) in a loop.

The model is fitted from an event log, pure numpy, deterministic from a seed:

- per-user topic affinity: the user's engaged events per topic (plays, likes, ratings >= 4),
  smoothed toward the global topic mix, as a lift over that mix (1 = average taste);
- per-item quality: the item's engagement rate (plays per impression, or for a log without
  impressions such as MovieLens, the share of its ratings >= 4) smoothed toward the global
  rate, as a logit difference, plus its mean watch fraction (watch seconds / duration);
- P(play at position i) = examine(i) * sigmoid(base + w_aff * log(lift) + w_q * quality), with
  examine(i) = 1 / log2(i + 2) (the usual DCG position discount); watch seconds from the
  item's watch fraction and the user's affinity; likes follow some plays.

Every shown item gets an impression. Time is compressed: impressions are 200 ms apart and a
play lands 1-3 s after its impression whatever its watch time (the value carries the watch
seconds), so feedback joins within a canary guard window and never runs ahead of the server
clock by more than its tolerance. Event ids are 63-bit hashes of (seed, request id, item,
type): unique in practice, and the same request answered twice yields the same ids, which
the server's de-duplication then absorbs. Randomness for one request comes from a generator
seeded by (seed, request id, user), so answers do not depend on call order.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from features.datasets import events_dir, read_items
from features.eventlog import EventLog
from features.events import EventBatch, EventType

__all__ = ["FeedbackEvent", "FeedbackModel", "examine_probability"]

_MAX_EVENT_ID = (1 << 63) - 1
_DEFAULT_DURATION_S = 300.0  # an item with no known duration (MovieLens)


@dataclass(frozen=True)
class FeedbackEvent:
    """One event for IngestEvents (parity.v1.Event fields), tied to the request that served the item."""

    event_id: int
    ts_ms: int
    user_id: int
    item_id: int
    type: str  # impression, play, like
    value: float
    request_id: str

    def as_dict(self) -> dict:
        return {"event_id": str(self.event_id), "ts_ms": self.ts_ms, "user_id": str(self.user_id), "item_id": str(self.item_id),
                "type": self.type, "value": self.value, "request_id": self.request_id}


def examine_probability(positions: np.ndarray) -> np.ndarray:
    """How likely a user looks closely at position i (0-based): 1 / log2(i + 2)."""
    return 1.0 / np.log2(np.asarray(positions, dtype=np.float64) + 2.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _hash64(*parts: object) -> int:
    h = hashlib.blake2b("\x00".join(map(str, parts)).encode("utf-8"), digest_size=8, person=b"parity-loop").digest()
    return int.from_bytes(h, "big")


@dataclass(frozen=True)
class _Params:
    w_affinity: float = 1.0
    w_quality: float = 1.0
    prior_events: float = 5.0  # pseudo-events pulling a user's topic mix toward the global one
    prior_exposures: float = 20.0  # pseudo-exposures pulling an item's rate toward the global one


class FeedbackModel:
    """Fitted user tastes and item qualities; `respond` turns a served list into events."""

    def __init__(self, *, user_ids: np.ndarray, user_lift: np.ndarray, item_ids: np.ndarray, item_topic: np.ndarray,
                 item_quality: np.ndarray, item_watch_frac: np.ndarray, item_duration_s: np.ndarray, base_logit: float,
                 seed: int = 0, params: _Params | None = None, catalog_durations: dict[int, float] | None = None) -> None:
        self.seed = int(seed)
        self.p = params or _Params()
        self.user_ids = np.asarray(user_ids, dtype=np.int64)
        self.user_lift = np.asarray(user_lift, dtype=np.float64)  # (users, topics + 1): last column = unknown topic
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.item_topic = np.asarray(item_topic, dtype=np.int64)  # index into user_lift's columns
        self.item_quality = np.asarray(item_quality, dtype=np.float64)
        self.item_watch_frac = np.asarray(item_watch_frac, dtype=np.float64)
        self.item_duration_s = np.asarray(item_duration_s, dtype=np.float64)
        self.base_logit = float(base_logit)
        # every catalogue item's duration, also for items the log never showed: a play of such an
        # item must stay within what the server accepts (at most twice its duration)
        self._durations = {int(k): float(v) for k, v in (catalog_durations or {}).items() if v and float(v) > 0}
        self._u = {int(u): i for i, u in enumerate(self.user_ids.tolist())}
        self._i = {int(it): i for i, it in enumerate(self.item_ids.tolist())}
        self._mean_frac = float(self.item_watch_frac.mean()) if len(self.item_watch_frac) else 0.5

    # -- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, events: EventBatch, *, item_durations: dict[int, float] | None = None, seed: int = 0) -> FeedbackModel:
        """Fit from an event batch (any order; duplicates by event_id are dropped).
        `item_durations` (item id -> seconds) gives watch fractions; unknown: 300 s."""
        ev = events.deduplicated()
        p = _Params()
        typ = ev.type.astype(np.int64)
        rating_pos = (typ == EventType.RATING) & (ev.value >= 4.0)
        engaged = (typ == EventType.PLAY) | (typ == EventType.LIKE) | rating_pos
        has_impressions = bool(np.any(typ == EventType.IMPRESSION))
        exposure = (typ == EventType.IMPRESSION) if has_impressions else (typ == EventType.RATING)
        positive = (typ == EventType.PLAY) if has_impressions else rating_pos

        n_topics = int(ev.topic.max()) + 1 if len(ev) and ev.topic.max() >= 0 else 0
        topic_col = np.where(ev.topic >= 0, ev.topic, n_topics).astype(np.int64)  # unknown topic: the last column

        item_ids, item_idx = np.unique(ev.item_id, return_inverse=True)
        # an item's topic: the one its events carry (denormalised at the source; first one wins)
        first = np.full(len(item_ids), -1, dtype=np.int64)
        order = np.arange(len(ev))[::-1]
        first[item_idx[order]] = topic_col[order]
        item_topic = first

        user_ids, user_idx = np.unique(ev.user_id, return_inverse=True)
        counts = np.zeros((len(user_ids), n_topics + 1))
        np.add.at(counts, (user_idx[engaged], topic_col[engaged]), 1.0)
        glob = counts.sum(axis=0) + 1.0
        glob = glob / glob.sum()
        share = (counts + p.prior_events * glob) / (counts.sum(axis=1, keepdims=True) + p.prior_events)
        user_lift = share / glob

        expo = np.bincount(item_idx[exposure], minlength=len(item_ids)).astype(np.float64)
        pos = np.bincount(item_idx[positive], minlength=len(item_ids)).astype(np.float64)
        rate0 = (pos.sum() + 1.0) / (expo.sum() + 2.0)
        rate = (pos + p.prior_exposures * rate0) / (expo + p.prior_exposures)
        quality = _logit(rate) - _logit(rate0)

        durations = np.array([float((item_durations or {}).get(int(i), 0.0)) or _DEFAULT_DURATION_S for i in item_ids.tolist()])
        plays = typ == EventType.PLAY
        watch = np.bincount(item_idx[plays], weights=ev.value[plays], minlength=len(item_ids))
        n_plays = np.bincount(item_idx[plays], minlength=len(item_ids)).astype(np.float64)
        frac_items = np.clip(watch / np.maximum(n_plays, 1.0) / durations, 0.0, 1.0)
        frac0 = float(frac_items[n_plays > 0].mean()) if np.any(n_plays > 0) else 0.5
        watch_frac = (frac_items * n_plays + 5.0 * frac0) / (n_plays + 5.0)

        return cls(user_ids=user_ids, user_lift=user_lift, item_ids=item_ids, item_topic=item_topic, item_quality=quality,
                   item_watch_frac=watch_frac, item_duration_s=durations, base_logit=float(_logit(rate0)), seed=seed, params=p,
                   catalog_durations=item_durations)

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike[str], *, seed: int = 0, start_ts: int | None = None,
                      end_ts: int | None = None) -> FeedbackModel:
        """Fit from a data dir's event log (optionally a time range) and its item durations."""
        items = read_items(data_dir)
        durations = dict(zip(items.column("item_id").to_pylist(), items.column("duration_s").to_pylist()))
        events = EventLog(events_dir(data_dir)).read(start_ts, end_ts, must_exist=True)
        return cls.fit(events, item_durations=durations, seed=seed)

    # -- the user's side -------------------------------------------------------------------
    def _lookup(self, user_id: int, item_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        idx = np.array([self._i.get(int(i), -1) for i in item_ids], dtype=np.int64)
        known = idx >= 0
        unknown_topic = self.user_lift.shape[1] - 1
        topic = np.where(known, self.item_topic[np.maximum(idx, 0)], unknown_topic)
        u = self._u.get(int(user_id))
        lift = self.user_lift[u, topic] if u is not None else np.ones(len(idx))
        quality = np.where(known, self.item_quality[np.maximum(idx, 0)], 0.0)
        frac = np.where(known, self.item_watch_frac[np.maximum(idx, 0)], self._mean_frac)
        other = np.array([self._durations.get(int(i), _DEFAULT_DURATION_S) for i in item_ids], dtype=np.float64)
        dur = np.where(known, self.item_duration_s[np.maximum(idx, 0)], other)
        return lift, quality, frac, dur

    def affinity(self, user_id: int, item_ids: Sequence[int]) -> np.ndarray:
        """The user's topic lift for each item (1 for a new user or an unknown item)."""
        return self._lookup(user_id, item_ids)[0]

    def play_probability(self, user_id: int, item_ids: Sequence[int]) -> np.ndarray:
        """P(play) of each item if examined (no position discount): rises with affinity x quality."""
        lift, quality, _, _ = self._lookup(user_id, item_ids)
        return _sigmoid(self.base_logit + self.p.w_affinity * np.log(lift) + self.p.w_quality * quality)

    def respond(self, user_id: int, item_ids: Sequence[int], now_ms: int, request_id: str) -> list[FeedbackEvent]:
        """The events `user_id` produces for the list `item_ids` (in shown order) served at
        `now_ms` by request `request_id`: impressions, plays (value: watch seconds), likes."""
        items = [int(i) for i in item_ids]
        if not items:
            return []
        rng = np.random.default_rng([self.seed, _hash64(request_id), _hash64(user_id)])
        lift, quality, frac, dur = self._lookup(user_id, items)
        n = len(items)
        pos = np.arange(n)
        p_play = examine_probability(pos) * self.play_probability(user_id, items)
        u = rng.random((3, n))
        played = u[0] < p_play
        liking = _sigmoid(self.p.w_affinity * np.log(lift) + self.p.w_quality * quality)
        w_frac = np.clip(frac * (0.6 + 0.8 * liking) * np.exp(rng.normal(0.0, 0.3, n)), 0.02, 1.0)
        watch_s = np.round(np.maximum(1.0, w_frac * dur), 1)
        liked = played & (u[1] < 0.05 + 0.3 * liking * w_frac)
        imp_ts = int(now_ms) + 200 * pos
        play_ts = imp_ts + 1000 + (u[2] * 2000).astype(np.int64)

        def ev(kind: str, i: int, ts: int, value: float) -> FeedbackEvent:
            eid = _hash64(self.seed, request_id, i, items[i], kind) & _MAX_EVENT_ID
            return FeedbackEvent(eid, int(ts), int(user_id), items[i], kind, float(value), request_id)

        out = [ev("impression", i, imp_ts[i], 1.0) for i in range(n)]
        for i in np.flatnonzero(played).tolist():
            out.append(ev("play", i, play_ts[i], watch_s[i]))
            if liked[i]:
                out.append(ev("like", i, play_ts[i] + 500, 1.0))
        out.sort(key=lambda e: (e.ts_ms, e.event_id))
        return out
