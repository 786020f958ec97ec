"""Errors the server answers with, and the one table from exception to answer.

The server's own errors carry their status and reason (the label ``/metrics``
counts the request under)::

    ServerError                       500  internal
     ├── BadRequest                   400  invalid             malformed body, wrong input
     ├── Unauthorized                 401  unauthorized        missing or unknown bearer token
     ├── Forbidden                    403  forbidden           a token of the other area
     ├── NotFound                     404  not_found           unknown model, version or route
     ├── MethodNotAllowed             405  method_not_allowed
     ├── RequestTimeout               408  timeout             headers or body too slow
     ├── PayloadTooLarge              413  too_large           body or item count over a limit
     ├── HeadersTooLarge              431  too_large
     └── NotReady                     503  not_ready

The batcher's errors (``batching.errors``) know nothing of HTTP; ``ANSWERS``
maps them, and anything else, by walking the exception's class ancestry (as
Starlette's exception handling does)::

    Refused       Overloaded          503  overloaded          + Retry-After (the drain time)
                  Closed              503  shutting_down       + Retry-After: 1
    NotRun        DeadlineExceeded    504  deadline_exceeded
                  Cancelled           503  shutting_down       + Retry-After: 1
    ModelFailed   BatchFailed         500  model_error         422 when traced to one item
                  OutOfResources      507  insufficient_resources
                  Hung                504  model_hung
    anything else (InternalError too) 500  internal            our bug: no detail, traceback logged

``answer(exc)`` is the only place an error body is built; ``server/asgi.py``
``refuse`` writes it as an HTTP answer or a refused WebSocket handshake, and
a stream sends ``answer(exc).frame(id)``. Every answer for something that
failed (422 and 500 model errors, 507, our own 500s) carries an
``error_id`` that is also in the server log line for it, so a caller can
quote it and an operator can find the details.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from batching import (
    BatchFailed,
    Cancelled,
    Closed,
    DeadlineExceeded,
    Hung,
    OutOfResources,
    Overloaded,
)

logger = logging.getLogger("carpool.server")

Headers = list[tuple[bytes, bytes]]


class ServerError(Exception):
    """Base of the server's own errors: a message for the caller, a status,
    a reason, and any headers the answer needs."""

    status = 500
    reason = "internal"

    def __init__(self, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.headers: Headers = headers or []


class BadRequest(ServerError):
    status, reason = 400, "invalid"


class Unauthorized(ServerError):
    status, reason = 401, "unauthorized"


class Forbidden(ServerError):
    status, reason = 403, "forbidden"


class NotFound(ServerError):
    status, reason = 404, "not_found"


class MethodNotAllowed(ServerError):
    status, reason = 405, "method_not_allowed"


class RequestTimeout(ServerError):
    status, reason = 408, "timeout"


class PayloadTooLarge(ServerError):
    status, reason = 413, "too_large"


class HeadersTooLarge(ServerError):
    status, reason = 431, "too_large"


class NotReady(ServerError):
    status, reason = 503, "not_ready"


@dataclass(frozen=True, slots=True)
class Rule:
    """How one class of exception is answered."""

    status: int
    reason: str
    # a failure worth looking up: logged with an error id, server paths redacted
    failure: bool = False
    retry: bool = False  # answered with Retry-After
    item_status: int | None = None  # BatchFailed traced to its own item


ANSWERS: dict[type[BaseException], Rule] = {
    Overloaded: Rule(503, "overloaded", retry=True),
    Closed: Rule(503, "shutting_down", retry=True),
    Cancelled: Rule(503, "shutting_down", retry=True),
    DeadlineExceeded: Rule(504, "deadline_exceeded"),
    Hung: Rule(504, "model_hung"),
    BatchFailed: Rule(500, "model_error", failure=True, item_status=422),
    OutOfResources: Rule(507, "insufficient_resources", failure=True),
    BaseException: Rule(500, "internal"),
}
"""The answer for each exception that is not a ``ServerError``: the entry of
the nearest class in its ancestry."""

_FOUND: dict[type[BaseException], Rule] = {}


def _rule(kind: type[BaseException]) -> Rule:
    rule = _FOUND.get(kind)
    if rule is None:
        rule = next(ANSWERS[cls] for cls in kind.__mro__ if cls in ANSWERS)
        _FOUND[kind] = rule
    return rule


@dataclass(frozen=True, slots=True)
class Answer:
    """What a caller is told about an exception."""

    status: int
    reason: str
    message: str
    headers: Headers
    error_id: str | None = None  # also in the log line, for failures worth looking up
    retry_after: int | None = None

    @property
    def body(self) -> bytes:
        """The JSON body of an HTTP answer."""
        doc = {"error": self.message, "reason": self.reason}
        if self.error_id is not None:
            doc["error_id"] = self.error_id
        return orjson.dumps(doc)

    def frame(self, request_id: str | None) -> bytes:
        """The JSON of a stream's error message for request ``request_id``."""
        doc: dict[str, Any] = {
            "id": request_id,
            "error": self.message,
            "status": self.status,
            "reason": self.reason,
        }
        if self.error_id is not None:
            doc["error_id"] = self.error_id
        if self.retry_after is not None:
            doc["retry_after"] = self.retry_after
        return orjson.dumps(doc)


def answer(exc: BaseException) -> Answer:
    """The answer for an exception: status, reason, message, headers."""
    message = str(exc)
    if isinstance(exc, ServerError):
        return Answer(exc.status, exc.reason, message, exc.headers)
    rule = _rule(type(exc))
    status = rule.status
    headers: Headers = []
    retry_after: int | None = None
    error_id: str | None = None
    if rule.retry:
        retry_after = int(exc.retry_after) if isinstance(exc, Overloaded) else 1
        headers.append((b"retry-after", b"%d" % retry_after))
    if rule.item_status is not None and isinstance(exc, BatchFailed) and exc.item_error:
        status = rule.item_status
    if rule.failure:
        error_id = secrets.token_hex(8)
        logger.warning("error %s (%d %s): %s", error_id, status, rule.reason, message)
        message = _redact(message)
    elif rule.reason == "internal":
        error_id = secrets.token_hex(8)
        logger.error("error %s: unhandled", error_id, exc_info=exc)
        message = f"internal server error {error_id}; the server log has the details"
    return Answer(status, rule.reason, message, headers, error_id, retry_after)


# The model's own message helps the caller ("poison value 13"), but a path
# on this server is none of its business.
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-~]+){2,}[/\\]?")


def _redact(message: str) -> str:
    return _PATH.sub("<path>", message)
