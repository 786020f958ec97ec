"""The queue of pending callers: one bounded FIFO that every instance of a
model gathers its batches from, one gatherer at a time.

A caller's items join together, all or none (``enqueue``), or are refused at
once (``admit``): ``Closed`` when not accepting, ``Overloaded`` past
``max_queue``. Whichever of these comes first resolves the caller's future,
exactly once: its items are taken into batches (``take``) and answered when
the last has a result (``deliver``) or fail with a batch (``fail``); the
caller stops waiting (``withdraw``); its deadline passes while any item still
waits (``expire``, timed by ``batching/deadlines.py``: those are never
computed, and running work is not timed out); or the batcher shuts down with
them queued (``cancel_all``).

Gathering a batch, for a free worker (``gather``):

* wait for the first item;
* then keep gathering until the batch is full, or ``max_wait`` has passed
  since the *oldest* queued item arrived (so a busy queue never waits twice),
  or - with ``eager`` dispatch - one turn of the event loop brought no new
  item: when nobody else is arriving, waiting would only add latency;
* skip items whose caller left or whose deadline passed: they are never
  computed.

While one instance's batch computes, the next gathers here, and goes the
moment a worker is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

from batching.deadlines import Deadlines
from batching.errors import BatchingError, Cancelled, Closed, DeadlineExceeded, Overloaded
from batching.forward import Failure, Outcome
from batching.pending import Pending, Segment
from batching.policy import BatcherStats, BatchPolicy, Completion

Item = TypeVar("Item")
Result = TypeVar("Result")

logger = logging.getLogger("carpool.batching")


class Queue(Generic[Item, Result]):
    """The pending callers of one batcher, served by ``instances`` workers."""

    def __init__(self, policy: BatchPolicy, stats: BatcherStats, name: str, instances: int) -> None:
        self.policy = policy
        self.stats = stats
        self.name = name
        self.instances = instances
        self.accepting = False  # set by open(), cleared for good by stop_accepting()
        self.closing = False
        self.cap = policy.max_batch_size  # lowered for a while after running out of resources
        self._cap_until = 0.0
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self._pending: deque[Pending[Item, Result]] = deque()
        self._arrivals = 0
        self._arrived = asyncio.Event()
        self._deadlines = Deadlines(self._pending, self.expire)  # no timer per request
        self._gather_lock = asyncio.Lock()

    # -- the door --------------------------------------------------------------

    def open(self) -> None:
        """Start accepting items, unless ``stop_accepting`` came first."""
        self.accepting = not self.closing

    def stop_accepting(self) -> None:
        """Refuse new items from now on; wake the gatherer so it can finish."""
        self.closing = True
        self.accepting = False
        self._arrived.set()

    def admit(self, count: int) -> None:
        """Raise ``Closed`` or ``Overloaded`` unless ``count`` more items fit now."""
        stats = self.stats
        if not self.accepting:
            stats.dropped["closed"] += count
            raise Closed(f"{self.name} is not accepting requests (shutting down); retry elsewhere")
        if stats.queued + count > self.policy.max_queue:
            stats.dropped["overloaded"] += count
            raise Overloaded(
                f"{self.name} is at capacity ({stats.queued} of {self.policy.max_queue} "
                "items queued); retry later",
                self.retry_after(),
            )

    def retry_after(self) -> float:
        """Seconds until the current queue has likely drained (at least 1)."""
        batches = self.stats.queued / self.policy.max_batch_size / self.instances
        return float(max(1, math.ceil(batches * self._batch_seconds)))

    def enqueue(
        self, items: Sequence[Item], deadline: float | None
    ) -> Pending[Item, Result] | None:
        """Queue ``items`` together, or raise; None for no items (nothing to run)."""
        stats = self.stats
        count = len(items)
        # The two checks admit() makes, inline: an accepted request pays no extra call.
        if not self.accepting or stats.queued + count > self.policy.max_queue:
            self.admit(count)  # raises
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            stats.dropped["deadline"] += count
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        if count == 0:
            return None
        loop = asyncio.get_running_loop()
        pending: Pending[Item, Result] = Pending(items, loop.create_future(), now, deadline)
        if not stats.queued:
            self._deadlines.emptied()
        self._pending.append(pending)
        stats.queued += count
        self._arrivals += 1
        self._arrived.set()
        if deadline is not None:
            self._deadlines.track(pending, deadline, now)
        return pending

    # -- leaving early ---------------------------------------------------------

    def withdraw(self, pending: Pending[Item, Result], reason: str) -> None:
        """Take the not-yet-dispatched items of ``pending`` out of the queue."""
        if pending.timer is not None:
            pending.timer.cancel()
        undispatched = len(pending.items) - pending.next
        if undispatched == 0:
            return  # everything is already in a batch; its results are dropped
        if pending.next == 0:
            with contextlib.suppress(ValueError):  # already taken by the gatherer
                self._pending.remove(pending)
        # A partly dispatched request stays at the head; ``next`` at the end
        # makes the gatherer skip it.
        pending.next = len(pending.items)
        self.stats.queued -= undispatched
        self.stats.dropped[reason] += undispatched

    def expire(self, pending: Pending[Item, Result]) -> None:
        """The deadline timer: fail ``pending`` if any of it still waits."""
        if pending.future.done() or pending.next == len(pending.items):
            return  # answered, or all of it is running: running work is not timed out
        self.withdraw(pending, "deadline")
        pending.future.set_exception(
            DeadlineExceeded("the request's deadline passed while it waited in the queue")
        )

    def fail(self, pending: Pending[Item, Result], error: BatchingError, reason: str) -> None:
        """Answer ``pending`` with ``error`` (unless answered); its queued items leave."""
        if not pending.future.done():
            self.withdraw(pending, reason)
            pending.future.set_exception(error)

    def cancel_all(self) -> None:
        """Fail every caller still queued with ``Cancelled`` (the batcher shut down)."""
        while self._pending:
            pending = self._pending.popleft()
            self.fail(
                pending, Cancelled(f"{self.name} shut down before this request ran"), "closed"
            )
        self.stats.queued = 0

    # -- gathering a batch -----------------------------------------------------

    async def gather(self) -> list[Segment[Item, Result]] | None:
        """Wait for items and return the next batch; None once closed and empty."""
        policy = self.policy
        stats = self.stats
        async with self._gather_lock:
            while True:
                while not stats.queued:
                    if self.closing:
                        return None
                    self._arrived.clear()
                    await self._arrived.wait()
                close_at = self._head().enqueued + policy.max_wait
                while stats.queued < self.cap and not self.closing:
                    now = time.monotonic()
                    if now >= close_at:
                        break
                    seen = self._arrivals
                    if policy.eager:
                        await asyncio.sleep(0)
                        if self._arrivals == seen:
                            break  # a quiet turn: nobody else is coming soon
                    else:
                        # Not wait_for: on Python 3.11 it swallows a cancellation
                        # (aclose's) that lands in the turn its inner wait ended.
                        self._arrived.clear()
                        wake = asyncio.get_running_loop().call_later(
                            close_at - now, self._arrived.set
                        )
                        try:
                            await self._arrived.wait()
                        finally:
                            wake.cancel()
                batch = self.take(time.monotonic())
                if batch:  # empty when every queued caller left while we waited
                    return batch

    def _head(self) -> Pending[Item, Result]:
        queue = self._pending
        while queue[0].next == len(queue[0].items):
            queue.popleft()  # withdrawn while partly dispatched
        return queue[0]

    def take(self, now: float) -> list[Segment[Item, Result]]:
        """Take up to ``cap`` items from the head, skipping callers that left."""
        queue = self._pending
        if self.cap < self.policy.max_batch_size and now >= self._cap_until:
            self.cap = self.policy.max_batch_size
        room = cap = self.cap
        batch: list[Segment[Item, Result]] = []
        while room and queue:
            pending = queue[0]
            if pending.future.done() and pending.next < len(pending.items):
                # cancelled in this very loop turn: its task has not run yet
                self.withdraw(pending, "cancelled")
            elif pending.deadline is not None and pending.deadline <= now:
                self.expire(pending)  # the loop was too busy for the timer to fire first
            start = pending.next
            stop = min(len(pending.items), start + room)
            if start == stop:
                if queue and queue[0] is pending:
                    queue.popleft()
                continue
            if start == 0:
                pending.started = now
            batch.append((pending, start, stop))
            pending.next = stop
            room -= stop - start
            if stop == len(pending.items):
                queue.popleft()
                if pending.timer is not None:
                    pending.timer.cancel()
        size = cap - room
        self.stats.queued -= size
        return batch

    # -- after a batch ---------------------------------------------------------

    def observe(self, seconds: float) -> None:
        """Fold one batch's compute time into the Retry-After estimate (call it
        before ``stats.batches`` counts the batch: the first one sets it)."""
        self._batch_seconds = (
            seconds if not self.stats.batches else 0.9 * self._batch_seconds + 0.1 * seconds
        )

    def shrink(self, size: int) -> None:
        """Cap batches at ``size`` for ``shrink_seconds`` (out of resources)."""
        self.cap = min(self.cap, size)
        self._cap_until = time.monotonic() + self.policy.shrink_seconds
        logger.warning("%s: out of resources; batches capped at %d", self.name, self.cap)

    def deliver(
        self,
        batch: list[Segment[Item, Result]],
        outcome: Outcome[Result],
        size: int,
        seconds: float,
    ) -> None:
        """Hand each caller its slice of ``outcome``'s results; answer those
        that have all of theirs now, and fail those with an item that failed."""
        results = outcome.results
        offset = 0
        for pending, start, stop in batch:
            count = stop - start
            mine = results[offset : offset + count]
            offset += count
            if outcome.failures:
                failure: object = next((r for r in mine if type(r) is Failure), None)
                if isinstance(failure, Failure):
                    self.fail(pending, failure.error, "failed")
                    continue
            pending.results[start:stop] = mine
            pending.compute += seconds
            pending.batch_size = max(pending.batch_size, size)
            pending.remaining -= count
            if pending.remaining == 0 and not pending.future.done():
                pending.future.set_result(
                    Completion(
                        pending.results,  # type: ignore[arg-type]  # every slot is filled now
                        pending.started - pending.enqueued,
                        pending.compute,
                        pending.batch_size,
                    )
                )
