"""One model instance: its worker thread, the loop that serves it batches,
and the watchdog that keeps that loop alive.

The loop gathers a batch from the shared queue, runs the instance's
``Forward`` in the instance's own single-thread executor (so the event loop
never blocks on the model), and settles the batch's callers on the loop.

Nothing stops the loop but closing:

* an ``Exception`` from the batcher's own code or its callbacks (the
  resource check, the per-batch listener, forming a batch) fails only the
  batch it hit, with ``InternalError``, and the loop goes on
  (``stats.loop_errors``);
* a ``BaseException`` that is not an ``Exception`` (``SystemExit``,
  ``KeyboardInterrupt``, a library's own) leaves the worker thread in a
  state nobody can vouch for: its batch fails with ``BatchFailed``, and the
  watchdog restarts the loop on a fresh thread (``stats.loop_restarts``);
* a forward pass that runs past ``hang_seconds`` is given up on: its callers
  get ``Hung``, its thread is left to finish or not (Python cannot stop a
  thread; ``stats.hung_forwards`` counts those still running), and the
  watchdog restarts the loop on a fresh thread.

Only ``aclose`` cancelling the loop's task ends it early; the callers of the
batch it cuts short get ``Cancelled``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from batching.errors import BatchFailed, BatchingError, Cancelled, Hung, InternalError
from batching.forward import Forward, Outcome
from batching.pending import Segment, items_of
from batching.policy import BatchListener
from batching.queue import Queue

Item = TypeVar("Item")
Result = TypeVar("Result")

logger = logging.getLogger("carpool.batching")


class Instance(Generic[Item, Result]):
    """Model instance ``index``: serves batches from ``queue`` through
    ``forward`` on a worker thread of its own."""

    def __init__(
        self,
        index: int,
        forward: Forward[Item, Result],
        queue: Queue[Item, Result],
        on_batch: BatchListener | None = None,
    ) -> None:
        self.index = index
        self.forward = forward
        self.queue = queue
        self.policy = queue.policy
        self.stats = queue.stats
        self.name = queue.name
        self.on_batch = on_batch
        self.executor = self._executor()

    def _executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-{self.index}")

    async def watch(self) -> None:
        """Serve until closed, and restart the loop on a fresh worker thread
        whenever a fault escapes it."""
        while True:
            try:
                await self._serve(self.executor)
                return
            except asyncio.CancelledError as exc:
                if _cancelling():
                    raise  # aclose() ran out of time: a real cancellation
                fault: BaseException = exc  # raised by the model, not by aclose()
            except BaseException as exc:  # SystemExit, KeyboardInterrupt: never past this task
                fault = exc
            self.stats.loop_restarts += 1
            if isinstance(fault, _HungForward):
                logger.error("%s; instance %d restarts on a fresh thread", fault, self.index)
            else:
                logger.error(
                    "%s: the batch loop of instance %d died; restarting it on a fresh thread",
                    self.name,
                    self.index,
                    exc_info=fault,
                )
            self.executor.shutdown(wait=False)
            self.executor = self._executor()
            await asyncio.sleep(0.01)  # a fault that repeats must not spin the event loop

    async def _serve(self, executor: ThreadPoolExecutor) -> None:
        queue = self.queue
        while True:
            try:
                batch = await queue.gather()
                if batch is None:
                    return
                await self._run(batch, executor)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug of ours, not the model's: log it and keep serving.
                self.stats.loop_errors += 1
                logger.exception("%s: batch loop error", self.name)
                await asyncio.sleep(0.01)  # a bug that repeats must not spin the event loop

    async def _run(self, batch: list[Segment[Item, Result]], executor: ThreadPoolExecutor) -> None:
        stats = self.stats
        loop = asyncio.get_running_loop()
        items = items_of(batch)
        size = len(items)
        stats.in_flight += size
        began = time.monotonic()
        outcome: Outcome[Result] | None = None
        try:
            future = loop.run_in_executor(executor, self.forward, items)
            if self.policy.hang_seconds is not None:
                done, _ = await asyncio.wait({future}, timeout=self.policy.hang_seconds)
                if not done:
                    self._give_up(future, began)
            outcome = await future
            self._settle(batch, outcome, size, time.monotonic() - began)
        except BaseException as exc:
            if outcome is None:  # no answers came back from the worker thread
                self._abandon(batch, exc)
            else:  # our own code failed while settling: nobody may be left waiting
                error = InternalError(f"{self.name} failed while answering this request's batch")
                error.__cause__ = exc
                for pending, _, _ in batch:
                    self.queue.fail(pending, error, "failed")  # no-op for those answered
            raise
        finally:
            stats.in_flight -= size

    def _settle(
        self,
        batch: list[Segment[Item, Result]],
        outcome: Outcome[Result],
        size: int,
        seconds: float,
    ) -> None:
        """Count the batch, and answer or fail its callers."""
        stats = self.stats
        queue = self.queue
        queue.observe(seconds)
        stats.batches += 1
        stats.items += size
        stats.forward_calls += outcome.calls
        stats.isolated_items += outcome.failures
        if outcome.shrink_to:
            queue.shrink(outcome.shrink_to)
        if outcome.error is not None:
            stats.failed_batches += 1
            for pending, _, _ in batch:
                queue.fail(pending, outcome.error, "failed")
        else:
            if outcome.transient:
                stats.transient_errors += 1
            queue.deliver(batch, outcome, size, seconds)
        if self.on_batch is not None:
            waits = [p.started - p.enqueued for p, start, _ in batch if start == 0]
            self.on_batch(size, seconds, waits)

    def _give_up(self, future: asyncio.Future[Outcome[Result]], began: float) -> None:
        """A forward pass has hung: leave its thread to itself and raise past
        the loop, so the watchdog restarts the instance on a fresh thread;
        until the hung thread returns, if ever, ``hung_forwards`` stays up and
        the model reports not ready."""
        stats = self.stats
        stats.hangs += 1
        stats.hung_forwards += 1

        def returned(_: asyncio.Future[Outcome[Result]]) -> None:
            stats.hung_forwards -= 1
            logger.warning("%s: a hung forward pass returned after all", self.name)

        future.add_done_callback(returned)
        raise _HungForward(
            f"{self.name}: a forward pass has run {time.monotonic() - began:.1f} s, "
            f"over the {self.policy.hang_seconds} s hang limit"
        )

    def _abandon(self, batch: list[Segment[Item, Result]], exc: BaseException) -> None:
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
            self.queue.fail(pending, error, reason)  # its items still queued leave with it


class _HungForward(BaseException):
    """Raised past the batch loop when a forward pass hangs, so that the
    watchdog restarts the instance on a fresh thread."""


def _cancelling() -> bool:
    """Whether the running task is being cancelled (by ``aclose``), rather
    than handed a ``CancelledError`` that a model raised in its thread."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
