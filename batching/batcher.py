"""The asyncio micro-batcher: callers submit items, workers run them in batches.

A caller awaits ``submit_many(items)``; its items join one bounded FIFO queue.
One task per model instance gathers a batch from the head of the queue and
runs the user's batch function in that instance's own worker thread, so the
event loop never blocks on the model. While one batch computes, the next
gathers in the queue, and goes the moment a worker is free.

Gathering a batch, for a free worker:

* wait for the first item;
* then keep gathering until the batch is full, or ``max_wait`` has passed
  since the *oldest* queued item arrived (so a busy queue never waits twice),
  or - with ``eager`` dispatch - one turn of the event loop brought no new
  item: when nobody else is arriving, waiting would only add latency;
* skip items whose caller left or whose deadline passed: they are never
  computed.

Every caller's future is resolved exactly once: with its results, or with
one of the errors in ``batching.errors``. A batch function that raises (or
returns the wrong number of results) fails only the callers of that batch;
the loop keeps serving. An ``Exception`` from the batcher's own code (or its
callbacks) fails only the batch it hit, and the loop goes on
(``stats.loop_errors``). A ``BaseException`` that is not an ``Exception``
(``SystemExit``, ``KeyboardInterrupt``, a library's own) leaves the worker
thread in a state nobody can vouch for: its batch fails, and a watchdog
restarts that instance's loop on a fresh thread (``stats.loop_restarts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from batching.errors import (
    BatchFailed,
    BatchingError,
    Cancelled,
    Closed,
    DeadlineExceeded,
    Hung,
    InternalError,
    OutOfResources,
    Overloaded,
)

Item = TypeVar("Item")
Result = TypeVar("Result")

logger = logging.getLogger("carpool.batching")


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How items are grouped. ``max_wait`` is in seconds."""

    max_batch_size: int = 32
    max_wait: float = 0.002
    max_queue: int = 256
    eager: bool = True
    # Split a failing batch in halves until the failing items run alone:
    # they fail, everyone else gets an answer (off: the batch fails whole).
    isolate_errors: bool = False
    # After an out-of-resources failure, batches stay at most half the size
    # that failed for this long.
    shrink_seconds: float = 60.0
    # A forward pass running longer than this is given up on: its callers
    # get ``Hung``, the instance restarts on a fresh thread, and
    # ``hung_forwards`` counts the abandoned threads until they return.
    # None: wait for ever.
    hang_seconds: float | None = 30.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_wait < 0:
            raise ValueError("max_wait must not be negative")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if self.hang_seconds is not None and self.hang_seconds <= 0:
            raise ValueError("hang_seconds must be positive (or None)")


@dataclass(frozen=True, slots=True)
class Completion(Generic[Result]):
    """One caller's results, with how they were obtained."""

    results: list[Result]
    queue_seconds: float
    compute_seconds: float
    batch_size: int


@dataclass(slots=True)
class BatcherStats:
    """Running figures, read by the metrics exporter."""

    queued: int = 0
    in_flight: int = 0
    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    forward_calls: int = 0  # more than ``batches`` when failing batches were split
    isolated_items: int = 0  # items that failed alone (poison or out of resources)
    transient_errors: int = 0  # failed batches whose halves then all succeeded
    loop_errors: int = 0  # our own errors the loop caught and survived
    loop_restarts: int = 0  # loops the watchdog restarted after a BaseException or a hang
    hangs: int = 0  # forward passes given up on after hang_seconds
    hung_forwards: int = 0  # of those, the ones whose thread is still running
    dropped: dict[str, int] = field(
        default_factory=lambda: {
            "overloaded": 0,
            "deadline": 0,
            "cancelled": 0,
            "closed": 0,
            "failed": 0,
        }
    )


ResourceCheck = Callable[[BaseException], bool]
"""Tells whether an exception means out of resources (e.g. out of memory)."""

BatchListener = Callable[[int, float, list[float]], None]
"""Called on the event loop after every batch: (size, compute seconds, queue
seconds of each request that started in this batch)."""


class _Pending(Generic[Item, Result]):
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


_Segment = tuple[_Pending[Item, Result], int, int]


class Batcher(Generic[Item, Result]):
    """Runs ``batch_fns[i](items) -> results`` for batches of submitted items.

    One worker thread per entry of ``batch_fns`` (one per model instance).
    Use ``async with Batcher(...)`` or ``start()`` / ``aclose()``.
    """

    def __init__(
        self,
        batch_fns: Sequence[Callable[[list[Item]], Sequence[Result]]],
        policy: BatchPolicy = BatchPolicy(),
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
        self._queue: deque[_Pending[Item, Result]] = deque()
        self._arrivals = 0
        self._arrived = asyncio.Event()
        self._gather_lock = asyncio.Lock()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._executors: list[ThreadPoolExecutor] = []
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self._is_resource_error = is_resource_error or (lambda exc: isinstance(exc, MemoryError))
        self._cap = policy.max_batch_size  # lowered for a while after running out of resources
        self._cap_until = 0.0

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
        for index in range(len(self._fns)):
            self._executors.append(self._executor(index))
            task = asyncio.create_task(self._watch(index), name=f"{self.name}-{index}")
            self._tasks.append(task)

    def _executor(self, index: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-{index}")

    @property
    def accepting(self) -> bool:
        return bool(self._tasks) and not self._closing

    @property
    def batch_cap(self) -> int:
        """The most items the next batch may take: ``max_batch_size``, or
        less while capped after running out of resources (restored by the
        first batch gathered after ``shrink_seconds``)."""
        return self._cap

    def stop_accepting(self) -> None:
        """Refuse new items from now on (``Closed``); queued ones still run."""
        self._closing = True
        self._arrived.set()

    async def aclose(self, timeout: float | None = 30.0) -> None:
        """Stop accepting, finish what is queued and running within
        ``timeout`` seconds, then fail whatever is left with ``Cancelled``."""
        self.stop_accepting()
        if self._tasks:
            _, unfinished = await asyncio.wait(self._tasks, timeout=timeout)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            self._fail(
                pending, Cancelled(f"{self.name} shut down before this request ran"), "closed"
            )
        self.stats.queued = 0
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)

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
        stats = self.stats
        count = len(items)
        self.admit(count)
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            stats.dropped["deadline"] += count
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        if count == 0:
            return Completion([], 0.0, 0.0, 0)
        loop = asyncio.get_running_loop()
        pending: _Pending[Item, Result] = _Pending(items, loop.create_future(), now, deadline)
        self._queue.append(pending)
        stats.queued += count
        self._arrivals += 1
        self._arrived.set()
        if deadline is not None:
            pending.timer = loop.call_later(deadline - now, self._expire, pending)
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._withdraw(pending, "cancelled")
            raise

    def admit(self, count: int) -> None:
        """Raise ``Closed`` or ``Overloaded`` unless ``count`` more items fit
        now; lets a caller refuse work before it reads or decodes it."""
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
        batches = self.stats.queued / self.policy.max_batch_size / len(self._fns)
        return float(max(1, math.ceil(batches * self._batch_seconds)))

    # -- leaving the queue early ---------------------------------------------

    def _withdraw(self, pending: _Pending[Item, Result], reason: str) -> None:
        """Take the not-yet-dispatched items of ``pending`` out of the queue."""
        if pending.timer is not None:
            pending.timer.cancel()
        undispatched = len(pending.items) - pending.next
        if undispatched == 0:
            return  # everything is already in a batch; its results are dropped
        if pending.next == 0:
            with contextlib.suppress(ValueError):  # already taken by the gatherer
                self._queue.remove(pending)
        # A partly dispatched request stays at the head; ``next`` at the end
        # makes the gatherer skip it.
        pending.next = len(pending.items)
        self.stats.queued -= undispatched
        self.stats.dropped[reason] += undispatched

    def _expire(self, pending: _Pending[Item, Result]) -> None:
        if pending.future.done() or pending.next == len(pending.items):
            return  # answered, or all of it is running: running work is not timed out
        self._withdraw(pending, "deadline")
        pending.future.set_exception(
            DeadlineExceeded("the request's deadline passed while it waited in the queue")
        )

    def _fail(self, pending: _Pending[Item, Result], error: BatchingError, reason: str) -> None:
        if not pending.future.done():
            self._withdraw(pending, reason)
            pending.future.set_exception(error)

    # -- serving -------------------------------------------------------------

    async def _watch(self, index: int) -> None:
        """The watchdog of instance ``index``: serve until closed, and restart
        the loop on a fresh worker thread whenever a fault escapes it."""
        while True:
            try:
                await self._serve(self._fns[index], self._executors[index])
                return
            except asyncio.CancelledError as exc:
                if _cancelling():
                    raise  # aclose() ran out of time: a real cancellation
                fault: BaseException = exc  # raised by the model, not by aclose()
            except BaseException as exc:  # SystemExit, KeyboardInterrupt: never past this task
                fault = exc
            self.stats.loop_restarts += 1
            if isinstance(fault, _HungForward):
                logger.error("%s; instance %d restarts on a fresh thread", fault, index)
            else:
                logger.error(
                    "%s: the batch loop of instance %d died; restarting it on a fresh thread",
                    self.name,
                    index,
                    exc_info=fault,
                )
            self._executors[index].shutdown(wait=False)
            self._executors[index] = self._executor(index)
            await asyncio.sleep(0.01)  # a fault that repeats must not spin the event loop

    async def _serve(
        self, fn: Callable[[list[Item]], Sequence[Result]], executor: ThreadPoolExecutor
    ) -> None:
        while True:
            try:
                batch = await self._gather()
                if batch is None:
                    return
                await self._run(batch, fn, executor)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug of ours, not the model's: log it and keep serving.
                self.stats.loop_errors += 1
                logger.exception("%s: batch loop error", self.name)
                await asyncio.sleep(0.01)  # a bug that repeats must not spin the event loop

    async def _gather(self) -> list[_Segment[Item, Result]] | None:
        """Wait for items and return the next batch; None once closed and empty."""
        policy = self.policy
        stats = self.stats
        async with self._gather_lock:
            while True:
                while not stats.queued:
                    if self._closing:
                        return None
                    self._arrived.clear()
                    await self._arrived.wait()
                head = self._head()
                close_at = head.enqueued + policy.max_wait
                while stats.queued < self._cap and not self._closing:
                    now = time.monotonic()
                    if now >= close_at:
                        break
                    seen = self._arrivals
                    if policy.eager:
                        await asyncio.sleep(0)
                        if self._arrivals == seen:
                            break
                    else:
                        self._arrived.clear()
                        try:
                            await asyncio.wait_for(self._arrived.wait(), close_at - now)
                        except TimeoutError:
                            break
                batch = self._take(time.monotonic())
                if batch:
                    return batch

    def _head(self) -> _Pending[Item, Result]:
        queue = self._queue
        while queue[0].next == len(queue[0].items):
            queue.popleft()  # withdrawn while partly dispatched
        return queue[0]

    def _take(self, now: float) -> list[_Segment[Item, Result]]:
        queue = self._queue
        if self._cap < self.policy.max_batch_size and now >= self._cap_until:
            self._cap = self.policy.max_batch_size
        room = cap = self._cap
        batch: list[_Segment[Item, Result]] = []
        while room and queue:
            pending = queue[0]
            if pending.future.done() and pending.next < len(pending.items):
                # cancelled in this very loop turn: its task has not run yet
                self._withdraw(pending, "cancelled")
            elif pending.deadline is not None and pending.deadline <= now:
                self._expire(pending)  # the loop was too busy for the timer to fire first
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

    async def _run(
        self,
        batch: list[_Segment[Item, Result]],
        fn: Callable[[list[Item]], Sequence[Result]],
        executor: ThreadPoolExecutor,
    ) -> None:
        stats = self.stats
        loop = asyncio.get_running_loop()
        if len(batch) == 1 and batch[0][1] == 0 and batch[0][2] == len(batch[0][0].items):
            items = list(batch[0][0].items)
        else:
            items = [item for pending, start, stop in batch for item in pending.items[start:stop]]
        size = len(items)
        stats.in_flight += size
        began = time.monotonic()
        outcome: _Outcome[Result] | None = None
        try:
            future = loop.run_in_executor(executor, self._compute, fn, items)
            if self.policy.hang_seconds is not None:
                done, _ = await asyncio.wait({future}, timeout=self.policy.hang_seconds)
                if not done:
                    self._give_up(future, began)
            outcome = await future
            seconds = time.monotonic() - began
            self._batch_seconds = (
                seconds if not stats.batches else 0.9 * self._batch_seconds + 0.1 * seconds
            )
            stats.batches += 1
            stats.items += size
            stats.forward_calls += outcome.calls
            if outcome.shrink_to:
                self._cap = min(self._cap, outcome.shrink_to)
                self._cap_until = time.monotonic() + self.policy.shrink_seconds
                logger.warning("%s: out of resources; batches capped at %d", self.name, self._cap)
            if outcome.error is not None:
                stats.failed_batches += 1
                stats.isolated_items += outcome.failures
                for pending, _, _ in batch:
                    self._fail(pending, outcome.error, "failed")
            else:
                self._deliver(batch, outcome, size, seconds)
            if self._on_batch is not None:
                waits = [p.started - p.enqueued for p, start, _ in batch if start == 0]
                self._on_batch(size, seconds, waits)
        except BaseException as exc:
            if outcome is None:  # no answers came back from the worker thread
                self._abandon(batch, exc)
            raise
        finally:
            stats.in_flight -= size

    def _give_up(self, future: asyncio.Future[_Outcome[Result]], began: float) -> None:
        """A forward pass has hung: leave its thread to itself (Python cannot
        stop a thread) and raise past the loop, so the watchdog restarts the
        instance on a fresh thread; until the hung thread returns, if ever,
        ``hung_forwards`` stays up and the model reports not ready."""
        stats = self.stats
        stats.hangs += 1
        stats.hung_forwards += 1

        def returned(_: asyncio.Future[_Outcome[Result]]) -> None:
            stats.hung_forwards -= 1
            logger.warning("%s: a hung forward pass returned after all", self.name)

        future.add_done_callback(returned)
        raise _HungForward(
            f"{self.name}: a forward pass has run {time.monotonic() - began:.1f} s, "
            f"over the {self.policy.hang_seconds} s hang limit"
        )

    def _abandon(self, batch: list[_Segment[Item, Result]], exc: BaseException) -> None:
        """Fail the callers of a batch whose run ended without an outcome."""
        error: BatchingError
        reason = "failed"
        if isinstance(exc, asyncio.CancelledError) and _cancelling():
            error = Cancelled(f"{self.name} shut down while this request was running")
            reason = "closed"
        elif isinstance(exc, _HungForward):
            error = Hung(f"the model did not answer within {self.policy.hang_seconds} s")
        elif isinstance(exc, Exception):
            error = InternalError(f"{self.name} failed while running this request's batch")
        else:  # the model raised past Exception; the watchdog restarts the loop
            error = BatchFailed(f"the model worker failed: {type(exc).__name__}: {exc}")
        if reason == "failed":
            self.stats.failed_batches += 1
        error.__cause__ = exc
        for pending, _, _ in batch:
            self._fail(pending, error, reason)  # its items still queued leave with it

    # -- the worker thread's side ----------------------------------------------

    def _compute(
        self, fn: Callable[[list[Item]], Sequence[Result]], items: list[Item]
    ) -> _Outcome[Result]:
        """The forward pass; with ``isolate_errors``, split on failure."""
        outcome: _Outcome[Result] = _Outcome()
        if self.policy.isolate_errors and len(items) > 1:
            self._split(fn, items, outcome)
            if outcome.calls > 1 and not outcome.failures and outcome.error is None:
                outcome.transient = True
            return outcome
        outcome.calls = 1
        try:
            results = fn(items)
        except Exception as exc:  # fails its items, not the loop (a BaseException goes to _watch)
            self._note(outcome, exc, len(items))
            outcome.error = self._error(exc, alone=len(items) == 1)
            if self.policy.isolate_errors:  # a batch of one: the item failed alone
                outcome.failures = 1
            return outcome
        if len(results) != len(items):
            outcome.error = _wrong_length(results, items)
            return outcome
        outcome.results = results if isinstance(results, list) else list(results)
        return outcome

    def _split(
        self,
        fn: Callable[[list[Item]], Sequence[Result]],
        items: list[Item],
        outcome: _Outcome[Result],
    ) -> None:
        """Run ``items``; on failure halve them until the failing ones run alone.

        k failing items in a batch of B cost at most 2·k·⌈log2 B⌉ extra calls."""
        outcome.calls += 1
        try:
            results = fn(items)
        except Exception as exc:  # fails its items, not the loop (a BaseException goes to _watch)
            self._note(outcome, exc, len(items))
            if len(items) == 1:
                outcome.failures += 1
                outcome.results.append(_Failure(self._error(exc, alone=True)))  # type: ignore[arg-type]
                return
            middle = len(items) // 2
            self._split(fn, items[:middle], outcome)
            self._split(fn, items[middle:], outcome)
            return
        if len(results) != len(items):
            outcome.error = _wrong_length(results, items)
            outcome.results.extend([None] * len(items))  # type: ignore[list-item]
            return
        outcome.results.extend(results)

    def _note(self, outcome: _Outcome[Result], exc: BaseException, size: int) -> None:
        if self._is_resource_error(exc) and size > 1:
            half = size // 2
            outcome.shrink_to = min(outcome.shrink_to or half, half)

    def _error(self, exc: BaseException, *, alone: bool) -> BatchingError:
        """The error a caller gets; ``alone``: its item failed in a batch of one."""
        error: BatchingError
        if self._is_resource_error(exc):
            error = OutOfResources(
                "the model ran out of resources"
                + (" for this request even alone" if alone else "")
                + f": {type(exc).__name__}: {exc}"
            )
        elif alone and self.policy.isolate_errors:
            error = BatchFailed(
                f"the model failed on this request's input: {type(exc).__name__}: {exc}",
                item_error=True,
            )
        else:
            error = BatchFailed(f"the model failed: {type(exc).__name__}: {exc}")
            logger.warning("%s: batch failed: %r", self.name, exc)
        error.__cause__ = exc
        return error

    def _deliver(
        self,
        batch: list[_Segment[Item, Result]],
        outcome: _Outcome[Result],
        size: int,
        seconds: float,
    ) -> None:
        results = outcome.results
        if outcome.transient:
            self.stats.transient_errors += 1
        self.stats.isolated_items += outcome.failures
        offset = 0
        for pending, start, stop in batch:
            count = stop - start
            mine = results[offset : offset + count]
            offset += count
            if outcome.failures:
                failure: object = next((r for r in mine if type(r) is _Failure), None)
                if isinstance(failure, _Failure):
                    self._fail(pending, failure.error, "failed")
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


class _HungForward(BaseException):
    """Raised past the batch loop when a forward pass hangs, so that the
    watchdog restarts the instance on a fresh thread."""


def _cancelling() -> bool:
    """Whether the running task is being cancelled (by ``aclose``), rather
    than handed a ``CancelledError`` that a model raised in its thread."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _wrong_length(results: Sized, items: list[Any]) -> BatchFailed:
    return BatchFailed(
        f"the model returned {len(results)} results for a batch of {len(items)} items"
    )


class _Failure:
    """Stands in a result list for an item that failed alone."""

    __slots__ = ("error",)

    def __init__(self, error: BatchingError) -> None:
        self.error = error


class _Outcome(Generic[Result]):
    """What the worker thread hands back for one batch."""

    __slots__ = ("calls", "error", "failures", "results", "shrink_to", "transient")

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.error: BatchingError | None = None  # the whole batch failed
        self.calls = 0
        self.failures = 0
        self.transient = False
        self.shrink_to = 0
