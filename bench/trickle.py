"""Slow clients for ``bench.slowloris``: connections that send one byte a second.

``attacker`` runs in a process of its own (so that neither its timers nor
the traffic generator's wait behind the other's work) and keeps ``headers`` connections trickling a
request head and ``bodies`` connections trickling a body (the head sent
whole) open against a server: each one the server closes is replaced at
once. Told to stop, it replaces no more, waits for the server to close the
last ones, and reports every connection: how long it was open from connect
to the server's close (FIN or reset), and the status it was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import resource
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Any, cast

from bench.client import request_bytes
from bench.loopback import HOST, require_loopback

_PATH = "/v2/models/echo/infer"
_RAMP_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Closed:
    """One slow connection: seconds from connect to the server's close, and
    the status it was answered (0: none). ``inf`` seconds: never closed."""

    kind: str  # "headers" or "body"
    seconds: float
    status: int


class _Slow(asyncio.Protocol):
    """Sends ``first`` at once, then one byte of ``rest`` a second, until closed."""

    def __init__(self, kind: str, first: bytes, rest: bytes, done: Callable[[_Slow], None]) -> None:
        self.kind, self.first, self.rest, self.done = kind, first, rest, done
        self.opened = self.closed = math.nan
        self.answer = b""
        self.transport: asyncio.Transport | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike
        self.transport = cast(asyncio.Transport, transport)
        self.opened = time.perf_counter()
        self.transport.write(self.first)
        self._tick = asyncio.get_running_loop().call_later(1.0, self._next)

    def _next(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        at = self._sent % len(self.rest)
        self.transport.write(self.rest[at : at + 1])
        self._sent += 1
        self._tick = asyncio.get_running_loop().call_later(1.0, self._next)

    def data_received(self, data: bytes) -> None:
        if len(self.answer) < 16:
            self.answer += data[:16]

    def eof_received(self) -> bool:
        self._end()
        return False  # and close our side

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()  # a reset, or after eof_received
        self.transport = None

    def _end(self) -> None:
        if math.isnan(self.closed):
            self.closed = time.perf_counter()
            if self._tick is not None:
                self._tick.cancel()
            self.done(self)

    def result(self) -> Closed:
        status = int(self.answer[9:12]) if self.answer.startswith(b"HTTP/1.1 ") else 0
        return Closed(self.kind, self.closed - self.opened, status)


def _requests(port: int) -> dict[str, tuple[bytes, bytes]]:
    """Per kind: what a connection sends at once, and what it trickles."""
    head = request_bytes(HOST, port, _PATH, b"")
    head = head[: head.index(b"Content-Length")]
    endless_head = head + b"x-slow: " + b"a" * 4096
    return {
        "headers": (endless_head[:1], endless_head[1:]),
        "body": (head + b"Content-Length: 4096\r\n\r\n", b"1" * 4096),
    }


async def _attack(port: int, headers: int, bodies: int, deadline: float, control: Pipe) -> None:
    loop = asyncio.get_running_loop()
    kinds = _requests(port)
    live: set[_Slow] = set()
    closes: list[Closed] = []
    errors: list[str] = []
    replacing: set[asyncio.Task[None]] = set()
    stopping = False

    def done(conn: _Slow) -> None:
        live.discard(conn)
        closes.append(conn.result())
        if not stopping:
            task = loop.create_task(open_one(conn.kind))
            replacing.add(task)
            task.add_done_callback(replacing.discard)

    async def open_one(kind: str) -> None:
        first, rest = kinds[kind]
        try:
            _, conn = await loop.create_connection(
                lambda: _Slow(kind, first, rest, done), require_loopback(HOST), port
            )
            live.add(conn)
        except OSError as exc:
            errors.append(str(exc))

    plan = ["headers"] * headers + ["body"] * bodies
    random.Random(0).shuffle(plan)
    for i, kind in enumerate(plan):
        await open_one(kind)
        if i % 100 == 99:
            await asyncio.sleep(_RAMP_SECONDS * 100 / len(plan))
    control.send(("ready", len(live), errors[:3]))
    await loop.run_in_executor(None, control.poll, None)  # until told to stop
    stopping = True
    await asyncio.gather(*replacing)
    for _ in range(int((deadline + 5) / 0.1)):
        if not live:
            break
        await asyncio.sleep(0.1)
    for conn in list(live):  # the server never closed it
        closes.append(Closed(conn.kind, math.inf, 0))
        if conn.transport is not None:
            conn.transport.abort()
    control.send(("done", closes, errors[:3]))


def attacker(
    port: int, headers: int, bodies: int, deadline: float, control: Pipe, cpus: set[int]
) -> None:
    """The attackers' process, on ``cpus``: sends ``("ready", opened, errors)``
    once every connection is open; on any message back it stops, and sends
    ``("done", [Closed, ...], errors)``."""
    raise_open_files(headers + bodies + 256)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, cpus)
    run_loop(_attack(port, headers, bodies, deadline, control))


def raise_open_files(want: int) -> None:
    """Raise this process's soft limit on open files to ``want`` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        ceiling = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """``main`` on uvloop where it is installed: a cheaper loop for the generators."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
