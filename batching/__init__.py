"""carpool's micro-batcher: the standard library only, no HTTP, no torch.

``Batcher`` is the front door; ``BatchPolicy`` its knobs; ``batching.errors``
draws the tree of errors a caller can get.
"""

from batching.batcher import Batcher
from batching.errors import (
    BatchFailed,
    BatchingError,
    Cancelled,
    Closed,
    DeadlineExceeded,
    Hung,
    InternalError,
    ModelFailed,
    NotRun,
    OutOfResources,
    Overloaded,
    Refused,
)
from batching.pending import Pending
from batching.policy import (
    BatcherStats,
    BatchListener,
    BatchPolicy,
    Completion,
    ResourceCheck,
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
    "Hung",
    "InternalError",
    "ModelFailed",
    "NotRun",
    "OutOfResources",
    "Pending",
    "Overloaded",
    "Refused",
    "ResourceCheck",
]
