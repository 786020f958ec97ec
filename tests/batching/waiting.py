"""Waiting on the event loop without sleeping to synchronise: the batcher's
tests wait for conditions and bound every await, so a bug fails a test
rather than hanging it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(condition: Callable[[], bool]) -> None:
    """Let the event loop run until ``condition()`` holds; fail after ~10 s."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def answered(call: Awaitable[T]) -> T:
    """Await ``call``, failing rather than hanging if it is never answered."""
    return await asyncio.wait_for(call, timeout=10)
