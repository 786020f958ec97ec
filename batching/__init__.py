"""carpool's micro-batcher: the standard library only, no HTTP, no torch."""

from batching.batcher import Batcher, BatcherStats, BatchListener, BatchPolicy, Completion
from batching.errors import (
    BatchFailed,
    BatchingError,
    Cancelled,
    Closed,
    DeadlineExceeded,
    Overloaded,
)

__all__ = [
    "BatchFailed",
    "BatchListener",
    "BatchPolicy",
    "Batcher",
    "BatcherStats",
    "BatchingError",
    "Cancelled",
    "Closed",
    "Completion",
    "DeadlineExceeded",
    "Overloaded",
]
