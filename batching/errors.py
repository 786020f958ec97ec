"""Why a submitted item did not get a result.

    BatchingError
     ├── Refused                 nothing was queued: the caller may retry
     │    ├── Overloaded         the queue is full (retry after ``retry_after``)
     │    └── Closed             the batcher is draining or closed (retry elsewhere)
     ├── NotRun                  queued, but no result was computed for it
     │    ├── DeadlineExceeded   the item's deadline passed before its batch ran
     │    └── Cancelled          the batcher shut down before the item's result
     │                           came back
     ├── ModelFailed             the forward pass holding the item failed
     │    ├── BatchFailed        the batch function raised, or returned the wrong
     │    │                      number of results; ``__cause__`` holds the error
     │    ├── OutOfResources     it ran out of memory, even after the batch was
     │    │                      split down to this item
     │    └── Hung               it ran past the hang limit; its thread was
     │                           abandoned and a fresh one serves on
     └── InternalError           the batcher itself failed while running the batch
                                 (a bug of ours, not the model's or the input's)

The categories are for callers that answer by kind: a ``Refused`` item cost
nothing and can go elsewhere, a ``NotRun`` one never reached the model, a
``ModelFailed`` one did. These are plain values: ``server/`` maps each one to
an HTTP status in one place. A caller that cancels its own ``await`` gets
``asyncio.CancelledError`` as usual; its items are dropped before they reach
a batch.
"""

from __future__ import annotations


class BatchingError(Exception):
    """Base class of every error the batcher hands to a caller."""


class Refused(BatchingError):
    """The items were refused at the door: nothing was queued."""


class NotRun(BatchingError):
    """The items were queued but no result was computed for them."""


class ModelFailed(BatchingError):
    """The forward pass that held the items failed (the model's doing)."""


class Overloaded(Refused):
    """The queue had no room for the items; they were not queued."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Closed(Refused):
    """The batcher no longer accepts items (draining or closed)."""


class DeadlineExceeded(NotRun):
    """The item's deadline passed while it waited; it was never computed."""


class Cancelled(NotRun):
    """The batcher was closed before the item ran, or while its batch ran
    (``aclose`` ran out of time): no result came back for it."""


class BatchFailed(ModelFailed):
    """The batch function failed for a batch that held this item.

    ``item_error`` is True when the failure was traced to the item itself
    (the batch was split until the failing item ran alone), and False when
    the batch as a whole failed (for example a result list of the wrong
    length).
    """

    def __init__(self, message: str, *, item_error: bool = False) -> None:
        super().__init__(message)
        self.item_error = item_error


class OutOfResources(ModelFailed):
    """The forward pass ran out of resources (memory) for this item."""


class Hung(ModelFailed):
    """The forward pass holding this item ran longer than the policy's
    ``hang_seconds``: it was given up on (its thread cannot be killed and is
    left to finish or not), and the instance serves on from a fresh thread."""


class InternalError(BatchingError):
    """The batcher's own code failed around this item's batch (a bug).

    The model and the input are not to blame; ``__cause__`` holds the error
    for the log. The batch loop survives it and keeps serving.
    """
