"""The infer transaction, written once for every transport.

What an infer request means does not depend on how it arrived: HTTP
(``server/v2.py``) and the WebSocket stream (``server/stream.py``) only read
and write their frames around these steps::

    model = infer.resolve(name, version)            404 unknown model or version
    request = infer.decode(model, body, header)     400 bad body, 413 too many items
    job = infer.prepare(model, request, timeout)    400 bad input or timeout; items + deadline
    completion = await infer.submit(job)            503 full or draining, 504, 422/500/507
    payload, header_length = infer.encode(job, completion)

Every error is raised, never answered, here: the transport turns it into its
own frame through ``server/errors.py``.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from batching import Completion, Pending
from server.errors import PayloadTooLarge
from server.kinds import Result
from server.models import ModelSet, ServedModel
from server.request import InferRequest, decode_request, queue_timeout
from server.response import encode_response
from server.settings import Settings


@dataclass(slots=True)
class Job:
    """A validated request, split into items, with its deadline."""

    model: ServedModel
    request: InferRequest
    items: list[Any]
    deadline: float  # time.monotonic(): still queued then, it is answered 504


class Infer:
    """The transaction over one server's models and limits."""

    __slots__ = ("max_items", "models")

    def __init__(self, models: ModelSet, settings: Settings) -> None:
        self.models = models
        self.max_items = settings.max_items_per_request

    def resolve(self, name: str, version: str | None) -> ServedModel:
        """The model a path names, or ``NotFound``."""
        return self.models.resolve(name, version)

    def decode(self, model: ServedModel, body: bytes, header_length: int | None) -> InferRequest:
        """Parse and validate a body against the model's declared inputs."""
        request = decode_request(body, model.config, header_length)
        count = request.count
        # 413, not 503: a retry of a request that can never fit would only fail again
        if count > self.max_items:
            raise PayloadTooLarge(
                f"the request has {count} items; this server takes at most "
                f"{self.max_items} per request (CARPOOL_MAX_ITEMS_PER_REQUEST)"
            )
        if count > model.config.max_queue:
            raise PayloadTooLarge(
                f"the request has {count} items; model {model.config.name!r} queues at most "
                f"{model.config.max_queue} (max_queue in its model.toml): split the request"
            )
        return request

    def prepare(self, model: ServedModel, request: InferRequest, timeout_ms: int | None) -> Job:
        """Split the request into the model's items and fix its deadline:
        the model's ``queue_timeout_ms``, shortened (never lengthened) by
        ``timeout_ms`` or the request's ``timeout`` parameter."""
        items = model.kind.split(request)
        seconds = queue_timeout(model.config, request.parameters, timeout_ms)
        return Job(model, request, items, time.monotonic() + seconds)

    def submit(self, job: Job) -> Coroutine[Any, Any, Completion[Result]]:
        """Queue the job's items together and wait for their results (the
        batcher's own coroutine: no extra frame per request)."""
        return job.model.batcher.submit_many(job.items, job.deadline)

    def enqueue(self, job: Job) -> Pending[Any, Result]:
        """Queue the job's items together; its answer comes on the returned
        ``pending.future`` (for transports with many requests in flight)."""
        return job.model.batcher.enqueue(job.items, job.deadline)

    def encode(self, job: Job, completion: Completion[Result]) -> tuple[bytes, int | None]:
        """The answer's body, and the length of its JSON header when binary
        data follows it."""
        return encode_response(job.model.config, job.request, completion.results)
