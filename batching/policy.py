"""What a batcher is told and what it tells back: its policy, a caller's
completion, the running figures, and the two callbacks it takes.

``BatchPolicy``'s defaults are meant as the one source of batching
defaults: a knob that a model's settings leave out takes its value here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Result = TypeVar("Result")


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How items are grouped into batches and how long anyone waits.

    ``max_batch_size``
        The most items one forward pass takes.
    ``max_wait``
        Seconds a batch may wait to fill, counted from its *oldest* item's
        arrival, so a busy queue never waits twice.
    ``max_queue``
        The most items waiting at once; past it callers get ``Overloaded``
        at once rather than a long wait.
    ``eager``
        Dispatch as soon as one turn of the event loop brings no new item:
        when nobody else is arriving, waiting out ``max_wait`` only adds
        latency.
    ``isolate_errors``
        Split a failing batch in halves until the failing items run alone:
        they fail, everyone else gets an answer. Off: the batch fails whole.
    ``shrink_seconds``
        After an out-of-resources failure, batches stay at most half the
        size that failed for this long.
    ``hang_seconds``
        A forward pass running longer than this is given up on: its callers
        get ``Hung``, the instance restarts on a fresh thread, and
        ``BatcherStats.hung_forwards`` counts the abandoned threads until
        they return. None: wait for ever.
    """

    max_batch_size: int = 32
    max_wait: float = 0.002
    max_queue: int = 256
    eager: bool = True
    isolate_errors: bool = True
    shrink_seconds: float = 60.0
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


def out_of_memory(exc: BaseException) -> bool:
    """The default ``ResourceCheck``: a ``MemoryError`` means out of resources."""
    return isinstance(exc, MemoryError)
