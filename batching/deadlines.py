"""Deadlines of queued callers, without a timer per request.

Most callers of a model are queued in deadline order: every request has the
same timeout unless it asks for a shorter one. Those share one timer, armed
at the earliest deadline among them; when it fires it expires every such
caller whose deadline has passed (they are at the front of the queue, in
order) and re-arms for the next. A caller whose deadline comes before an
earlier caller's (it asked for less time) gets a timer of its own.

An expired caller's items still waiting are never computed; its items
already in a batch run on (running work is not timed out).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from batching.pending import Pending

Item = TypeVar("Item")
Result = TypeVar("Result")


class Deadlines(Generic[Item, Result]):
    """The deadline timers of the callers in ``queue``; ``expire(pending)``
    fails one whose deadline has passed, if any of it still waits."""

    def __init__(
        self,
        queue: deque[Pending[Item, Result]],
        expire: Callable[[Pending[Item, Result]], None],
    ) -> None:
        self._queue = queue
        self._expire = expire
        self._in_order = -math.inf  # the latest deadline queued in order
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def emptied(self) -> None:
        """The queue had nothing waiting: whatever comes next is in order."""
        self._in_order = -math.inf

    def track(self, pending: Pending[Item, Result], deadline: float, now: float) -> None:
        """Time ``pending``, just queued at ``now``, out at ``deadline``."""
        if deadline >= self._in_order:
            self._in_order = deadline
            if deadline < self._timer_at:  # the queue was empty: nothing sooner is armed
                self._arm(deadline, now)
        else:
            loop = asyncio.get_running_loop()
            pending.timer = loop.call_later(deadline - now, self._expire, pending)

    def _expire_due(self) -> None:
        """The shared timer: expire the in-order callers whose deadline has
        passed, then wait for the next one's."""
        self._timer, self._timer_at = None, math.inf
        now = time.monotonic()
        queue = self._queue
        index = 0
        while index < len(queue):
            pending = queue[index]
            deadline = pending.deadline
            if pending.next == len(pending.items) or pending.timer is not None or deadline is None:
                index += 1  # dispatched, or timed by its own timer, or never timed out
                continue
            if deadline > now:
                self._arm(deadline, now)
                return
            self._expire(pending)  # leaves the queue, or stays at the head with nothing left
            if index < len(queue) and queue[index] is pending:
                index += 1

    def _arm(self, deadline: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = asyncio.get_running_loop().call_later(deadline - now, self._expire_due)
