"""Errors the server answers with, and the one place they become HTTP.

    ServerError                  (500 unless a subclass says otherwise)
     ├── BadRequest         400  malformed body, wrong input name/datatype/shape
     ├── NotFound           404  unknown model or route
     ├── PayloadTooLarge    413  body over the configured limit
     └── NotReady           503  the model is still loading or is draining

The batcher's own errors (``batching.errors``) are mapped here too:
Overloaded and Closed are 503 with ``Retry-After``, DeadlineExceeded is 504,
BatchFailed is 500 (422 when traced to one item), OutOfResources is 507.
Anything else (``batching.InternalError`` included) is our bug:
500 with no detail for the client, the traceback in the log.

Every answer for something that failed (422 and 500 model errors, 507, and
our own 500s) carries an ``error_id`` that is also in the server log line
for it, so a caller can quote it and an operator can find the details.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass

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
    status = 500


class BadRequest(ServerError):
    status = 400


class NotFound(ServerError):
    status = 404


class PayloadTooLarge(ServerError):
    status = 413


class NotReady(ServerError):
    status = 503


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    status: int
    body: bytes
    headers: Headers
    reason: str  # the outcome label in /metrics
    error_id: str | None = None  # also in the log line, for failures worth looking up


def http_error(exc: BaseException) -> ErrorResponse:
    """The answer for an exception: status, JSON body, extra headers, reason."""
    headers: Headers = []
    message = str(exc)
    error_id: str | None = None
    if isinstance(exc, ServerError):
        status, reason = exc.status, _REASONS.get(exc.status, "invalid")
    elif isinstance(exc, Overloaded):
        status, reason = 503, "overloaded"
        headers.append((b"retry-after", b"%d" % exc.retry_after))
    elif isinstance(exc, Closed | Cancelled):
        status, reason = 503, "shutting_down"
        headers.append((b"retry-after", b"1"))
    elif isinstance(exc, DeadlineExceeded):
        status, reason = 504, "deadline_exceeded"
    elif isinstance(exc, Hung):
        status, reason = 504, "model_hung"
    elif isinstance(exc, OutOfResources | BatchFailed):
        if isinstance(exc, OutOfResources):
            status, reason = 507, "insufficient_resources"
        else:
            status, reason = (422 if exc.item_error else 500), "model_error"
        error_id = secrets.token_hex(8)
        logger.warning("error %s (%d %s): %s", error_id, status, reason, message)
        message = _redact(message)
    else:
        error_id = secrets.token_hex(8)
        logger.error("error %s: unhandled", error_id, exc_info=exc)
        status, reason = 500, "internal"
        message = f"internal server error {error_id}; the server log has the details"
    doc = {"error": message, "reason": reason}
    if error_id is not None:
        doc["error_id"] = error_id
    return ErrorResponse(status, orjson.dumps(doc), headers, reason, error_id)


# The model's own message helps the caller ("poison value 13"), but a path
# on this server is none of its business.
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.\-~]+){2,}[/\\]?")


def _redact(message: str) -> str:
    return _PATH.sub("<path>", message)


_REASONS = {404: "not_found", 413: "too_large", 503: "not_ready"}
