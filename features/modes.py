"""Serving modes: how each feature set is kept fresh online, and where that choice is kept.

Three modes, one per feature-set version:
  * `streaming`: the ingestor folds every event into the entity's state record (the default);
  * `materialized` every N: a batch job writes the state as of a cadence boundary
    (features.cadence); between runs the values age by up to N;
  * `on_read`: the store keeps each entity's recent raw events (at most `cap`, older ones
    folded into a base state) and the request computes the values (features.on_read).

The mode is a serving choice, not maths: it is not part of FeatureSet, so it never changes a
set's version hash, and the numbers are the same in every mode (the same engine computes
them). It lives in the online store's metadata under `mode:{set}:{version}`, not in a
process: server workers, ingestors and schedulers on several hosts read one answer. A
missing key means streaming, so a store written before modes existed reads as it always did.

Overrides are written as a command line gives them:
`user_activity=on_read,user_creator=materialized:15m,item_popularity=on_read:cap=128`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from features.definitions import FeatureSet
from features.durations import format_duration_ms, parse_duration_ms
from features.online.base import OnlineStore

__all__ = [
    "DEFAULT_CAP",
    "MAX_CAP",
    "STREAMING",
    "ModePlan",
    "ServingMode",
    "SetMode",
    "load_mode",
    "load_modes",
    "mode_from_meta",
    "mode_key",
    "parse_overrides",
    "save_mode",
]

DEFAULT_CAP = 256
# A read computes every held event of every entity it asks for: 500 items x 4096 events is
# two million events in one request, already far past a request's budget (and ~120 KB per
# record). Larger caps buy nothing the base state does not already give.
MAX_CAP = 4096


class ServingMode(str, Enum):
    STREAMING = "streaming"
    MATERIALIZED = "materialized"
    ON_READ = "on_read"

    @classmethod
    def parse(cls, text: str) -> ServingMode:
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown serving mode {text!r}; allowed: {allowed}") from None


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


@dataclass(frozen=True)
class SetMode:
    """One feature set's serving mode and its one parameter.

    `every_ms` (the cadence) belongs to materialized only, `cap` (raw events kept per
    entity) to on_read only, where it defaults to DEFAULT_CAP; a parameter given to a mode
    that has no use for it is an error rather than silently ignored.
    """

    mode: ServingMode
    every_ms: int | None = None
    cap: int | None = None

    def __post_init__(self) -> None:
        mode = self.mode if isinstance(self.mode, ServingMode) else ServingMode.parse(self.mode)
        object.__setattr__(self, "mode", mode)
        if mode is ServingMode.MATERIALIZED:
            if self.every_ms is None:
                raise ValueError("materialized needs a cadence every_ms > 0 (e.g. materialized:15m)")
            if _check_int("every_ms", self.every_ms) <= 0:
                raise ValueError(f"every_ms must be > 0, got {self.every_ms}")
        elif self.every_ms is not None:
            raise ValueError(f"every_ms is the cadence of materialized; {mode.value} takes none (got {self.every_ms})")
        if mode is ServingMode.ON_READ:
            if self.cap is None:
                object.__setattr__(self, "cap", DEFAULT_CAP)
            elif not 1 <= _check_int("cap", self.cap) <= MAX_CAP:
                raise ValueError(f"cap must be in [1, {MAX_CAP}], got {self.cap}")
        elif self.cap is not None:
            raise ValueError(f"cap is the raw-event cap of on_read; {mode.value} takes none (got {self.cap})")

    @property
    def spec(self) -> str:
        """The override spelling: 'streaming', 'materialized:15m', 'on_read:cap=256'."""
        if self.mode is ServingMode.MATERIALIZED:
            return f"materialized:{format_duration_ms(self.every_ms)}"
        if self.mode is ServingMode.ON_READ:
            return f"on_read:cap={self.cap}"
        return self.mode.value

    @classmethod
    def parse(cls, text: str) -> SetMode:
        """'streaming', 'materialized:15m' (or ':every=15m'), 'on_read', 'on_read:cap=128'."""
        head, *options = [p.strip() for p in text.split(":")]
        mode = ServingMode.parse(head)
        if mode is ServingMode.STREAMING:
            if options:
                raise ValueError(f"streaming takes no options, got {':'.join(options)!r}")
            return cls(mode)
        if mode is ServingMode.MATERIALIZED:
            if len(options) != 1 or not options[0]:
                raise ValueError("materialized needs exactly one cadence, e.g. materialized:15m")
            opt = options[0]
            value = opt.split("=", 1)[1].strip() if opt.startswith("every=") else opt
            if "=" in value:
                raise ValueError(f"unknown materialized option {opt!r}; allowed: a cadence like 15m, or every=15m")
            try:
                every = parse_duration_ms(value)
            except ValueError as exc:
                raise ValueError(f"cadence {value!r}: {exc}") from None
            if every <= 0:
                raise ValueError(f"cadence {value!r} must be longer than 0")
            return cls(mode, every_ms=every)
        cap: int | None = None
        for opt in options:
            key, sep, value = (p.strip() for p in opt.partition("="))
            if key != "cap" or not sep:
                raise ValueError(f"unknown on_read option {opt!r}; allowed: cap=N")
            if cap is not None:
                raise ValueError("cap given twice")
            try:
                cap = int(value)
            except ValueError:
                raise ValueError(f"cap must be an integer, got {value!r}") from None
        return cls(mode, cap=cap)

    def to_dict(self) -> dict:
        d: dict = {"mode": self.mode.value}
        if self.every_ms is not None:
            d["every_ms"] = self.every_ms
        if self.cap is not None:
            d["cap"] = self.cap
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> SetMode:
        if not isinstance(d, Mapping) or "mode" not in d:
            raise ValueError(f"a serving mode is an object with a 'mode', got {d!r}")
        unknown = set(d) - {"mode", "every_ms", "cap"}
        if unknown:
            raise ValueError(f"unknown serving-mode fields {sorted(unknown)}; allowed: mode, every_ms, cap")
        return cls(d["mode"], every_ms=d.get("every_ms"), cap=d.get("cap"))


STREAMING = SetMode(ServingMode.STREAMING)


def parse_overrides(text: str, known: Iterable[str] | None = None) -> dict[str, SetMode]:
    """'set=mode[:option],...' as a dict. Names not in `known` (when given) are refused.

    Every error is a ValueError that names the set and the bad part.
    """
    known_set = None if known is None else set(known)
    out: dict[str, SetMode] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty entry in mode overrides {text!r}; write set=mode[,set=mode...]")
        name, sep, spec = (p.strip() for p in item.partition("="))
        if not sep or not name or not spec:
            raise ValueError(f"mode override {item!r} must read set=mode, e.g. user_activity=on_read")
        if known_set is not None and name not in known_set:
            raise ValueError(f"mode override {item!r}: unknown feature set {name!r}; known: {', '.join(sorted(known_set))}")
        if name in out:
            raise ValueError(f"mode override {item!r}: feature set {name!r} is given twice")
        try:
            out[name] = SetMode.parse(spec)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"mode override for {name!r} ({spec!r}): {exc}") from None
    return out


@dataclass(frozen=True, eq=True)
class ModePlan:
    """Feature-set name -> SetMode; a set not listed is streaming."""

    modes: Mapping[str, SetMode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, mode in self.modes.items():
            if not isinstance(name, str) or not isinstance(mode, SetMode):
                raise TypeError(f"a mode plan maps set names to SetMode, got {name!r}: {mode!r}")
        object.__setattr__(self, "modes", MappingProxyType(dict(sorted(self.modes.items()))))

    def of(self, name: str) -> SetMode:
        return self.modes.get(name, STREAMING)

    def sets_in(self, mode: ServingMode, sets: Sequence[FeatureSet]) -> list[FeatureSet]:
        return [fs for fs in sets if self.of(fs.name).mode is mode]

    def with_overrides(self, overrides: Mapping[str, SetMode]) -> ModePlan:
        return ModePlan({**self.modes, **overrides})

    @classmethod
    def parse(cls, text: str, known: Iterable[str] | None = None) -> ModePlan:
        return cls(parse_overrides(text, known))

    def to_json(self) -> str:
        return json.dumps({name: m.to_dict() for name, m in self.modes.items()}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> ModePlan:
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError(f"a mode plan is a JSON object of set -> mode, got {raw[:80]!r}")  # noqa: TRY004 (bad content, not a bad argument)
        return cls({name: SetMode.from_dict(m) for name, m in d.items()})


# -- the shared part: the mode of a feature-set version lives in the store ---------------
def mode_key(fs: FeatureSet) -> str:
    """Metadata name of a set version's mode (beside `materialized:{set}:{version}`)."""
    return f"mode:{fs.name}:{fs.version}"


def mode_from_meta(raw: str | None, *, key: str = "mode") -> SetMode:
    """Decode a stored mode; None (never set) is streaming.

    For readers of a transaction snapshot too: an ingestor that lists `mode_key(fs)` among
    its transaction's meta names decides the record format on the very value its commit is
    conditioned on, so a mode change between its read and its write makes it retry.
    """
    if raw is None:
        return STREAMING
    try:
        return SetMode.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"stored serving mode {key} is unreadable ({raw[:80]!r}): {exc}") from None


def save_mode(store: OnlineStore, fs: FeatureSet, mode: SetMode) -> None:
    """Record a set version's mode for every worker. Streaming is written explicitly (the
    store has no meta delete), which reads the same as never set."""
    if not isinstance(mode, SetMode):
        raise TypeError(f"save_mode takes a SetMode, got {mode!r}")
    store.set_meta(mode_key(fs), json.dumps(mode.to_dict(), sort_keys=True))


def load_mode(store: OnlineStore, fs: FeatureSet) -> SetMode:
    key = mode_key(fs)
    return mode_from_meta(store.get_meta(key), key=key)


def load_modes(store: OnlineStore, sets: Sequence[FeatureSet]) -> ModePlan:
    """The modes of these set versions as stored (one metadata read per set)."""
    names = [fs.name for fs in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"load_modes takes one version per feature set, got {sorted(names)}")
    return ModePlan({fs.name: load_mode(store, fs) for fs in sets})
