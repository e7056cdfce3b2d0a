"""Declarative feature definitions: entities, sources, windows, features, feature sets.

Plain frozen dataclasses that anyone can read (in the spirit of Feast's feature repo). A
feature set's version is a hash of its canonical definition, so any change to the maths
yields a new version and old versions stay readable under their own keys.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property

import numpy as np

from features.events import EventBatch, EventType

__all__ = ["Agg", "Entity", "Source", "Window", "Feature", "FeatureSet", "PAIR_SHIFT"]

PAIR_SHIFT = 32  # pair entity code = (first << 32) | second; both parts must be >= 0
_MAX_PART = (1 << 31) - 1


class Agg(str, Enum):
    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    MAX = "max"
    DECAYED_SUM = "decayed_sum"
    LAST = "last"
    DECAYED_VECTOR = "decayed_vector"  # one decayed sum per value of an index column (topic)


_WINDOWED = {Agg.COUNT, Agg.SUM, Agg.MEAN, Agg.MAX}
_DECAYED = {Agg.DECAYED_SUM, Agg.DECAYED_VECTOR}


@dataclass(frozen=True)
class Entity:
    """What a feature is about; `keys` are event columns. Two keys make a pair entity."""

    name: str
    keys: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.keys) <= 2:
            raise ValueError(f"entity {self.name!r}: keys must be one or two event columns, got {self.keys}")

    @property
    def is_pair(self) -> bool:
        return len(self.keys) == 2

    def codes(self, events: EventBatch) -> tuple[np.ndarray, np.ndarray]:
        """(entity code per event, mask of events that have a valid entity)."""
        first = getattr(events, self.keys[0]).astype(np.int64)
        if not self.is_pair:
            return first, first >= 0
        second = getattr(events, self.keys[1]).astype(np.int64)
        ok = (first >= 0) & (second >= 0) & (first <= _MAX_PART) & (second <= _MAX_PART)
        return np.where(ok, (first << PAIR_SHIFT) | np.where(ok, second, 0), -1), ok

    def code_of(self, *parts: int) -> int:
        if len(parts) != len(self.keys):
            raise ValueError(f"entity {self.name!r} takes {len(self.keys)} id(s) {self.keys}, got {len(parts)}")
        for k, p in zip(self.keys, parts):
            if not 0 <= int(p) <= _MAX_PART:
                raise ValueError(f"{k} must be in [0, {_MAX_PART}], got {p}")
        return int(parts[0]) if not self.is_pair else (int(parts[0]) << PAIR_SHIFT) | int(parts[1])

    def key_id(self, code: int) -> str:
        """The id used in online-store keys: "42" or, for a pair, "42|7"."""
        code = int(code)
        if not self.is_pair:
            return str(code)
        return f"{code >> PAIR_SHIFT}|{code & ((1 << PAIR_SHIFT) - 1)}"

    def key_ids(self, codes: np.ndarray) -> list[str]:
        """`key_id` of many codes at once (the request path builds hundreds per read)."""
        c = np.asarray(codes, dtype=np.int64)
        if not self.is_pair:
            return list(map(str, c.tolist()))
        return [f"{a}|{b}" for a, b in zip((c >> PAIR_SHIFT).tolist(), (c & ((1 << PAIR_SHIFT) - 1)).tolist())]

    def parse_key_id(self, key_id: str) -> int:
        parts = key_id.split("|")
        try:
            return self.code_of(*(int(p) for p in parts))
        except ValueError as exc:
            raise ValueError(f"bad {self.name} id {key_id!r}: {exc}") from None


@dataclass(frozen=True)
class Source:
    """A filtered stream of events a feature aggregates; value "one" counts, "value" sums."""

    name: str
    event_types: tuple[EventType, ...]
    value: str = "value"

    def __post_init__(self) -> None:
        if self.value not in ("value", "one"):
            raise ValueError(f"source {self.name!r}: value must be 'value' or 'one', got {self.value!r}")
        if not self.event_types:
            raise ValueError(f"source {self.name!r}: needs at least one event type")

    def mask(self, events: EventBatch) -> np.ndarray:
        m = events.type == int(self.event_types[0])  # a few comparisons beat np.isin on small batches
        for t in self.event_types[1:]:
            m |= events.type == int(t)
        return m

    def values(self, events: EventBatch) -> np.ndarray:
        return np.ones(len(events), dtype=np.float64) if self.value == "one" else events.value


@dataclass(frozen=True)
class Window:
    """A tiled window: tiles of `tile_ms` aligned to the epoch; duration is a multiple."""

    duration_ms: int
    tile_ms: int

    def __post_init__(self) -> None:
        if self.tile_ms <= 0 or self.duration_ms <= 0 or self.duration_ms % self.tile_ms:
            raise ValueError(f"window {self.duration_ms} ms must be a positive multiple of its tile {self.tile_ms} ms")

    @property
    def n_tiles(self) -> int:
        return self.duration_ms // self.tile_ms


@dataclass(frozen=True)
class Feature:
    name: str
    agg: Agg
    source: str
    window: Window | None = None
    half_life_ms: int | None = None
    dim: int = 1  # DECAYED_VECTOR: length of the vector
    index_column: str | None = None  # DECAYED_VECTOR: event column giving the position
    default: float = 0.0  # the value used when the feature is missing (flag set)
    description: str = ""

    def __post_init__(self) -> None:
        if self.agg in _WINDOWED and self.window is None:
            raise ValueError(f"feature {self.name!r}: {self.agg.value} needs a window")
        if self.agg not in _WINDOWED and self.window is not None:
            raise ValueError(f"feature {self.name!r}: {self.agg.value} takes no window")
        if self.agg in _DECAYED and (self.half_life_ms is None or self.half_life_ms <= 0):
            raise ValueError(f"feature {self.name!r}: {self.agg.value} needs half_life_ms > 0")
        if self.agg is Agg.DECAYED_VECTOR and (self.dim < 1 or not self.index_column):
            raise ValueError(f"feature {self.name!r}: decayed_vector needs dim >= 1 and index_column")
        if self.agg is not Agg.DECAYED_VECTOR and self.dim != 1:
            raise ValueError(f"feature {self.name!r}: only decayed_vector has dim != 1")
        if not np.isfinite(self.default):
            raise ValueError(f"feature {self.name!r}: default must be finite")

    @property
    def columns(self) -> list[str]:
        return [self.name] if self.dim == 1 else [f"{self.name}[{i}]" for i in range(self.dim)]


@dataclass(frozen=True)
class FeatureSet:
    """Features of one entity that are stored, versioned and expired together."""

    name: str
    entity: Entity
    sources: tuple[Source, ...]
    features: tuple[Feature, ...]
    ttl_ms: int
    description: str = ""
    owner: str = "parity"
    # Raw fields this set is derived from that are PII; their values never become features.
    pii_inputs: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.ttl_ms <= 0:
            raise ValueError(f"feature set {self.name!r}: ttl_ms must be > 0")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature set {self.name!r}: duplicate feature names")
        known = {s.name for s in self.sources}
        for f in self.features:
            if f.source not in known:
                raise ValueError(f"feature {f.name!r} uses unknown source {f.source!r}; known: {sorted(known)}")

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def columns(self) -> list[str]:
        return [c for f in self.features for c in f.columns]

    def definition(self) -> dict:
        """The canonical definition: what the version hashes (description excluded)."""
        d = asdict(self)
        d.pop("description", None)
        d.pop("owner", None)
        for f in d["features"]:
            f.pop("description", None)
        return json.loads(json.dumps(d, sort_keys=True, default=_enc))

    @cached_property
    def version(self) -> str:  # cached: the definition is frozen, and keys need it per request
        blob = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
        return "v" + hashlib.sha256(blob.encode()).hexdigest()[:12]

    def event_mask(self, events: EventBatch) -> np.ndarray:
        """Events this set consumes: any of its sources, with a valid entity."""
        m = np.zeros(len(events), dtype=bool)
        for s in self.sources:
            m |= s.mask(events)
        return m & self.entity.codes(events)[1]


def _enc(o: object) -> object:
    if isinstance(o, Enum):
        return o.value
    raise TypeError(f"cannot encode {type(o)}")
