"""Deadlines for receiving a request, below the ASGI app.

uvicorn waits for a request's head and body for as long as the client
likes (slowloris, uvicorn #157). ``ReceiptDeadlines`` is its httptools
protocol with ``header_timeout`` to the last header and ``body_timeout`` to
the body's last byte (408), a cap on an unfinished head (431), and a
lingering close after either answer, as nginx does: one timer per
connection serves every phase. ``_ResponseTransport`` is the transport as
one ASGI request's cycle sees it: its head leaves with the body's first
write, and an early answer while the body still arrives lingers too.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from server.errors import HeadersTooLarge, RequestTimeout, answer
from server.settings import Settings

# the phases of a connection's current request
_IDLE = 0  # between requests (uvicorn's keep-alive timeout applies)
_FRESH = 1  # connection opened, no byte yet
_HEAD = 2  # request line and headers arriving
_BODY = 3  # body arriving

# room for the request line and the header framing ("name: value\r\n") on top
# of the names and values that server/limits.py counts
HEAD_SLACK = 8 * 1024
_DEFAULTS = Settings()
_LINGER_SECONDS = 2.0
ONE_WRITE = 64 * 1024  # a body up to this size is joined to its head for one write
_CLOSING_JSON = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"


class ReceiptDeadlines(HttpToolsProtocol):
    """HttpToolsProtocol with header and body deadlines and a head-size cap."""

    header_timeout: float = _DEFAULTS.header_timeout
    body_timeout: float = _DEFAULTS.body_timeout
    max_head_bytes: int = 2 * _DEFAULTS.max_header_bytes + HEAD_SLACK

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._started = 0.0
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._lingering = False
        self._upgraded = False  # handed to a WebSocket protocol
        # keep-alive: idle since (loop time), None while a request is on the
        # connection (kept by the subclass); no receipt deadline while idle
        self._idle_since: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = _FRESH
        self._started = self.loop.time()
        self._arm(self._started + self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)
        if self._upgraded:
            return  # a WebSocket's now: no receipt deadline applies to it
        phase = self._phase
        if phase == _IDLE:
            if self._idle_since is not None or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # the app is answering; its time is not limited here
            # bytes between requests that begin none (blank lines) cancelled
            # uvicorn's keep-alive timeout: count them as a new request's head
            phase = self._phase = _FRESH
            self._started = self.loop.time()
        elif self.transport.is_closing():
            return
        if phase == _HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(
                    HeadersTooLarge(f"the request head is over {self.max_head_bytes} bytes")
                )
                return
        deadline = self._started + self._limit(phase)
        if self._timer is None or deadline < self._timer_at:
            self._disarm()
            self._arm(deadline)

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes the transport over; its handshake gets the
        # header deadline: uvicorn's websockets-sansio protocol never answers (nor
        # closes) a handshake that websockets cannot parse, such as a POST with a body.
        self._disarm()
        self._phase = _IDLE
        self._upgraded = True
        transport = self.transport
        super().handle_websocket_upgrade()
        self.loop.call_later(
            self.header_timeout, _close_unless_open, transport, transport.get_protocol()
        )

    def _limit(self, phase: int) -> float:
        return self.body_timeout if phase == _BODY else self.header_timeout

    def _arm(self, deadline: float) -> None:
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        # One timer serves every phase: when it fires it checks the deadline
        # of the phase the connection is in now, and re-arms if that is later.
        self._timer = None
        phase = self._phase
        if phase == _IDLE or self.transport.is_closing():
            return
        deadline = self._started + self._limit(phase)
        if deadline > self.loop.time():
            self._arm(deadline)
        elif phase == _FRESH:
            self.transport.close()
        elif phase == _HEAD:
            self._refuse(
                RequestTimeout(f"the request headers took longer than {self.header_timeout:g} s")
            )
        else:
            self._refuse(
                RequestTimeout(f"the request body took longer than {self.body_timeout:g} s")
            )

    def _refuse(self, error: RequestTimeout | HeadersTooLarge) -> None:
        """Answer ``error`` if nothing is answering this connection yet, and close it."""
        cycle = self.cycle
        if self._phase == _BODY:
            if cycle.response_complete and not self.transport.is_closing():
                # the app has answered without the rest of the body
                self._linger()
                return
            if cycle.response_started:
                # the app is answering: it owns the output; just end it
                self.transport.close()
                return
            # the app waits for this body: it sees a disconnect instead, and
            # anything it sends later is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        elif cycle is not None and not cycle.response_complete:
            # an earlier (pipelined) request is still being answered
            self.transport.close()
            return
        told = answer(error)
        body = told.body  # built on each read
        head = [STATUS_LINE[told.status]]
        head += [b"%s: %s\r\n" % pair for pair in self.server_state.default_headers]
        head += [_CLOSING_JSON % len(body), body]
        self.transport.write(b"".join(head))
        self._linger()

    def _linger(self) -> None:
        """Close after the answer without losing it: closing a socket with unread
        input resets the connection, which can destroy the answer before the
        client reads it. So send FIN, then read and drop what the client still
        sends for at most ``_LINGER_SECONDS``, as nginx does."""
        if self._lingering:
            return
        self._disarm()
        self._phase = _IDLE
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self._timer = self.loop.call_later(_LINGER_SECONDS, self.transport.close)


def _close_unless_open(transport: asyncio.Transport, protocol: asyncio.BaseProtocol) -> None:
    if not transport.is_closing() and not getattr(protocol, "handshake_complete", True):
        transport.close()


class _ResponseTransport(asyncio.Transport):
    """The transport as one request's cycle sees it. Its status line and
    headers wait for the body's first write, so that an answer leaves in one
    write (one syscall, not two); and ``close()`` while the request's body is
    still arriving (an early answer such as a 413) lingers, not resets."""

    __slots__ = ("_cycle", "_head", "_protocol", "_transport")

    def __init__(self, protocol: ReceiptDeadlines, cycle: RequestResponseCycle) -> None:
        super().__init__()
        self._protocol = protocol
        self._transport = protocol.transport
        self._cycle = cycle
        # None before the response starts; b"" once the head has gone out
        self._head: bytes | None = None if cycle.scope["method"] != "HEAD" else b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        head = self._head
        if head is None and self._cycle.response_started:
            self._head = bytes(data)  # the head: it goes out with the body's first write
        elif head:
            self._head = b""
            if len(data) <= ONE_WRITE:
                self._transport.write(head + data)
            else:  # a large body is not copied to save one syscall
                self._transport.write(head)
                self._transport.write(data)
        else:
            self._transport.write(data)  # a 100 Continue, or the rest of the body

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        if self._head:
            self.write(b"")
        if self._protocol._phase == _BODY and not self._transport.is_closing():
            self._protocol._linger()
        else:
            self._transport.close()
