"""What a backtest varies: one condition per (target, kind, level), fresh and complete first.

A target is a record group the server reads:
- a feature set the release reads (the user set, the item set, the pair sets),
- `user_seen`, the seen record (server/seen.py: the filter of engaged items and the user
  tower's history),
- `user_record`, the user's whole store round trip (user set, prefetched pair sets and seen
  record in one read): missing means the store did not answer, latency means the read took
  as long as the latency model says,
- `all`: every set and the seen record at once (not `user_record`).

Kinds: `staleness` (records as of t - s, read at t), `missing` (each record dropped with
probability p, independently), `latency` (the user_record target only: reads slower than the
budget miss). One target varies while everything else stays fresh and complete.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from features.durations import format_duration_ms

__all__ = ["ALL", "FRESH", "USER_RECORD", "Condition", "format_ms", "grid"]

ALL = "all"
USER_RECORD = "user_record"
FRESH = "fresh"
KINDS = ("fresh", "staleness", "missing", "latency")


@dataclass(frozen=True)
class Condition:
    target: str  # a set name, ALL, USER_RECORD, or FRESH
    kind: str  # one of KINDS
    staleness_ms: int = 0
    missing: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"condition kind must be one of {KINDS}, got {self.kind!r}")
        if self.staleness_ms < 0:
            raise ValueError(f"staleness must be >= 0 ms, got {self.staleness_ms}")
        if not 0.0 <= self.missing <= 1.0:
            raise ValueError(f"missing must be a share in [0, 1], got {self.missing}")

    def _hits(self, name: str) -> bool:
        return self.target == name or (self.target == ALL and name != USER_RECORD)

    def staleness_for(self, name: str) -> int:
        """Staleness (ms) of a set's or the seen record's reads under this condition."""
        return self.staleness_ms if self.kind == "staleness" and self._hits(name) else 0

    def missing_for(self, name: str) -> float:
        """Drop probability of each record of a set, the seen record, or USER_RECORD (the read)."""
        return self.missing if self.kind == "missing" and self._hits(name) else 0.0

    @property
    def latency(self) -> bool:
        return self.kind == "latency"

    @property
    def label(self) -> str:
        if self.kind == "fresh":
            return "fresh and complete"
        if self.kind == "staleness":
            return f"{self.target} {format_ms(self.staleness_ms)} stale"
        if self.kind == "missing":
            return f"{self.target} {self.missing:.0%} missing"
        return f"{self.target} latency"


def grid(targets: Sequence[str], staleness_ms: Sequence[int], missing: Sequence[float], *, latency: bool = False,
         record_missing: bool = True) -> list[Condition]:
    """Fresh first; then per target its staleness levels, then its missing levels (zero levels
    are the fresh condition itself); USER_RECORD missing; ALL staleness and missing; latency.
    `targets`: the sets (and the seen record) to vary one at a time."""
    out = [Condition(FRESH, "fresh")]
    st = sorted({int(s) for s in staleness_ms if s > 0})
    mi = sorted({float(p) for p in missing if p > 0})
    for t in targets:
        out += [Condition(t, "staleness", staleness_ms=s) for s in st]
        out += [Condition(t, "missing", missing=p) for p in mi]
    if record_missing:
        out += [Condition(USER_RECORD, "missing", missing=p) for p in mi]
    if len(targets) > 1:
        out += [Condition(ALL, "staleness", staleness_ms=s) for s in st]
        out += [Condition(ALL, "missing", missing=p) for p in mi]
    if latency:
        out.append(Condition(USER_RECORD, "latency"))
    return out


def format_ms(ms: int) -> str:
    """0, 1m, 15m, 1h, 6h, 1d, 90s, 250ms: the shortest exact form (features.durations's)."""
    return format_duration_ms(int(ms))
