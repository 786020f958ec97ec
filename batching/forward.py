"""The forward pass as a worker thread runs it: one call of the batch
function, split on failure, turned into an ``Outcome``.

Everything here is synchronous and knows no event loop: a ``Forward`` is
called with a list of items and returns what happened, and the instance
that ran it (``batching.instance``) settles the callers on the loop.

A batch function that raises an ``Exception`` (or returns the wrong number
of results) fails only the items of that batch. With ``isolate_errors`` a
failing batch is halved, and halved again, until the failing items run
alone: they fail with ``BatchFailed(item_error=True)`` (or
``OutOfResources``), everyone else gets an answer. An out-of-resources
failure of a batch of more than one also notes half its size, so that the
queue caps later batches for a while. A ``BaseException`` that is not an
``Exception`` is not caught here: nobody can vouch for the thread after it,
so no further call is made and it goes to the instance's watchdog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence, Sized
from typing import Any, Generic, TypeVar

from batching.errors import BatchFailed, BatchingError, OutOfResources
from batching.policy import ResourceCheck, out_of_memory

Item = TypeVar("Item")
Result = TypeVar("Result")

logger = logging.getLogger("carpool.batching")


class Failure:
    """Stands in a result list for an item that failed alone."""

    __slots__ = ("error",)

    def __init__(self, error: BatchingError) -> None:
        self.error = error


class Outcome(Generic[Result]):
    """What the worker thread hands back for one batch."""

    __slots__ = ("calls", "error", "failures", "results", "shrink_to", "transient")

    def __init__(self) -> None:
        # One per item, in order; a ``Failure`` where an item failed alone.
        self.results: list[Result] = []
        self.error: BatchingError | None = None  # the whole batch failed
        self.calls = 0  # calls of the batch function, splits included
        self.failures = 0  # items that failed alone
        self.transient = False  # it failed, then every half succeeded
        self.shrink_to = 0  # out of resources: later batches at most this large


class Forward(Generic[Item, Result]):
    """Runs ``fn(items) -> results`` for one batch and says how it went.

    ``isolate_errors`` as in ``BatchPolicy``; ``is_resource_error`` tells
    an out-of-resources exception from the rest; ``name`` labels the log.
    """

    __slots__ = ("fn", "is_resource_error", "isolate_errors", "name")

    def __init__(
        self,
        fn: Callable[[list[Item]], Sequence[Result]],
        *,
        isolate_errors: bool,
        is_resource_error: ResourceCheck = out_of_memory,
        name: str = "batcher",
    ) -> None:
        self.fn = fn
        self.isolate_errors = isolate_errors
        self.is_resource_error = is_resource_error
        self.name = name

    def __call__(self, items: list[Item]) -> Outcome[Result]:
        """The forward pass; with ``isolate_errors``, split on failure."""
        outcome: Outcome[Result] = Outcome()
        if self.isolate_errors and len(items) > 1:
            self._split(items, outcome)
            if outcome.calls > 1 and not outcome.failures and outcome.error is None:
                outcome.transient = True
            return outcome
        outcome.calls = 1
        try:
            results = self.fn(items)
        except Exception as exc:  # fails its items, not the loop (a BaseException goes on)
            self._note(outcome, exc, len(items))
            outcome.error = self._error(exc, alone=len(items) == 1)
            if self.isolate_errors:  # a batch of one: the item failed alone
                outcome.failures = 1
            return outcome
        if len(results) != len(items):
            outcome.error = wrong_length(results, items)
            return outcome
        outcome.results = results if isinstance(results, list) else list(results)
        return outcome

    def _split(self, items: list[Item], outcome: Outcome[Result]) -> None:
        """Run ``items``; on failure halve them until the failing ones run alone.

        k failing items in a batch of B cost at most 2·k·⌈log2 B⌉ extra calls."""
        outcome.calls += 1
        try:
            results = self.fn(items)
        except Exception as exc:  # fails its items, not the loop (a BaseException goes on)
            self._note(outcome, exc, len(items))
            if len(items) == 1:
                outcome.failures += 1
                outcome.results.append(Failure(self._error(exc, alone=True)))  # type: ignore[arg-type]
                return
            middle = len(items) // 2
            self._split(items[:middle], outcome)
            self._split(items[middle:], outcome)
            return
        if len(results) != len(items):
            # A wrong count says nothing about any one item: the batch fails whole.
            outcome.error = wrong_length(results, items)
            outcome.results.extend([None] * len(items))  # type: ignore[list-item]
            return
        outcome.results.extend(results)

    def _note(self, outcome: Outcome[Result], exc: BaseException, size: int) -> None:
        if self.is_resource_error(exc) and size > 1:
            half = size // 2
            outcome.shrink_to = min(outcome.shrink_to or half, half)

    def _error(self, exc: BaseException, *, alone: bool) -> BatchingError:
        """The error a caller gets; ``alone``: its item failed in a batch of one."""
        error: BatchingError
        if self.is_resource_error(exc):
            error = OutOfResources(
                "the model ran out of resources"
                + (" for this request even alone" if alone else "")
                + f": {type(exc).__name__}: {exc}"
            )
        elif alone and self.isolate_errors:
            error = BatchFailed(
                f"the model failed on this request's input: {type(exc).__name__}: {exc}",
                item_error=True,
            )
        else:
            error = BatchFailed(f"the model failed: {type(exc).__name__}: {exc}")
            logger.warning("%s: batch failed: %r", self.name, exc)
        error.__cause__ = exc
        return error


def wrong_length(results: Sized, items: list[Any]) -> BatchFailed:
    """The error for a batch function that broke its one promise: one result per item."""
    return BatchFailed(
        f"the model returned {len(results)} results for a batch of {len(items)} items"
    )
