"""The server's clock: the event time features are read "as of".

`wall`: now is the wall clock (production). `data`: now starts at the end of a past event
log and advances with the wall clock, so a simulated or imported log that ended months ago
serves as if it had just ended (features inside their TTL, fresh items fresh, live events
after the log). `auto` picks `data` when the log ended more than a day before the wall clock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Clock", "CLOCK_MODES", "choose_clock"]

CLOCK_MODES = ("auto", "wall", "data")
_DAY_MS = 86_400_000


@dataclass(frozen=True)
class Clock:
    mode: str  # "wall" | "data"
    offset_ms: int = 0

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.offset_ms


def choose_clock(mode: str, data_end_ms: int | None, *, wall_ms: int | None = None) -> Clock:
    """The clock for `mode`; `data_end_ms` is where a data clock starts (end of the log)."""
    if mode not in CLOCK_MODES:
        raise ValueError(f"clock must be one of {CLOCK_MODES}, got {mode!r}")
    wall = int(time.time() * 1000) if wall_ms is None else wall_ms
    if mode == "auto":
        mode = "data" if data_end_ms is not None and data_end_ms < wall - _DAY_MS else "wall"
    if mode == "wall":
        return Clock("wall", 0)
    if data_end_ms is None:
        raise ValueError("clock 'data' needs the data dir's end time (--events)")
    return Clock("data", int(data_end_ms) - wall)
