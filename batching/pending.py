"""One caller's items on their way through the queue, and the slices of
them that ride in batches.

A ``Pending`` is made once per ``submit_many`` call (``__slots__``: it is
on the hot path). It holds the items, the caller's future, the results as
they come back (a large request may ride in several batches), and the times
that ``Completion`` reports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Generic, TypeVar

from batching.policy import Completion

Item = TypeVar("Item")
Result = TypeVar("Result")


class Pending(Generic[Item, Result]):
    """One caller's items on their way through the queue."""

    __slots__ = (
        "batch_size",
        "compute",
        "deadline",
        "enqueued",
        "future",
        "items",
        "next",
        "remaining",
        "results",
        "started",
        "timer",
    )

    def __init__(
        self,
        items: Sequence[Item],
        future: asyncio.Future[Completion[Result]],
        enqueued: float,
        deadline: float | None,
    ) -> None:
        self.items = items
        self.future = future
        self.results: list[Result | None] = [None] * len(items)
        self.next = 0  # index of the first item not yet handed to a batch
        self.remaining = len(items)  # items without a result yet
        self.enqueued = enqueued
        self.started = enqueued
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None
        self.compute = 0.0
        self.batch_size = 0


Segment = tuple[Pending[Item, Result], int, int]
"""``(pending, start, stop)``: the slice ``items[start:stop]`` of one caller
that rides in a batch."""


def items_of(batch: list[Segment[Item, Result]]) -> list[Item]:
    """The items of ``batch``, in order, as one list for the batch function."""
    if len(batch) == 1 and batch[0][1] == 0 and batch[0][2] == len(batch[0][0].items):
        return list(batch[0][0].items)
    return [item for pending, start, stop in batch for item in pending.items[start:stop]]
