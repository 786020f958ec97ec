"""A pool of raw keep-alive HTTP connections, for tests that send thousands
of requests to a loopback server.

httpx costs milliseconds per request on this machine's shared cores, so a
test that needs 1,000 follow-up requests, or the same burst 100 times over,
would spend its time in the client. ``Pool`` sends each request on an idle
connection of ``bench.client`` (one request at a time per connection) and
opens a new connection where the server closed one (a 503 before the body
was read comes with ``Connection: close``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from bench.client import Connection, get_bytes, open_connection, request_bytes

HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lowercased
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Pool:
    """Up to ``size`` requests in flight, over as many keep-alive connections."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []
        self._answers: dict[Connection, asyncio.Future[Answer]] = {}
        self._all: set[Connection] = set()

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for conn in self._all:
            conn.abort()

    async def post(self, path: str, doc: Any) -> Answer:
        """POST ``doc`` as JSON to ``path`` and return the answer."""
        return await self._send(request_bytes(HOST, self.port, path, orjson.dumps(doc)))

    async def get(self, path: str) -> Answer:
        return await self._send(get_bytes(HOST, self.port, path))

    async def _send(self, data: bytes) -> Answer:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            self._answers[conn] = answer
            conn.send(data, 0)
            try:
                return await answer
            finally:
                self._answers.pop(conn, None)
                if conn.transport is not None and not conn.closing:
                    self._idle.append(conn)
                else:
                    conn.abort()
                    self._all.discard(conn)

    async def _connect(self) -> Connection:
        conn = await open_connection(HOST, self.port, self._on_answer, self._on_lost)
        self._all.add(conn)
        return conn

    def _on_answer(self, conn: Connection, status: int, body: bytes, at: float) -> None:
        answer = self._answers.get(conn)
        if answer is not None and not answer.done():
            answer.set_result(Answer(status, _headers(conn.head), body))

    def _on_lost(self, conn: Connection, why: str) -> None:
        answer = self._answers.get(conn)
        if answer is not None and not answer.done():
            answer.set_exception(ConnectionError(why))


def _headers(head: bytes) -> dict[str, str]:
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    return headers
