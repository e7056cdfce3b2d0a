"""Rollouts: which release answers a user (primary or canary), which requests also run a
shadow release, and the state a rollout is in, shared by every server worker.

Pure logic plus one persistence class. Why each piece is shaped the way it is:

- Arms come from a salted consistent hash of the user id (blake2b -> a uniform number in
  [0, 1)), not from a random draw per request: a user sees one release for the whole
  rollout, and when the canary's percentage grows, users only ever move primary -> canary
  (the assignment is monotone in the percentage), so nobody flips back and forth.
- The shadow share uses the same hash under another personalisation, so which requests are
  shadowed is independent of which arm answered them.
- `RolloutSpec` is what an operator asks for; `Rollout` is the state a server runs. Both are
  frozen and validated once, at construction: every problem raises
  `server.errors.InvalidArgument(field, message)`, which the Admin servicer maps to
  INVALID_ARGUMENT with the field named.
- State machine: none -> canary -> promoted | rolled_back | aborted; a new spec may start a
  rollout from any state (SetRollout "starts or replaces"). Every transition increments
  `version`, which is how a worker polling the store sees that something changed.
- `RolloutStore` keeps the rollout as JSON in the online store's metadata (get_meta /
  set_meta, a transaction for read-modify-write), because server workers are processes that
  share nothing but the store (issue 14): a rollback decided by one worker must reach all.
"""
from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from features.online.base import Commit, OnlineStore, Snapshot
from server.canary_guard import GuardThresholds
from server.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "ARMS",
    "MAX_RELEASE_CHARS",
    "MAX_SALT_CHARS",
    "STATES",
    "Rollout",
    "RolloutSpec",
    "RolloutStore",
    "arm_of",
    "in_shadow",
    "unit_hash",
]

Arm = Literal["primary", "canary"]
ARMS: tuple[str, ...] = ("primary", "canary")
STATES: tuple[str, ...] = ("none", "canary", "promoted", "rolled_back", "aborted")
ACTIVE = "canary"  # the state of a running rollout (a canary and/or a shadow)
MAX_SALT_CHARS = 64
MAX_RELEASE_CHARS = 1024
_ARM_PERSON = b"parity-arm"  # blake2b personalisation: arms and shadow draw independent numbers
_SHADOW_PERSON = b"parity-shadow"


def unit_hash(salt: str, key: str, person: bytes = _ARM_PERSON) -> float:
    """A number in [0, 1), uniform over keys, fixed for (salt, key): blake2b, 53 bits."""
    h = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8, person=person).digest()
    return (int.from_bytes(h, "big") >> 11) / float(1 << 53)


def arm_of(user_id: str | int, salt: str, canary_percent: float) -> Arm:
    """"canary" for a `canary_percent` share of users, else "primary".

    Monotone: a user in the canary at p percent is in it at every q >= p."""
    if canary_percent <= 0:
        return "primary"
    return "canary" if unit_hash(salt, str(user_id)) * 100.0 < canary_percent else "primary"


def in_shadow(key: str | int, salt: str, shadow_percent: float) -> bool:
    """Whether a request (by its request id, or the user id to shadow whole users) also runs the shadow."""
    if shadow_percent <= 0:
        return False
    return unit_hash(salt, str(key), _SHADOW_PERSON) * 100.0 < shadow_percent


# -- validation helpers ------------------------------------------------------------------------
def _percent(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(name, f"must be a number in 0..100, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or not 0.0 <= v <= 100.0:
        raise InvalidArgument(name, f"must be a finite number in 0..100, got {value!r}")
    return v


def _release(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(name, f"must be a release path or id (a string), got {type(value).__name__}")
    if len(value) > MAX_RELEASE_CHARS:
        raise InvalidArgument(name, f"must be at most {MAX_RELEASE_CHARS} characters, got {len(value)}")
    if value and (not value.isprintable() or value != value.strip()):
        raise InvalidArgument(name, f"must be printable without leading or trailing spaces, got {value!r}")
    return value


def _salt(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(name, f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_SALT_CHARS:
        raise InvalidArgument(name, f"must be at most {MAX_SALT_CHARS} characters, got {len(value)}")
    if not value.isprintable():
        raise InvalidArgument(name, f"must be printable, got {value!r}")
    return value


def _thresholds(value: Any) -> tuple[tuple[str, float], ...]:
    """Overrides as sorted (name, value) pairs, checked by GuardThresholds (names and ranges)."""
    if value is None:
        return ()
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        value = dict(value)
    if not isinstance(value, Mapping):
        raise InvalidArgument("thresholds", f"must be a mapping of name to number, got {type(value).__name__}")
    GuardThresholds.from_overrides(value)  # raises InvalidArgument("thresholds.<name>", ...)
    return tuple(sorted((str(k), float(v)) for k, v in value.items()))


@dataclass(frozen=True)
class RolloutSpec:
    """What an operator asks for (the proto's RolloutSpec). Empty primary: keep the current one.

    `thresholds` are canary-guard overrides by name (server.canary_guard.GuardThresholds);
    they are kept as sorted (name, value) pairs so the spec stays hashable and comparable."""

    primary: str = ""
    canary: str = ""
    canary_percent: float = 0.0
    shadow: str = ""
    shadow_percent: float = 0.0
    salt: str = ""
    auto_promote: bool = False
    thresholds: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("primary", "canary", "shadow"):
            _release(name, getattr(self, name))
        object.__setattr__(self, "canary_percent", _percent("canary_percent", self.canary_percent))
        object.__setattr__(self, "shadow_percent", _percent("shadow_percent", self.shadow_percent))
        _salt("salt", self.salt)
        if not isinstance(self.auto_promote, bool):
            raise InvalidArgument("auto_promote", f"must be a bool, got {self.auto_promote!r}")
        object.__setattr__(self, "thresholds", _thresholds(self.thresholds))
        if self.canary_percent > 0 and not self.canary:
            raise InvalidArgument("canary", f"must name a release when canary_percent is {self.canary_percent:g}")
        if self.shadow_percent > 0 and not self.shadow:
            raise InvalidArgument("shadow", f"must name a release when shadow_percent is {self.shadow_percent:g}")
        if not self.canary and not self.shadow:
            raise InvalidArgument("canary", "a rollout needs a canary or a shadow release (both are empty)")
        if self.auto_promote and not self.canary:
            raise InvalidArgument("auto_promote", "needs a canary release to promote")

    @property
    def guard_thresholds(self) -> GuardThresholds:
        return GuardThresholds.from_overrides(dict(self.thresholds))

    @classmethod
    def from_message(cls, msg: Any) -> RolloutSpec:
        """From a parity.v1.RolloutSpec (duck-typed, so this module needs no generated code)."""
        return cls(primary=msg.primary, canary=msg.canary, canary_percent=msg.canary_percent, shadow=msg.shadow,
                   shadow_percent=msg.shadow_percent, salt=msg.salt, auto_promote=bool(msg.auto_promote),
                   thresholds=dict(msg.thresholds))


@dataclass(frozen=True)
class Rollout:
    """The rollout a server runs: releases, shares, salt, state and a version that grows.

    `last_decision` is the JSON of the canary guard's last rollback or promotion (empty when
    none), kept so GetRollout can say why, with the numbers that triggered it."""

    state: str = "none"
    version: int = 0
    primary: str = ""
    canary: str = ""
    canary_percent: float = 0.0
    shadow: str = ""
    shadow_percent: float = 0.0
    salt: str = ""
    auto_promote: bool = False
    thresholds: tuple[tuple[str, float], ...] = ()
    started_ms: int = 0
    updated_ms: int = 0
    last_decision: str = ""
    history: tuple[str, ...] = field(default=())  # "version:state:reason" lines, newest last, at most 20

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise InvalidArgument("state", f"must be one of {', '.join(STATES)}; got {self.state!r}")
        for name in ("version", "started_ms", "updated_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidArgument(name, f"must be an int >= 0, got {v!r}")
        for name in ("primary", "canary", "shadow"):
            _release(name, getattr(self, name))
        object.__setattr__(self, "canary_percent", _percent("canary_percent", self.canary_percent))
        object.__setattr__(self, "shadow_percent", _percent("shadow_percent", self.shadow_percent))
        _salt("salt", self.salt)
        object.__setattr__(self, "thresholds", _thresholds(self.thresholds))
        if not isinstance(self.last_decision, str):
            raise InvalidArgument("last_decision", "must be a JSON string")
        object.__setattr__(self, "history", tuple(str(h) for h in self.history)[-20:])
        if self.state == ACTIVE and not (self.canary or self.shadow):
            raise InvalidArgument("state", "a running rollout needs a canary or a shadow release")

    # -- routing ---------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def arm_for(self, user_id: str | int) -> Arm:
        """The arm that answers this user now (always "primary" unless a canary is running)."""
        if not self.active or not self.canary:
            return "primary"
        return arm_of(user_id, self.salt, self.canary_percent)

    def shadow_for(self, key: str | int) -> bool:
        """Whether this request (request id or user id) also runs the shadow release."""
        return self.active and bool(self.shadow) and in_shadow(key, self.salt, self.shadow_percent)

    def release_of(self, arm: Arm) -> str:
        return self.canary if arm == "canary" else self.primary

    @property
    def guard_thresholds(self) -> GuardThresholds:
        return GuardThresholds.from_overrides(dict(self.thresholds))

    # -- transitions (each returns a new Rollout with version + 1) ----------------------------
    def _next(self, now_ms: int, state: str, note: str, **changes: Any) -> Rollout:
        return replace(self, state=state, version=self.version + 1, updated_ms=int(now_ms),
                       history=self.history + (f"{self.version + 1}:{state}:{note}",), **changes)

    def start(self, spec: RolloutSpec, now_ms: int, *, salt_factory: Callable[[], str] | None = None) -> Rollout:
        """Start (or replace) a rollout. An empty salt gets a fresh one, so each rollout draws new arms."""
        primary = spec.primary or self.primary
        if not primary:
            raise InvalidArgument("primary", "no primary release is known: name one")
        salt = spec.salt or (salt_factory or (lambda: secrets.token_hex(8)))()
        return self._next(now_ms, ACTIVE, "start", primary=primary, canary=spec.canary, canary_percent=spec.canary_percent,
                          shadow=spec.shadow, shadow_percent=spec.shadow_percent, salt=salt, auto_promote=spec.auto_promote,
                          thresholds=spec.thresholds, started_ms=int(now_ms), last_decision="")

    def serve(self, primary: str, now_ms: int) -> Rollout:
        """LoadRelease: `primary` answers from now on, on every worker (each worker's poll loads
        it); a running canary or shadow goes on beside it."""
        return self._next(now_ms, self.state, "serve", primary=_release("primary", primary))

    def _require_canary(self, action: str) -> None:
        if not self.active or not self.canary:
            raise FailedPrecondition(f"cannot {action}: no canary is running (rollout state {self.state!r}, version {self.version})")

    def promote(self, now_ms: int, decision: str = "") -> Rollout:
        """The canary becomes the primary for everyone; the shadow stops too (the rollout is over)."""
        self._require_canary("promote")
        return self._next(now_ms, "promoted", "promote", primary=self.canary, canary="", canary_percent=0.0, shadow="",
                          shadow_percent=0.0, last_decision=decision or self.last_decision)

    def rollback(self, now_ms: int, decision: str) -> Rollout:
        """The guard found the canary worse: everyone goes back to the primary; `decision` says why."""
        self._require_canary("roll back")
        return self._next(now_ms, "rolled_back", "rollback", canary="", canary_percent=0.0, shadow="", shadow_percent=0.0,
                          last_decision=decision)

    def abort(self, now_ms: int) -> Rollout:
        """An operator stops the rollout: canary and shadow are dropped, the primary stays."""
        if not self.active:
            raise FailedPrecondition(f"cannot abort: no rollout is running (state {self.state!r}, version {self.version})")
        return self._next(now_ms, "aborted", "abort", canary="", canary_percent=0.0, shadow="", shadow_percent=0.0)

    # -- JSON -----------------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d["thresholds"] = dict(self.thresholds)
        d["history"] = list(self.history)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Rollout:
        """Parse and validate; a value that is not a rollout raises ValueError (InvalidArgument is one)."""
        try:
            d = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"rollout JSON is unreadable: {exc}") from None
        if not isinstance(d, dict):
            raise ValueError(f"rollout JSON must be an object, got {type(d).__name__}")  # noqa: TRY004 - a corrupt stored value, not a caller type error
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"rollout JSON has unknown fields {unknown}")
        d["history"] = tuple(d.get("history", ()))
        return cls(**d)

    def to_status(self) -> dict[str, Any]:
        """The RolloutStatus fields this object knows (the servicer adds arms and shadow stats)."""
        return {"state": self.state, "primary_release_id": self.primary, "canary_release_id": self.canary,
                "canary_percent": self.canary_percent, "shadow_release_id": self.shadow, "shadow_percent": self.shadow_percent,
                "salt": self.salt, "version": self.version, "last_decision": self.last_decision}


class RolloutStore:
    """The rollout as JSON under one metadata name of the online store, shared by all workers.

    `update` is a read-modify-write inside the store's transaction (WATCH/MULTI on Redis,
    the lock in memory), so two workers deciding at once (say one rolls back while an
    operator promotes) cannot both win: the second sees the first's result and its
    transition is checked against it (FailedPrecondition if it no longer applies).
    Workers poll `load()` (one GET) and act when `version` changed.
    """

    def __init__(self, store: OnlineStore, name: str = "rollout:current") -> None:
        self.store = store
        self.name = name

    def load(self) -> Rollout:
        """The current rollout; state "none", version 0 when nothing was ever stored."""
        raw = self.store.get_meta(self.name)
        return Rollout() if raw is None else Rollout.from_json(raw)

    def changed_since(self, version: int) -> Rollout | None:
        """The rollout if its version differs from `version` (a worker's poll), else None."""
        r = self.load()
        return r if r.version != version else None

    def update(self, fn: Callable[[Rollout], Rollout]) -> Rollout:
        """Apply a transition atomically; returns the stored result. `fn` may run more than once."""
        out: list[Rollout] = []

        def decide(snap: Snapshot) -> Commit:
            raw = snap.meta.get(self.name)
            cur = Rollout() if raw is None else Rollout.from_json(raw)
            new = fn(cur)
            if new.version <= cur.version:
                raise ValueError(f"a rollout transition must increase the version ({cur.version} -> {new.version})")
            out[:] = [new]
            return Commit(meta={self.name: new.to_json()})

        self.store.transact([], [], [self.name], decide)
        return out[0]

    def initialise(self, primary: str, now_ms: int) -> Rollout:
        """Record the primary a server starts with, unless a rollout is already stored (a worker
        joining a running fleet must not reset it). Returns the stored rollout."""

        def fn(cur: Rollout) -> Rollout:
            if cur.version > 0:
                raise _AlreadyStored
            return replace(cur, primary=_release("primary", primary), version=1, updated_ms=int(now_ms),
                           history=(f"1:none:serve {primary}",))

        try:
            return self.update(fn)
        except _AlreadyStored:
            return self.load()


class _AlreadyStored(Exception):
    """initialise found a rollout another worker stored: keep it."""
