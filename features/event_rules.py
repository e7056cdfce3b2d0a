"""Event admission rules: ONE validation for every way an event enters Parity.

Live events arrive as gRPC `IngestEvents` messages (server/validation.py) and as Redis
Stream messages (features/redis_stream.py). Both turn their raw fields into an EventBatch
here, with the same rules and the same reasons, so an event refused on one path is refused
on the other. The functions are pure (no I/O, no clock: the caller passes `now_ms`) and
never raise on data: every input is either a valid event or a `Rejection` naming its field.

The rules (built from the dataset info and the item catalogue, `EventRules.from_dataset`):

- event_id in [0, 2^63-1]; ts in [0, now + max_future_ms] (no upper bound without a clock).
  A far-future ts is not only wrong, it would move the ingest watermark and make every
  honest event after it "late".
- user_id and item_id in [0, 2^31-1] (they are packed into pair entity codes).
- creator_id -1 (unknown) or in [0, 2^31-1]; topic -1 or in [0, n_topics) (a topic indexes
  the topic-affinity vectors); session_id -1 (none) or in [0, 2^63-1].
- type one of the EventType names (any case) or codes; a rating only where the dataset has
  ratings (MovieLens), and no event type outside the enum (type=300 used to overflow int8).
- value finite and plausible for its type. This is a poisoning defence: one play worth 1e7
  seconds put an item on top of every new user's list.
  * play = seconds watched: 0 <= v <= duration_s * play_tolerance when the catalogue knows
    the item's duration (> 0), else <= play_cap_s. The tolerance (default 2) admits a
    seek-back, a replayed passage, a loop of a short clip or 0.5x playback; the global cap
    (default 4 h) admits the longest thing Parity's catalogues hold in one sitting (a
    feature film with pauses; simulated items last at most 1 h) and no more.
  * impression, like, skip: 0 (proto3 "unset") or 1, stored as 1: their features count
    events (Source(..., "one") in features/repo.py), so any other value is a client error.
  * rating: within the dataset's scale (MovieLens 1..5).

Reasons start with the field name ("ts: ...", matching server.errors.InvalidArgument), are
short, and never echo more than ~40 characters of client text. Each rejection also has a
kind (MALFORMED: unparseable or missing; OUT_OF_RANGE: parsed but outside the field's
domain; IMPLAUSIBLE: a value no honest client sends) that callers count separately.

These are edge rules, like the per-user contribution cap (features/contribution.py): the
batch path (training from the event log) trusts the log and does not re-apply them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from features.catalog import ItemCatalog
from features.datasets import DatasetInfo
from features.events import EVENT_SCHEMA, EventBatch, EventType

__all__ = [
    "EventRules",
    "ParsedBatch",
    "Rejection",
    "MALFORMED",
    "OUT_OF_RANGE",
    "IMPLAUSIBLE",
    "RATE_LIMITED",
    "MAX_EVENT_ID",
    "MAX_ENTITY_ID",
    "RATING_SCALES",
    "DEFAULT_PLAY_TOLERANCE",
    "DEFAULT_PLAY_CAP_S",
    "DEFAULT_MAX_FUTURE_MS",
    "STREAM_FIELDS",
]

MALFORMED = "malformed"
OUT_OF_RANGE = "out_of_range"
IMPLAUSIBLE = "implausible"
RATE_LIMITED = "rate_limited"  # used by features.contribution

MAX_EVENT_ID = (1 << 63) - 1
MAX_ENTITY_ID = (1 << 31) - 1  # user, item, creator (pair entity codes pack two of them)
_MAX_INT64 = (1 << 63) - 1

RATING_SCALES: dict[str, tuple[float, float] | None] = {"movielens": (1.0, 5.0), "simulated": None}
DEFAULT_PLAY_TOLERANCE = 2.0
DEFAULT_PLAY_CAP_S = 4 * 3600.0
DEFAULT_MAX_FUTURE_MS = 5 * 60_000

STREAM_FIELDS = tuple(EVENT_SCHEMA.names)
_REQUIRED = ("event_id", "ts", "user_id", "item_id", "type")  # the others default: ids -1, value 0
_OPTIONAL_DEFAULTS = {"creator_id": "-1", "topic": "-1", "session_id": "-1", "value": "0"}
_FIELD_SET = frozenset(STREAM_FIELDS)
_EVENT_ID_CHARS = 20
_VALUE_CHARS = 32
_TYPE_CHARS = 16
_TYPE_NAMES = sorted(t.name.lower() for t in EventType)
_TYPE_BY_TEXT = {**{t.name.lower(): int(t) for t in EventType}, **{str(int(t)): int(t) for t in EventType}}
_COUNTED = (int(EventType.IMPRESSION), int(EventType.LIKE), int(EventType.SKIP))
# What repr(float) writes, and nothing float() accepts besides (no spaces, "_", hex, Unicode digits).
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_NON_FINITE = frozenset({"nan", "inf", "infinity"})  # parsed, then refused as not finite


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why the input at `index` was refused: `reason` starts with `field`."""

    index: int
    field: str
    reason: str
    kind: str  # MALFORMED | OUT_OF_RANGE | IMPLAUSIBLE | RATE_LIMITED

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, eq=False)
class ParsedBatch:
    """The valid events of an input batch, where each came from, and why the others did not."""

    events: EventBatch
    index: np.ndarray  # int64, ascending: input position of each valid event
    rejected: tuple[Rejection, ...]  # one per refused input, by index

    def __len__(self) -> int:
        return len(self.events)


class _Bad(Exception):
    """Internal: one field of one input is wrong (never escapes this module)."""

    def __init__(self, field: str, problem: str, kind: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.kind = field, kind


def _show(text: str) -> str:
    """Client text as it may appear in a reason: at most 24 characters, quoted."""
    return repr(text if len(text) <= 24 else text[:21] + "...")


def _ascii(field: str, raw: Any, max_chars: int) -> str:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        if len(raw) > max_chars:
            raise _Bad(field, f"is {len(raw)} characters long; the limit is {max_chars}", MALFORMED)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise _Bad(field, "must be ASCII text, got other bytes", MALFORMED) from None
    if not isinstance(raw, str):
        raise _Bad(field, f"must be text, got {type(raw).__name__}", MALFORMED)
    if len(raw) > max_chars:
        raise _Bad(field, f"is {len(raw)} characters long; the limit is {max_chars}", MALFORMED)
    return raw


def _int(field: str, raw: Any, *, max_chars: int, signed: bool) -> int:
    """A decimal integer from text: ASCII digits, a leading '-' only if `signed`.

    Stricter than int(): no spaces, '+', underscores or non-ASCII digits ("١٢")."""
    text = _ascii(field, raw, max_chars)
    if text == "":
        raise _Bad(field, "must not be empty", MALFORMED)
    digits = text[1:] if signed and text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):
        what = "an integer" if signed else "a non-negative integer"
        raise _Bad(field, f"must be a decimal string of {what}, got {_show(text)}", MALFORMED)
    return int(text)


def _num(v: int) -> str:
    """A parsed client number as it may appear in a reason (at most 24 characters)."""
    text = str(v)
    return text if len(text) <= 24 else text[:21] + "..."


def _in_range(field: str, v: int, lo: int, hi: int) -> int:
    if v > hi:
        raise _Bad(field, f"must be <= {hi}, got {_num(v)}", OUT_OF_RANGE)
    if v < lo:
        raise _Bad(field, f"must be >= {lo}, got {_num(v)}", OUT_OF_RANGE)
    return v


def _optional_id(field: str, v: int, hi: int, what: str) -> int:
    """-1 (none) or in [0, hi]."""
    if v == -1 or 0 <= v <= hi:
        return v
    raise _Bad(field, f"must be -1 ({what}) or in [0, {hi}], got {_num(v)}", OUT_OF_RANGE)


@dataclass(frozen=True, eq=False)
class EventRules:
    """The admission rules for live events (see the module docstring).

    Build with `EventRules.from_dataset(info, catalog)`; `EventRules()` alone is the
    dataset-agnostic default (any topic < 2^31, ratings 1..5, no durations known).
    """

    n_topics: int | None = None  # topic must be < n_topics (None: < 2^31)
    rating_range: tuple[float, float] | None = (1.0, 5.0)  # None: the dataset has no ratings
    catalog: ItemCatalog | None = field(default=None, repr=False)
    play_tolerance: float = DEFAULT_PLAY_TOLERANCE
    play_cap_s: float = DEFAULT_PLAY_CAP_S
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS
    max_id_chars: int = 64
    dataset: str = "this dataset"  # named in reasons ("... are not part of simulated")

    def __post_init__(self) -> None:
        if self.n_topics is not None:
            if not isinstance(self.n_topics, int) or isinstance(self.n_topics, bool):
                raise TypeError(f"n_topics must be an int or None, got {self.n_topics!r}")
            if self.n_topics < 1:
                raise ValueError(f"n_topics must be >= 1, got {self.n_topics}")
        if self.rating_range is not None:
            lo, hi = self.rating_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"rating_range must be finite (low, high) with low <= high, got {self.rating_range!r}")
        if self.catalog is not None and not isinstance(self.catalog, ItemCatalog):
            raise TypeError(f"catalog must be an ItemCatalog or None, got {type(self.catalog).__name__}")
        for name in ("play_tolerance", "play_cap_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r}")
        if not (math.isfinite(self.play_tolerance) and self.play_tolerance >= 1.0):
            raise ValueError(f"play_tolerance must be finite and >= 1, got {self.play_tolerance!r}")
        if not (math.isfinite(self.play_cap_s) and self.play_cap_s > 0):
            raise ValueError(f"play_cap_s must be finite and > 0, got {self.play_cap_s!r}")
        for name, lo in (("max_future_ms", 0), ("max_id_chars", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {v!r}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")

    @classmethod
    def from_dataset(cls, info: DatasetInfo, catalog: ItemCatalog | None = None, **options: Any) -> "EventRules":
        """Rules for a data dir: its topic count, its rating scale, its items' durations.

        `options` override the other fields (play_tolerance, play_cap_s, max_future_ms,
        max_id_chars)."""
        if info.kind not in RATING_SCALES:
            raise ValueError(f"no event rules for dataset kind {info.kind!r}; known: {sorted(RATING_SCALES)}")
        return cls(n_topics=info.n_topics, rating_range=RATING_SCALES[info.kind], catalog=catalog, dataset=info.kind, **options)

    def with_catalog(self, catalog: ItemCatalog | None) -> "EventRules":
        """The same rules against a refreshed catalogue (the server reloads it on change)."""
        return replace(self, catalog=catalog)

    # -- the two entry points ------------------------------------------------------------------

    def parse_stream(self, messages: Sequence[Mapping[Any, Any] | None], now_ms: int | None = None) -> ParsedBatch:
        """Redis Stream message fields (bytes or str keys and values) -> valid events + rejections.

        Required fields: event_id, ts, user_id, item_id, type (a name or a code); optional:
        creator_id, topic, session_id (default -1) and value (default 0, as proto3 sends an
        unset double). Unknown extra fields are ignored. A None or empty mapping (a message
        deleted from the stream while pending) is MALFORMED."""
        return self._parse(messages, self._stream_row, now_ms, fill_from_catalog=False)

    def parse_proto(self, events: Sequence[Any], now_ms: int | None = None) -> ParsedBatch:
        """parity.v1.Event messages (duck-typed: event_id, ts_ms, user_id, item_id, type,
        value) -> valid events + rejections. Ids are decimal strings of non-negative ints, as
        the proto says. creator_id and topic come from the catalogue (-1 for items it does
        not know), session_id is -1: the API does not carry them."""
        return self._parse(events, self._proto_row, now_ms, fill_from_catalog=True)

    def _parse(self, items: Sequence[Any], row_of, now_ms: int | None, *, fill_from_catalog: bool) -> ParsedBatch:
        rows: list[tuple] = []
        index: list[int] = []
        rejected: list[Rejection] = []
        for i, item in enumerate(items):
            try:
                rows.append(row_of(item, now_ms))
                index.append(i)
            except _Bad as bad:
                rejected.append(Rejection(i, bad.field, str(bad), bad.kind))
        return self._finish(rows, index, rejected, fill_from_catalog=fill_from_catalog)

    # -- per-field rules, shared by both paths -------------------------------------------------

    def _ts(self, field: str, v: int, now_ms: int | None) -> int:
        if v < 0:
            raise _Bad(field, f"must be >= 0 (ms since the Unix epoch), got {_num(v)}", OUT_OF_RANGE)
        if now_ms is not None and v > now_ms + self.max_future_ms:
            raise _Bad(field, f"{_num(v)} is more than {self.max_future_ms} ms ahead of the clock ({now_ms})", OUT_OF_RANGE)
        if v > _MAX_INT64:
            raise _Bad(field, f"must be <= {_MAX_INT64}, got {_num(v)}", OUT_OF_RANGE)
        return v

    def _type(self, field: str, raw: Any) -> int:
        try:
            text = _ascii(field, raw, 64)
        except _Bad:
            raise _Bad(field, f"must be one of {_TYPE_NAMES} (or their codes 0..{len(_TYPE_NAMES) - 1})", MALFORMED) from None
        t = _TYPE_BY_TEXT.get(text.lower())
        if t is None:
            digits = text.lstrip("-")
            kind = OUT_OF_RANGE if digits.isascii() and digits.isdigit() else MALFORMED
            raise _Bad(field, f"must be one of {_TYPE_NAMES} (or their codes 0..{len(_TYPE_NAMES) - 1}), got {_show(text)}", kind)
        if t == int(EventType.RATING) and self.rating_range is None:
            raise _Bad(field, f"rating events are not part of {self.dataset} (it has no ratings)", OUT_OF_RANGE)
        return t

    @staticmethod
    def _finite(field: str, v: float) -> float:
        if not math.isfinite(v):
            raise _Bad(field, f"must be finite, got {v}", OUT_OF_RANGE)
        return v

    def _topic(self, field: str, v: int) -> int:
        hi = MAX_ENTITY_ID if self.n_topics is None else self.n_topics - 1
        return _optional_id(field, v, hi, "unknown")

    def _stream_row(self, raw: Mapping[Any, Any] | None, now_ms: int | None) -> tuple:
        if not isinstance(raw, Mapping):
            raise _Bad("event_id", f"the message must be a mapping of fields, got {type(raw).__name__}", MALFORMED)
        if not raw:
            raise _Bad("event_id", "the message has no fields (deleted from the stream while pending?)", MALFORMED)
        f: dict[str, Any] = {}
        for k, v in raw.items():
            if isinstance(k, (bytes, bytearray)):
                try:
                    k = bytes(k).decode("ascii")
                except UnicodeDecodeError:
                    continue  # an extra field whose name is not even text: ignored like any extra
            if k in _FIELD_SET:
                f[k] = v
        missing = [n for n in _REQUIRED if n not in f]
        if missing:
            more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
            raise _Bad(missing[0], f"missing{more}", MALFORMED)
        g = lambda n: f.get(n, _OPTIONAL_DEFAULTS.get(n))  # noqa: E731
        eid = _in_range("event_id", _int("event_id", g("event_id"), max_chars=_EVENT_ID_CHARS, signed=True), 0, MAX_EVENT_ID)
        ts = self._ts("ts", _int("ts", g("ts"), max_chars=_EVENT_ID_CHARS, signed=True), now_ms)
        user = _in_range("user_id", _int("user_id", g("user_id"), max_chars=self.max_id_chars, signed=True), 0, MAX_ENTITY_ID)
        item = _in_range("item_id", _int("item_id", g("item_id"), max_chars=self.max_id_chars, signed=True), 0, MAX_ENTITY_ID)
        creator = _optional_id("creator_id", _int("creator_id", g("creator_id"), max_chars=self.max_id_chars, signed=True), MAX_ENTITY_ID, "unknown")
        topic = self._topic("topic", _int("topic", g("topic"), max_chars=self.max_id_chars, signed=True))
        session = _optional_id("session_id", _int("session_id", g("session_id"), max_chars=_EVENT_ID_CHARS, signed=True), _MAX_INT64, "none")
        t = self._type("type", g("type"))
        text = _ascii("value", g("value"), _VALUE_CHARS)
        if _DECIMAL.fullmatch(text) is None and text.lower().lstrip("+-") not in _NON_FINITE:
            raise _Bad("value", f"must be a decimal number, got {_show(text)}", MALFORMED)
        value = float(text)
        return eid, ts, user, item, creator, topic, session, t, self._finite("value", value)

    def _proto_row(self, ev: Any, now_ms: int | None) -> tuple:
        eid = _in_range("event_id", _int("event_id", ev.event_id, max_chars=_EVENT_ID_CHARS, signed=False), 0, MAX_EVENT_ID)
        raw_ts = ev.ts_ms
        if not isinstance(raw_ts, int) or isinstance(raw_ts, bool):
            raise _Bad("ts_ms", f"must be an integer, got {type(raw_ts).__name__}", MALFORMED)
        ts = self._ts("ts_ms", raw_ts, now_ms)
        user = _in_range("user_id", _int("user_id", ev.user_id, max_chars=self.max_id_chars, signed=False), 0, MAX_ENTITY_ID)
        item = _in_range("item_id", _int("item_id", ev.item_id, max_chars=self.max_id_chars, signed=False), 0, MAX_ENTITY_ID)
        t = self._type("type", ev.type)
        try:
            value = float(ev.value)
        except (TypeError, ValueError):
            raise _Bad("value", f"must be a number, got {type(ev.value).__name__}", MALFORMED) from None
        return eid, ts, user, item, -1, -1, -1, t, self._finite("value", value)

    # -- per-type plausibility (vectorised) and assembly -----------------------------------------

    def _catalog_rows(self, item_id: np.ndarray) -> np.ndarray | None:
        """Catalogue row per event's item (-1: unknown); None without a catalogue. Looked up once
        per batch for both the durations and the item attributes."""
        cat = self.catalog
        if cat is None or len(cat) == 0 or len(item_id) == 0:
            return None
        return cat.index(item_id)

    def _durations(self, rows: np.ndarray | None, n: int) -> np.ndarray:
        """Catalogue duration per event's item; 0 where unknown."""
        if rows is None:
            return np.zeros(n)
        return np.where(rows >= 0, self.catalog.duration_s[np.maximum(rows, 0)], 0.0)

    def _implausible(self, t: int, v: float, item: int, duration: float) -> str:
        name = EventType(t).name.lower()
        if t in _COUNTED:
            article = "an" if name[0] in "aeiou" else "a"
            return f"value: {article} {name} must be 0 (unset) or 1, got {v:.6g}"
        if t == int(EventType.PLAY):
            if duration > 0:
                return (f"value: a play of item {item} must last 0..{duration * self.play_tolerance:.6g} s "
                        f"({self.play_tolerance:g} x its {duration:.6g} s duration), got {v:.6g}")
            return f"value: a play must last 0..{self.play_cap_s:.6g} s (the cap for items of unknown duration), got {v:.6g}"
        lo, hi = self.rating_range or (math.nan, math.nan)
        return f"value: a rating must be in [{lo:g}, {hi:g}], got {v:.6g}"

    def _finish(self, rows: list[tuple], index: list[int], rejected: list[Rejection], *, fill_from_catalog: bool) -> ParsedBatch:
        if not rows:
            return ParsedBatch(EventBatch.empty(), np.empty(0, np.int64), tuple(rejected))
        cols = list(zip(*rows))
        eid, ts, user, item, creator, topic, session = (np.asarray(c, dtype=np.int64) for c in cols[:7])
        etype = np.asarray(cols[7], dtype=np.int8)
        value = np.asarray(cols[8], dtype=np.float64)
        rows = self._catalog_rows(item)
        duration = self._durations(rows, len(item))
        counted = np.isin(etype, _COUNTED)
        play = etype == int(EventType.PLAY)
        rating = etype == int(EventType.RATING)
        cap = np.where(duration > 0, duration * self.play_tolerance, self.play_cap_s)
        ok = np.where(counted, (value == 0) | (value == 1), True)
        ok &= np.where(play, (value >= 0) & (value <= cap), True)
        if self.rating_range is not None:
            lo, hi = self.rating_range
            ok &= np.where(rating, (value >= lo) & (value <= hi), True)
        pos = np.asarray(index, dtype=np.int64)
        if not ok.all():
            for j in np.flatnonzero(~ok).tolist():
                reason = self._implausible(int(etype[j]), float(value[j]), int(item[j]), float(duration[j]))
                rejected.append(Rejection(int(pos[j]), "value", reason, IMPLAUSIBLE))
            rejected.sort(key=lambda r: r.index)
            eid, ts, user, item, creator, topic, session, etype, value, pos = (
                a[ok] for a in (eid, ts, user, item, creator, topic, session, etype, value, pos))
            rows = rows[ok] if rows is not None else None
        value = np.where(np.isin(etype, _COUNTED), 1.0, value)  # counted events weigh one
        if fill_from_catalog:
            creator, topic = self._item_attributes(rows, len(item))
        events = EventBatch(event_id=eid, ts=ts, user_id=user, item_id=item, creator_id=creator, topic=topic,
                            session_id=session, type=etype, value=value)
        return ParsedBatch(events, pos, tuple(rejected))

    def _item_attributes(self, rows: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(creator_id, topic) per event's item from the catalogue; -1 for items it does not know."""
        if rows is None:
            return np.full(n, -1, np.int64), np.full(n, -1, np.int32)
        cat, known, r = self.catalog, rows >= 0, np.maximum(rows, 0)
        return np.where(known, cat.creator_id[r], -1).astype(np.int64), np.where(known, cat.topic[r], -1).astype(np.int32)
