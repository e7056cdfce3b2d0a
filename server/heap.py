"""Keeping Python's cyclic garbage collector off the request path.

The server holds hundreds of thousands of long-lived objects (the memory store's records,
the release, the catalogue): a full collection walks all of them, and one was measured at
0.4-0.9 s on this 2-core machine. Such a pause lands in the middle of whatever requests are
in flight: in a 10-minute soak at 217 req/s it showed as p99 windows of 100-1000 ms and 315
requests past their 1 s deadline, with memory flat. Objects that live as long as the process
are moved out of the collector's sight once, after start-up and after each release swap
(`gc.freeze`), so later collections only walk what requests allocate. Frozen objects are still
freed by reference counting when dropped (an old release after a swap); only reference
cycles among them would stay, and the release objects hold none we know of.
"""
from __future__ import annotations

import gc
import time

__all__ = ["settle"]


def settle(*, collect: bool = True) -> dict:
    """Collect what is garbage now (once, at start-up), then freeze every survivor."""
    t = time.perf_counter()
    if collect:
        gc.collect()
    gc.freeze()
    return {"frozen_objects": gc.get_freeze_count(), "ms": round((time.perf_counter() - t) * 1000, 1)}
