"""One request's context: its release, arm, as-of time, budget and timer, handed down the path.

A request takes its snapshot once, at its start, and everything below reads it from here, so
a release swap or a rollout change mid-request never mixes two releases in one answer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.pipeline import Timer
from server.records import RecordRead
from server.state import Snapshot

__all__ = ["RequestContext"]


@dataclass
class RequestContext:
    snap: Snapshot
    arm: str  # primary | canary | shadow
    now_ms: int  # the as-of time features are read at
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    timer: Timer = field(default_factory=Timer)
    records: RecordRead | None = None

    def left(self) -> float:
        """Seconds of the budget still unspent."""
        return self.budget_s - (time.perf_counter() - self.started)

    @property
    def reason(self) -> str | None:
        return self.records.reason if self.records is not None else None

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0
