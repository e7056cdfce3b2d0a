"""This session's events, kept on the device, and the session features (BUNDLE_FORMAT.md
"Session features") computed from them for each candidate."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mobile_sdk.bundle import SessionSpec

ENGAGED_TYPES = (1, 2, 4)  # BUNDLE_FORMAT.md "Ranking": removed from a session's recommendations


@dataclass(frozen=True)
class Event:
    """One event of this session. `topic` / `creator_id` None: looked up in the item table (-1 if absent)."""

    ts: int
    item_id: int
    type: int
    value: float = 1.0
    topic: int | None = None
    creator_id: int | None = None

    @classmethod
    def coerce(cls, event: "Event | Mapping") -> "Event":
        if isinstance(event, Event):
            e = event
        elif isinstance(event, Mapping):
            unknown = set(event) - {"ts", "item_id", "type", "value", "topic", "creator_id"}
            if unknown:
                raise ValueError(f"unknown event fields {sorted(unknown)}")
            try:
                e = cls(**event)
            except TypeError as exc:
                raise ValueError(f"bad event {dict(event)!r}: {exc}") from None
        else:
            raise TypeError(f"event must be an Event or a mapping, got {type(event).__name__}")
        for name in ("ts", "item_id", "type"):
            v = getattr(e, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"event {name} must be an int, got {v!r}")
        if not math.isfinite(float(e.value)):
            raise ValueError(f"event value must be finite, got {e.value!r}")
        return cls(int(e.ts), int(e.item_id), int(e.type), float(e.value),
                   None if e.topic is None else int(e.topic), None if e.creator_id is None else int(e.creator_id))


class SessionLog:
    """Bounded: at most `max_events`, and events no window can count any more are dropped.

    Engaging events (types 1, 2, 4) are also kept apart, past the window (the last
    `max_engaged`): they are the user's history since the bundle (the item-item input) and what
    must never be recommended again, however long ago in this session they happened."""

    def __init__(self, max_events: int = 512, max_engaged: int = 256) -> None:
        if not isinstance(max_events, int) or max_events < 1:
            raise ValueError(f"max_events must be a positive int, got {max_events!r}")
        self.max_events = max_events
        self.max_engaged = max_engaged
        self._events: list[Event] = []
        self._engaged: list[Event] = []
        self._lock = threading.Lock()

    def record(self, event: Event, spec: SessionSpec | None) -> None:
        with self._lock:
            if event.type in ENGAGED_TYPES:
                self._engaged.append(event)
                if len(self._engaged) > self.max_engaged:
                    self._engaged.sort(key=lambda e: e.ts)
                    del self._engaged[: len(self._engaged) - self.max_engaged]
            self._events.append(event)
            if spec is not None:
                # For any now_ms >= the latest ts, c >= floor(latest / tile): older tiles never count again.
                n = spec.window_ms // spec.tile_ms
                first_tile = max(e.ts for e in self._events) // spec.tile_ms - n + 1
                self._events = [e for e in self._events if e.ts // spec.tile_ms >= first_tile]
            if len(self._events) > self.max_events:
                self._events.sort(key=lambda e: e.ts)
                del self._events[: len(self._events) - self.max_events]

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def engaged_events(self) -> list[Event]:
        with self._lock:
            return list(self._engaged)

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
            self._engaged.clear()


def engaged_items(events: list[Event]) -> set[int]:
    return {e.item_id for e in events if e.type in ENGAGED_TYPES}


def session_features(spec: SessionSpec, events: list[Event], now_ms: int, item_id: np.ndarray,
                     topic: np.ndarray, creator_id: np.ndarray, event_topic: np.ndarray,
                     event_creator: np.ndarray) -> dict[str, np.ndarray]:
    """{column: float32 (N,)} for N candidates. `event_topic` / `event_creator` are the events'
    topic and creator with lookups already done (-1 unknown)."""
    n_cand = len(item_id)
    ts = np.array([e.ts for e in events], dtype=np.int64)
    ev_item = np.array([e.item_id for e in events], dtype=np.int64)
    ev_type = np.array([e.type for e in events], dtype=np.int64)
    ev_value = np.array([e.value for e in events], dtype=np.float64)
    c = now_ms // spec.tile_ms
    n = spec.window_ms // spec.tile_ms
    in_window = (ts < now_ms) & (ts // spec.tile_ms >= c - n + 1)
    out: dict[str, np.ndarray] = {}
    for f in spec.features:
        m = in_window & np.isin(ev_type, np.array(f.types, dtype=np.int64))
        if f.entity == "user":
            match = np.broadcast_to(m[None, :], (n_cand, len(events)))
        elif f.entity == "item":
            match = (item_id[:, None] == ev_item[None, :]) & m[None, :]
        else:
            cand, ev = (topic, event_topic) if f.entity == "topic" else (creator_id, event_creator)
            cand = cand.astype(np.int64)
            match = (cand[:, None] == ev[None, :]) & (cand >= 0)[:, None] & (ev >= 0)[None, :] & m[None, :]
        count = match.sum(axis=1).astype(np.float64)
        vals = np.ones(len(events)) if f.value == "one" else ev_value
        total = np.where(match, vals[None, :], 0.0).sum(axis=1)
        if f.agg == "count":
            res = count
        elif f.agg == "sum":
            res = total
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                res = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        out[f.column] = res.astype(np.float32)
    return out
