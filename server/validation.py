"""Request validation: proto messages in, typed queries out, or InvalidArgument naming the field.

Pure functions (no grpc, no I/O): every check the server makes on what a client sent lives
here, so the bad-input matrix is testable without a port. Ids on the wire are decimal
strings of non-negative integers (see the proto); user and item ids must also fit the
feature store's entity codes (< 2^31).
"""
from __future__ import annotations

import functools
import math
import uuid
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from features.event_rules import MALFORMED, MAX_ENTITY_ID, MAX_EVENT_ID, EventRules, Rejection
from features.events import EventBatch
from server.config import ServerConfig
from server.errors import InvalidArgument

__all__ = ["RecommendQuery", "RankQuery", "FeaturesQuery", "ParsedEvents", "MAX_ENTITY_ID", "MAX_EVENT_ID",
           "parse_id", "validate_recommend", "validate_rank", "validate_get_features", "parse_events", "request_id_of"]

_MAX_REQUEST_ID = 128
_MAX_CONTEXT_KEY = 64


@dataclass(frozen=True)
class RecommendQuery:
    user_id: int
    k: int
    exclude: np.ndarray  # int64, sorted unique
    context: tuple[tuple[str, float], ...]  # sorted by key
    request_id: str
    include_latency: bool


@dataclass(frozen=True)
class RankQuery:
    user_id: int
    item_ids: np.ndarray  # int64, request order (duplicates allowed)
    context: tuple[tuple[str, float], ...]
    request_id: str


@dataclass(frozen=True)
class FeaturesQuery:
    entity_type: str
    entity_id: str
    feature_sets: tuple[str, ...]  # empty: every set of the entity type


@dataclass(frozen=True)
class ParsedEvents:
    """The valid events of a batch, and what was wrong with the others."""

    batch: EventBatch  # topic/creator from the rules' catalogue
    invalid: int
    first_error: str | None
    rejected: tuple[Rejection, ...] = ()  # every refused event: (index, field, reason, kind)
    request_ids: tuple[str | None, ...] = ()  # per event of `batch`: the request that served its item (None: not said)

    def __len__(self) -> int:
        return len(self.batch)


def parse_id(field: str, text: str, *, max_value: int = MAX_ENTITY_ID, max_chars: int = 64) -> int:
    if not isinstance(text, str) or text == "":
        raise InvalidArgument(field, "must not be empty")
    if len(text) > max_chars:
        raise InvalidArgument(field, f"is {len(text)} characters long; the limit is {max_chars}")
    if not (text.isascii() and text.isdigit()):
        shown = text if len(text) <= 24 else text[:21] + "..."
        raise InvalidArgument(field, f"must be a decimal string of a non-negative integer, got {shown!r}")
    v = int(text)
    if v > max_value:
        raise InvalidArgument(field, f"must be <= {max_value}, got {text}")
    return v


def request_id_of(text: str) -> str:
    """The client's request id, or a new one when empty."""
    if not text:
        return uuid.uuid4().hex
    if len(text) > _MAX_REQUEST_ID or not text.isprintable():
        raise InvalidArgument("request_id", f"must be at most {_MAX_REQUEST_ID} printable characters")
    return text


def _event_request_id(raw: object) -> str | None:
    """An event's request id (Event.request_id, optional): None when unset; the same rule as a
    request's own id (at most 128 printable characters), since the feedback join matches the two."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ValueError(f"request_id: must be text, got {type(raw).__name__}")
    if len(raw) > _MAX_REQUEST_ID:
        raise ValueError(f"request_id: is {len(raw)} characters long; the limit is {_MAX_REQUEST_ID}")
    if not raw.isprintable():
        raise ValueError("request_id: must be printable characters (no control characters)")
    return raw


def _context(ctx: Mapping[str, float], cfg: ServerConfig) -> tuple[tuple[str, float], ...]:
    if len(ctx) > cfg.max_context:
        raise InvalidArgument("context", f"has {len(ctx)} entries; the limit is {cfg.max_context}")
    out = []
    for key in sorted(ctx):
        if not key or len(key) > _MAX_CONTEXT_KEY or not key.isprintable():
            raise InvalidArgument("context", f"keys must be 1..{_MAX_CONTEXT_KEY} printable characters, got {key[:_MAX_CONTEXT_KEY + 1]!r}")
        v = float(ctx[key])
        if not math.isfinite(v):
            raise InvalidArgument(f"context[{key!r}]", f"must be finite, got {v}")
        out.append((key, v))
    return tuple(out)


def _ids(field: str, values: Sequence[str], limit: int, cfg: ServerConfig) -> np.ndarray:
    if len(values) > limit:
        raise InvalidArgument(field, f"has {len(values)} ids; the limit is {limit}")
    return np.fromiter((parse_id(f"{field}[{i}]", v, max_chars=cfg.max_id_chars) for i, v in enumerate(values)), dtype=np.int64, count=len(values))


def validate_recommend(req, cfg: ServerConfig) -> RecommendQuery:
    """`req` is a parity.v1.RecommendRequest."""
    user = parse_id("user_id", req.user_id, max_chars=cfg.max_id_chars)
    if req.k <= 0 or req.k > cfg.max_k:
        raise InvalidArgument("k", f"must be in [1, {cfg.max_k}], got {req.k}")
    exclude = np.unique(_ids("exclude_item_ids", req.exclude_item_ids, cfg.max_exclude, cfg))
    return RecommendQuery(user, int(req.k), exclude, _context(req.context, cfg), request_id_of(req.request_id), bool(req.include_latency))


def validate_rank(req, cfg: ServerConfig) -> RankQuery:
    """`req` is a parity.v1.RankRequest."""
    user = parse_id("user_id", req.user_id, max_chars=cfg.max_id_chars)
    if len(req.item_ids) == 0:
        raise InvalidArgument("item_ids", "must not be empty")
    items = _ids("item_ids", req.item_ids, cfg.max_rank_items, cfg)
    return RankQuery(user, items, _context(req.context, cfg), request_id_of(req.request_id))


def validate_get_features(req, entity_types: Iterable[str], sets_of: Mapping[str, Sequence[str]], cfg: ServerConfig) -> FeaturesQuery:
    """`req` is a parity.v1.GetFeaturesRequest; `sets_of` maps entity type -> its feature sets."""
    types = sorted(entity_types)
    if req.entity_type not in sets_of:
        raise InvalidArgument("entity_type", f"must be one of {types}, got {req.entity_type!r}")
    if not req.entity_id:
        raise InvalidArgument("entity_id", "must not be empty")
    if len(req.entity_id) > 2 * cfg.max_id_chars + 1:
        raise InvalidArgument("entity_id", f"is {len(req.entity_id)} characters long; the limit is {2 * cfg.max_id_chars + 1}")
    parts = req.entity_id.split("|")
    for i, p in enumerate(parts):
        parse_id("entity_id" if len(parts) == 1 else f"entity_id part {i + 1}", p, max_chars=cfg.max_id_chars)
    known = list(sets_of[req.entity_type])
    for name in req.feature_sets:
        if name not in known:
            raise InvalidArgument("feature_sets", f"{name!r} is not a feature set of entity type {req.entity_type!r}; known: {known}")
    return FeaturesQuery(req.entity_type, req.entity_id, tuple(dict.fromkeys(req.feature_sets)))


def _default_rules(cfg: ServerConfig) -> EventRules:
    """Dataset-agnostic rules with the server's limits (callers that know the dataset pass their own)."""
    return _rules_for(cfg.max_event_future_ms, cfg.max_id_chars)


@functools.lru_cache(maxsize=8)
def _rules_for(max_future_ms: int, max_id_chars: int) -> EventRules:
    return EventRules(max_future_ms=max_future_ms, max_id_chars=max_id_chars)


def parse_events(events: Sequence, now_ms: int, cfg: ServerConfig, rules: EventRules | None = None,
                 positions: Sequence[int] | None = None) -> ParsedEvents:
    """Valid events as an EventBatch; invalid ones are counted (one bad event never sinks a batch).

    The checks are features.event_rules, the same rules the Redis Stream consumer applies.
    Pass the rules built for the served dataset (`EventRules.from_dataset(info, catalog,
    max_future_ms=cfg.max_event_future_ms, max_id_chars=cfg.max_id_chars)`): they add the
    per-type plausibility that needs the catalogue's durations and the dataset's rating scale,
    and fill each item's topic and creator. Without them, dataset-agnostic rules with cfg's
    limits apply. `positions`: each event's position in its stream, for the first reason.
    Event.request_id (optional) is checked here too (at most 128 printable characters, as a
    request's own id: an event with a bad one is invalid, its reason naming `request_id`) and
    returned per valid event for the feedback log."""
    rids: list[str | None] = []
    bad: list[Rejection] = []
    good: list[int] = []
    for i, ev in enumerate(events):  # Event.request_id first: the event rules do not know it
        try:
            rids.append(_event_request_id(getattr(ev, "request_id", None)))
            good.append(i)
        except ValueError as exc:
            rids.append(None)
            bad.append(Rejection(i, "request_id", str(exc), MALFORMED))
    sub = events if not bad else [events[i] for i in good]
    parsed = (rules if rules is not None else _default_rules(cfg)).parse_proto(sub, now_ms)
    where = np.asarray(good, dtype=np.int64)  # position in `sub` -> position in `events`
    rejected = tuple(sorted(bad + [Rejection(int(where[r.index]), r.field, r.reason, r.kind) for r in parsed.rejected],
                            key=lambda r: r.index)) if bad else parsed.rejected
    request_ids = tuple(rids[int(j)] for j in where[parsed.index]) if len(parsed.index) else ()
    first = None
    if rejected:
        r = rejected[0]
        eid = events[r.index].event_id
        shown = eid[:24] if isinstance(eid, str) else type(eid).__name__
        first = f"event {positions[r.index] if positions is not None else r.index} (event_id {shown!r}): {r.reason}"
    return ParsedEvents(parsed.events, len(rejected), first, rejected, request_ids)
