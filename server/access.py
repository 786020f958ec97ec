"""Structured access logs and ``X-Request-ID``, as one raw ASGI middleware.

Opt-in (``CARPOOL_ACCESS_LOG=1``): when it is off the middleware is not
installed at all, so the hot path pays nothing. When it is on, every HTTP
request

- keeps the ``X-Request-ID`` it came with (nginx sets one; a client may send
  its own) or gets a new one, and its response carries that id back;
- is logged once, when its answer has been sent, as one JSON line on the
  ``carpool.access`` logger: request id, method, path, model, status,
  duration, and for inference the queue and compute time and batch size that
  the infer route already reports in its ``x-carpool-*`` headers.

The lines go to stdout with nothing around them (uvicorn's access log goes
there too), so ``docker logs`` and log shippers read them as JSON lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

import orjson
from starlette.middleware import Middleware

from server.asgi import Message, Receive, Scope, Send
from server.settings import Settings

ACCESS_LOGGER = "carpool.access"
REQUEST_ID = b"x-request-id"

# The same rule as nginx's map in deploy/nginx/nginx.conf: an id a client
# sends is kept only when it cannot smuggle anything into a log line.
_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_MODEL = re.compile(r"/v2/models/([^/]+)")
_TIMINGS = {
    b"x-carpool-queue-ms": "queue_ms",
    b"x-carpool-compute-ms": "compute_ms",
    b"x-carpool-batch-size": "batch_size",
}


def middleware(settings: Settings) -> list[Middleware]:
    """What ``create_app`` installs: the access log when it is on, else nothing."""
    if not settings.access_log:
        return []
    _log_json_lines(logging.getLogger(ACCESS_LOGGER))
    return [Middleware(AccessLog)]


def request_id(scope: Scope) -> bytes:
    """The request's id: its valid ``X-Request-ID``, else a new random one."""
    for key, value in scope["headers"]:
        if key == REQUEST_ID and _VALID_ID.fullmatch(value):
            return value  # type: ignore[no-any-return]
    return os.urandom(16).hex().encode()


class AccessLog:
    """Raw ASGI middleware: echoes or creates ``X-Request-ID``, logs one JSON
    line per HTTP request. WebSocket and lifespan scopes pass through."""

    def __init__(self, app: Any, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        started = time.perf_counter()
        line: dict[str, Any] = {"status": 500}  # unless the app gets to answer

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                line["status"] = message["status"]
                headers = list(message.get("headers", ()))
                for key, value in headers:
                    field = _TIMINGS.get(key.lower())
                    if field is not None:
                        line[field] = _number(value)
                headers.append((REQUEST_ID, rid))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path: str = scope["path"]
            model = _MODEL.match(path)
            record = {
                "time": time.time(),
                "request_id": rid.decode(),
                "method": scope["method"],
                "path": path,
                "model": model.group(1) if model else None,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                **line,
            }
            self.logger.info("%s", orjson.dumps(record).decode())


def _number(value: bytes) -> float | int | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() and b"." not in value else number


class _StdoutLines(logging.Handler):
    """Writes each record's message alone on a line to the current stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(record.getMessage() + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def _log_json_lines(logger: logging.Logger) -> None:
    if not any(isinstance(handler, _StdoutLines) for handler in logger.handlers):
        logger.addHandler(_StdoutLines())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not again, prefixed, through the root logger
