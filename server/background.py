"""The server's background tasks (item refresh, drift folds, the shadow, rollout polls):
started on the running loop, and stopped by cancelling and waiting, so a close never leaves
one running against closed resources."""
from __future__ import annotations

import asyncio
from typing import Coroutine

__all__ = ["spawn", "stop"]


def spawn(coro: Coroutine, name: str) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(coro, name=name)


async def stop(*tasks: asyncio.Task | None) -> None:
    """Cancel each task and wait for it to finish (its CancelledError is the expected end)."""
    for t in tasks:
        if t is None:
            continue
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            pass
