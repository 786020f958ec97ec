"""A minimal keep-alive HTTP/1.1 client connection, for the load generators.

One request at a time per connection (no pipelining), bodies framed by
``Content-Length`` (every server measured here sends it). It is a bare
``asyncio.Protocol`` because the generator shares one core with everything
it measures: per answer it costs a few microseconds, where a general client
costs tens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

from bench.loopback import require_loopback

OnAnswer = Callable[["Connection", int, bytes, float], None]
OnLost = Callable[["Connection", str], None]


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    """A complete POST of ``body`` as JSON to ``path``."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def get_bytes(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


class Connection(asyncio.Protocol):
    """Calls ``on_answer(conn, status, body, at)`` once per answer, or
    ``on_lost(conn, why)`` once when the connection ends."""

    def __init__(self, on_answer: OnAnswer, on_lost: OnLost) -> None:
        self.on_answer = on_answer
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.tag = -1  # the request in flight, -1 when idle
        self.closing = False
        self.head = b""  # the current answer's status line and headers, lowercased
        self._buffer = bytearray()
        self._body_at = -1
        self._end = -1
        self._status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, tag: int) -> None:
        assert self.transport is not None
        self.tag = tag
        self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            if self._end < 0:
                head_end = buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                head = bytes(buffer[:head_end]).lower()
                length = _content_length(head)
                if length < 0 or not head.startswith(b"http/1."):
                    self._fail("an answer without Content-Length")
                    return
                self._status = int(head[9:12])
                self.head = head
                self._body_at = head_end + 4
                self._end = self._body_at + length
                if b"\r\nconnection: close" in head:
                    self.closing = True
            if len(buffer) < self._end:
                return
            at = time.perf_counter()
            body = bytes(buffer[self._body_at : self._end])
            del buffer[: self._end]
            self._end = -1
            self.on_answer(self, self._status, body, at)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_lost(self, str(exc) if exc else "the server closed the connection")

    def _fail(self, why: str) -> None:
        if self.transport is not None:
            self.transport.abort()


def _content_length(head: bytes) -> int:
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return -1
    end = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : end if end >= 0 else None].strip())


async def open_connection(host: str, port: int, on_answer: OnAnswer, on_lost: OnLost) -> Connection:
    require_loopback(host)
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: Connection(on_answer, on_lost), host, port)
    return protocol


async def fetch(
    host: str, port: int, method: str, path: str, body: bytes = b"", timeout: float = 10.0
) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body). For probes and checks."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[tuple[int, bytes]] = loop.create_future()

    def on_answer(conn: Connection, status: int, data: bytes, at: float) -> None:
        if not answer.done():
            answer.set_result((status, data))

    def on_lost(conn: Connection, why: str) -> None:
        if not answer.done():
            answer.set_exception(ConnectionError(why))

    async with asyncio.timeout(timeout):
        conn = await open_connection(host, port, on_answer, on_lost)
        try:
            if method == "GET":
                conn.send(get_bytes(host, port, path), 0)
            else:
                conn.send(request_bytes(host, port, path, body), 0)
            return await answer
        finally:
            conn.abort()
