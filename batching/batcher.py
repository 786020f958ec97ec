"""The asyncio micro-batcher: callers submit items, workers run them in batches.

A caller awaits ``submit_many(items)``; its items join one bounded FIFO queue
(``batching.queue``). One task per model instance (``batching.instance``)
gathers a batch from the head of the queue and runs the user's batch
function in that instance's own worker thread (``batching.forward``), so the
event loop never blocks on the model. While one batch computes, the next
gathers in the queue, and goes the moment a worker is free.

Every caller's future is resolved exactly once: with its results, or with
one of the errors in ``batching.errors``. A batch function that raises (or
returns the wrong number of results) fails only the callers of that batch;
the loop keeps serving. An ``Exception`` from the batcher's own code (or its
callbacks) fails only the batch it hit, and the loop goes on
(``stats.loop_errors``). A ``BaseException`` that is not an ``Exception``
(``SystemExit``, ``KeyboardInterrupt``, a library's own) leaves the worker
thread in a state nobody can vouch for: its batch fails, and a watchdog
restarts that instance's loop on a fresh thread (``stats.loop_restarts``).

``Batcher`` itself only composes the pieces and owns their tasks: it starts
one per instance and, in ``aclose``, drains, cancels and awaits them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from batching.forward import Forward
from batching.instance import Instance
from batching.pending import Pending
from batching.policy import (
    BatcherStats,
    BatchListener,
    BatchPolicy,
    Completion,
    ResourceCheck,
    out_of_memory,
)
from batching.queue import Queue

Item = TypeVar("Item")
Result = TypeVar("Result")

logger = logging.getLogger("carpool.batching")


class Batcher(Generic[Item, Result]):
    """Runs ``batch_fns[i](items) -> results`` for batches of submitted items.

    One worker thread per entry of ``batch_fns`` (one per model instance).
    Use ``async with Batcher(...)`` or ``start()`` / ``aclose()``.
    """

    def __init__(
        self,
        batch_fns: Sequence[Callable[[list[Item]], Sequence[Result]]],
        policy: BatchPolicy = BatchPolicy(),  # noqa: B008  (frozen: one shared default is safe)
        *,
        name: str = "batcher",
        on_batch: BatchListener | None = None,
        is_resource_error: ResourceCheck | None = None,
    ) -> None:
        if not batch_fns:
            raise ValueError("a batcher needs at least one batch function")
        self.policy = policy
        self.name = name
        self.stats = BatcherStats()
        self._fns = list(batch_fns)
        self._on_batch = on_batch
        self._is_resource_error = is_resource_error or out_of_memory
        self._queue: Queue[Item, Result] = Queue(policy, self.stats, name, len(self._fns))
        self._instances: list[Instance[Item, Result]] = []
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Batcher[Item, Result]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start one serving task and worker thread per batch function."""
        if self._tasks:
            raise RuntimeError(f"{self.name} is already started")
        for index, fn in enumerate(self._fns):
            forward: Forward[Item, Result] = Forward(
                fn,
                isolate_errors=self.policy.isolate_errors,
                is_resource_error=self._is_resource_error,
                name=self.name,
            )
            instance = Instance(index, forward, self._queue, self._on_batch)
            self._instances.append(instance)
            task = asyncio.create_task(instance.watch(), name=f"{self.name}-{index}")
            self._tasks.append(task)
        self._queue.open()

    @property
    def accepting(self) -> bool:
        return self._queue.accepting

    @property
    def batch_cap(self) -> int:
        """The most items the next batch may take: ``max_batch_size``, or
        less while capped after running out of resources (restored by the
        first batch gathered after ``shrink_seconds``)."""
        return self._queue.cap

    def stop_accepting(self) -> None:
        """Refuse new items from now on (``Closed``); queued ones still run."""
        self._queue.stop_accepting()

    async def aclose(self, timeout: float | None = 30.0) -> None:
        """Stop accepting, finish what is queued and running within
        ``timeout`` seconds, then fail whatever is left with ``Cancelled``."""
        # 1. Stop accepting: new callers get Closed, the gatherers finish the queue.
        self.stop_accepting()
        if self._tasks:
            # 2. Drain: let the instances run what is queued, for up to timeout.
            _, unfinished = await asyncio.wait(self._tasks, timeout=timeout)
            # 3. Cancel the rest: the callers of a batch cut short get Cancelled.
            for task in unfinished:
                task.cancel()
            while unfinished:
                _, unfinished = await asyncio.wait(unfinished, timeout=1.0)
                for task in unfinished:  # code it awaited swallowed the cancellation: a bug
                    self.stats.loop_errors += 1
                    logger.error(
                        "%s: %s ignored its cancellation; cancelling again",
                        self.name,
                        task.get_name(),
                    )
                    task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # 4. Fail whatever is still queued with Cancelled.
        self._queue.cancel_all()
        # 5. Release the worker threads (a hung one is left to itself).
        for instance in self._instances:
            instance.executor.shutdown(wait=False, cancel_futures=True)

    # -- submitting --------------------------------------------------------

    async def submit(self, item: Item, deadline: float | None = None) -> Result:
        """Run one item; see ``submit_many``."""
        completion = await self.submit_many((item,), deadline)
        return completion.results[0]

    async def submit_many(
        self, items: Sequence[Item], deadline: float | None = None
    ) -> Completion[Result]:
        """Queue ``items`` together (all or none) and wait for their results.

        ``deadline`` is an absolute ``time.monotonic()``: items still queued then
        fail with ``DeadlineExceeded`` and are never computed. Raises
        ``Overloaded`` at once when the queue has no room, ``Closed`` when
        the batcher is not accepting.
        """
        queue = self._queue
        pending = queue.enqueue(items, deadline)
        if pending is None:
            return Completion([], 0.0, 0.0, 0)
        try:
            return await pending.future
        except asyncio.CancelledError:
            queue.withdraw(pending, "cancelled")
            raise

    def enqueue(
        self, items: Sequence[Item], deadline: float | None = None
    ) -> Pending[Item, Result]:
        """Queue ``items`` as ``submit_many`` does, without a coroutine: for a
        caller with many requests in flight (a stream), whose done-callbacks
        on ``pending.future`` are cheaper than a task each. Raises at once
        as ``submit_many`` does; ``items`` must not be empty. A caller that
        stops waiting calls ``withdraw``."""
        pending = self._queue.enqueue(items, deadline)
        if pending is None:
            raise ValueError("enqueue needs at least one item")
        return pending

    def withdraw(self, pending: Pending[Item, Result]) -> None:
        """Stop waiting for ``pending``: its items still queued are never
        computed, and its future is cancelled."""
        self._queue.withdraw(pending, "cancelled")
        pending.future.cancel()

    def admit(self, count: int) -> None:
        """Raise ``Closed`` or ``Overloaded`` unless ``count`` more items fit
        now; lets a caller refuse work before it reads or decodes it."""
        self._queue.admit(count)

    def retry_after(self) -> float:
        """Seconds until the current queue has likely drained (at least 1)."""
        return self._queue.retry_after()
