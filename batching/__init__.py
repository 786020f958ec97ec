"""carpool's micro-batcher: the standard library only, no HTTP, no torch."""

from batching.batcher import (
    Batcher,
    BatcherStats,
    BatchListener,
    BatchPolicy,
    Completion,
    ResourceCheck,
)
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
    "ResourceCheck",
    "DeadlineExceeded",
    "Hung",
    "InternalError",
    "OutOfResources",
    "Overloaded",
]
