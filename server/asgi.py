"""Raw ASGI plumbing for the hot path: no Request/Response objects.

The infer route reads its body from ``receive()`` itself (so a declared
Content-Length over the limit is refused before a byte of the body is read)
and sends its answer with two ``send()`` calls. ``refuse`` is the one writer
of an error: an HTTP answer, or a refused WebSocket handshake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.errors import Answer, BadRequest, PayloadTooLarge, answer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"
OCTETS = b"application/octet-stream"


class ClientGone(Exception):
    """The client disconnected before it could be answered."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (``name`` in lower case)."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def int_header(scope: Scope, name: bytes) -> int | None:
    return int_value(name, header(scope, name))


def int_value(name: bytes, value: bytes | None) -> int | None:
    """The value of header ``name`` as an integer (``BadRequest`` if it is not one)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"header {name.decode()} must be an integer") from None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = int_header(scope, b"content-length")
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; this server takes at most {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client disconnected while sending its body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes, the most this server takes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond(
    send: Send,
    status: int,
    body: bytes,
    headers: Headers | None = None,
    content_type: bytes = JSON,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(body)),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def refuse(scope: Scope, send: Send, error: BaseException | Answer) -> Answer:
    """Answer an HTTP request, or refuse a WebSocket handshake, with the JSON
    error for ``error``; the answer it sent."""
    told = error if isinstance(error, Answer) else answer(error)
    body = told.body
    headers = [
        (b"content-type", JSON),
        (b"content-length", b"%d" % len(body)),
        *told.headers,
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": told.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif "websocket.http.response" in scope.get("extensions", {}):
        start = {"type": "websocket.http.response.start", "status": told.status, "headers": headers}
        await send(start)
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})  # uvicorn answers 403
    return told


class DisconnectWatch:
    """Cancels the awaiting task if the client goes away before its answer.

    Once the body is read, uvicorn's ``receive()`` only returns when the
    client disconnects; a cancelled ``submit`` takes the request's items out
    of the queue before they are computed. Watching costs a task, so it
    starts only for a request still waiting after ``after`` seconds: most are
    answered sooner, and computing one whose client just left costs little.
    The watch owns that task: ``close()`` cancels it, and the request's
    handler calls ``close()`` on every path.
    """

    __slots__ = ("_receive", "_start", "_task", "_watch", "gone")

    def __init__(self, receive: Receive, after: float = 0.02) -> None:
        self.gone = False
        self._receive = receive
        self._task = asyncio.current_task()
        self._watch: asyncio.Future[Message] | None = None
        self._start = asyncio.get_running_loop().call_later(after, self._begin)

    def _begin(self) -> None:
        self._watch = asyncio.ensure_future(self._receive())
        self._watch.add_done_callback(self._on_message)

    def _on_message(self, watch: asyncio.Future[Message]) -> None:
        if watch.cancelled() or watch.exception() is not None:
            return
        if watch.result()["type"] == "http.disconnect" and self._task is not None:
            self.gone = True
            self._task.cancel()

    def close(self) -> None:
        self._start.cancel()
        if self._watch is not None:
            self._watch.remove_done_callback(self._on_message)
            self._watch.cancel()
