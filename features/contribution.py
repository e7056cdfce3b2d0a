"""Per-user contribution caps: an admission rule at the ingest edge against poisoning.

Item aggregates (plays, likes, watch time) are sums over every user, so one user who sends
2,000 plays of item 12 moves item 12 to the top for everybody. `ContributionLimiter.filter`
admits, per fixed window W of event time:

- at most `max_per_item` events per (user, item, event type): default 20 per hour. A real
  person does not play, like or skip one video twenty times an hour (the heaviest
  user-item-type hour: 3-4 events in seven simulated logs, seeds 0-4 at 2,000 users x 500
  items and seeds 0-1 at 10,000 x 3,000; 1 in MovieLens-100K), yet the cap leaves room for
  re-watches and for the double counting described below;
- at most `max_per_user` events per user over all items: default 2,000 per hour, one event
  every 1.8 s for an hour: beyond a person scrolling a feed, and over three times the
  heaviest hour in the data we have (simulated: 40-53 events over the same seven logs;
  MovieLens-100K: 596 ratings).

Events beyond a cap are refused with a `Rejection` of kind RATE_LIMITED and the reason
`rate limited: ...`; the caller counts them and dead-letters them, never drops them silently.
The decision is made BEFORE the events are applied: `filter` takes a validated EventBatch
and returns the admitted part plus the refused ones.

Counters live in the online store (`OnlineStore.incr_many`), not in process memory, so every
server replica and stream consumer on one store shares them. Their names are
`contrib:{W}:{tile}:u:{user}` and `contrib:{W}:{tile}:ui:{user}:{item}:{type}`, with
tile = ts // W of the event's own time, so replaying a log gives the same decisions however
fast it is replayed. A counter expires `counter_ttl_ms` (default 2 W) after it is created,
which covers events arriving up to one more window late (the ingestor's allowed lateness
is 1 h by default). Counters count attempts, refused events included: an abuser stays
refused for the rest of the window. One `filter` call is two store round trips (`seen`,
then `incr_many`).

At-least-once redelivery. A redelivered batch must not be refused because its first
attempt was counted. Events are therefore counted only after deduplication: the first
occurrence of each event_id in the batch, and only events the ingestor has not applied yet
(`store.seen`, the ingestor's own dedupe markers). Duplicates pass through uncounted and the
ingestor reports them as duplicates. What remains: a batch counted whose commit then failed
(a store outage between the count and the commit, a crash) is counted again when retried.
That over-counts a window by one batch per failure, which the caps' headroom absorbs
(a user would need more than half the per-item cap in one window to be affected).

Where it applies: the live edges (gRPC IngestEvents, the Redis Stream consumer), like the
validation rules of features.event_rules. Refused events never enter the system. The batch
path (training from the event log) does not apply the limiter: the log holds what the edge
admitted, and recounting it there could only disagree with what was served.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from features.event_rules import RATE_LIMITED, Rejection
from features.events import MS_PER_HOUR, EventBatch, EventType
from features.online.base import OnlineStore

__all__ = ["ContributionLimits", "ContributionLimiter", "Admission"]


def _positive_int(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _duration(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms} ms"


@dataclass(frozen=True)
class ContributionLimits:
    """How much one user may contribute per window of event time (see the module docstring)."""

    max_per_item: int = 20  # events per (user, item, event type) per window
    max_per_user: int = 2000  # events per user per window, all items and types
    window_ms: int = MS_PER_HOUR
    counter_ttl_ms: int | None = None  # None: 2 windows

    def __post_init__(self) -> None:
        _positive_int("max_per_item", self.max_per_item)
        _positive_int("max_per_user", self.max_per_user)
        _positive_int("window_ms", self.window_ms)
        if self.counter_ttl_ms is not None and _positive_int("counter_ttl_ms", self.counter_ttl_ms) < self.window_ms:
            raise ValueError(f"counter_ttl_ms must be >= window_ms ({self.window_ms}), got {self.counter_ttl_ms}: "
                             "a counter must outlive its window")

    @property
    def ttl_ms(self) -> int:
        return self.counter_ttl_ms if self.counter_ttl_ms is not None else 2 * self.window_ms


@dataclass(frozen=True, eq=False)
class Admission:
    """What `filter` decided for a batch."""

    admitted: EventBatch  # in input order; duplicates of applied events included (the ingestor skips them)
    index: np.ndarray  # int64, ascending: input position of each admitted event
    refused: tuple[Rejection, ...]  # kind RATE_LIMITED, by index; reasons start "rate limited: "


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """Per element, how many earlier elements (in order) share its group."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
    first = np.repeat(starts, np.diff(np.concatenate([starts, [len(g)]])))
    rank = np.empty(len(group), dtype=np.int64)
    rank[order] = np.arange(len(g)) - first
    return rank


class ContributionLimiter:
    """Caps each user's contribution per window; counters in `store` (shared by all edges).

    Needs from the store: `seen(event_ids)` (the ingestor's dedupe markers: give it the
    ingestor's store) and `incr_many(names, amounts, ttl_ms)`. StoreUnavailable from either
    propagates: the caller retries later (nothing was admitted, nothing is lost).
    """

    def __init__(self, store: OnlineStore, limits: ContributionLimits = ContributionLimits(), *, name: str = "contrib") -> None:
        if not isinstance(limits, ContributionLimits):
            raise TypeError(f"limits must be ContributionLimits, got {type(limits).__name__}")
        if not name or not name.isidentifier():
            raise ValueError(f"name must be a plain identifier (it prefixes counter names), got {name!r}")
        self.store, self.limits, self.name = store, limits, name

    def user_counters(self, user_id: int) -> Callable[[str], bool]:
        """A matcher for every counter of one user (erasure: their names carry the user id)."""
        head = f"{self.name}:"
        uid = str(int(user_id))

        def match(name: str) -> bool:
            parts = name.split(":")
            return name.startswith(head) and len(parts) >= 5 and parts[3] in ("u", "ui") and parts[4] == uid

        return match

    def _names(self, kind: str, rows: np.ndarray) -> list[str]:
        prefix = f"{self.name}:{self.limits.window_ms}"
        return [f"{prefix}:{r[0]}:{kind}:{':'.join(map(str, r[1:]))}" for r in rows.tolist()]

    def filter(self, events: EventBatch) -> Admission:
        """Admit what is within the caps, refuse the rest (decided before anything is applied)."""
        n = len(events)
        if n == 0:
            return Admission(events, np.empty(0, np.int64), ())
        _, first = np.unique(events.event_id, return_index=True)
        first = np.sort(first)
        seen = np.asarray(self.store.seen(events.event_id[first].tolist()), dtype=bool)
        fresh = first[~seen]  # positions counted: first occurrences the ingestor has not applied
        ok = np.ones(n, dtype=bool)
        refused: list[Rejection] = []
        if len(fresh):
            lim = self.limits
            tile = events.ts[fresh] // lim.window_ms
            user, item, etype = events.user_id[fresh], events.item_id[fresh], events.type[fresh].astype(np.int64)
            u_rows, u_of = np.unique(np.stack([tile, user], axis=1), axis=0, return_inverse=True)
            i_rows, i_of = np.unique(np.stack([tile, user, item, etype], axis=1), axis=0, return_inverse=True)
            u_of, i_of = u_of.reshape(-1), i_of.reshape(-1)
            u_amount = np.bincount(u_of, minlength=len(u_rows))
            i_amount = np.bincount(i_of, minlength=len(i_rows))
            totals = self.store.incr_many(self._names("u", u_rows) + self._names("ui", i_rows),
                                          [int(a) for a in u_amount] + [int(a) for a in i_amount], lim.ttl_ms)
            u_before = np.asarray(totals[: len(u_rows)], dtype=np.int64) - u_amount
            i_before = np.asarray(totals[len(u_rows):], dtype=np.int64) - i_amount
            i_count = i_before[i_of] + _rank_in_group(i_of)  # events of this group counted before this one
            u_count = u_before[u_of] + _rank_in_group(u_of)
            over_item = i_count >= lim.max_per_item
            over_user = u_count >= lim.max_per_user
            window = _duration(lim.window_ms)
            for j in np.flatnonzero(over_item | over_user).tolist():
                pos = int(fresh[j])
                ok[pos] = False
                u, i = int(user[j]), int(item[j])
                if over_item[j]:
                    what = EventType(int(etype[j])).name.lower()
                    reason = f"rate limited: user {u} sent more than {lim.max_per_item} {what} events for item {i} within one {window} window"
                    refused.append(Rejection(pos, "item_id", reason, RATE_LIMITED))
                else:
                    reason = f"rate limited: user {u} sent more than {lim.max_per_user} events within one {window} window"
                    refused.append(Rejection(pos, "user_id", reason, RATE_LIMITED))
        refused.sort(key=lambda r: r.index)
        index = np.flatnonzero(ok).astype(np.int64)
        return Admission(events if len(index) == n else events.take(index), index, tuple(refused))
