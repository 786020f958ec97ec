"""uvicorn's httptools protocol with deadlines for receiving a request.

uvicorn has no request-receipt timeout: a client that sends its headers (or
its body) one byte a second holds a connection, and a slot of memory, for as
long as it likes (slowloris; uvicorn issue #157), and httptools accepts
headers of any size. This protocol adds, per connection:

- a header deadline: from a connection's opening, or a request's first byte,
  to its last header (``header_timeout``);
- a body deadline: from the last header to the body's last byte
  (``body_timeout``);
- a cap on the bytes of an unfinished head (request line and headers).

On expiry the client gets ``408`` (``431`` for the cap) with ``Connection:
close`` where nothing has been answered yet, and the connection is closed
either way (after a short linger that lets the client read the answer); a
connection that never sent a byte is just closed. One timer per connection
checks the deadlines; it is armed when the connection opens and re-armed only
when a read leaves a request unfinished, so a request that arrives in one
read costs two clock reads. A WebSocket handshake gets the header deadline
too. ``server/limits.py`` applies the exact header limit (431) once headers
are complete.

Use it as uvicorn's ``http=`` implementation: ``http=http_protocol(settings)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from server.settings import Settings

# the phases of a connection's current request
_IDLE = 0  # between requests (uvicorn's keep-alive timeout applies)
_FRESH = 1  # connection opened, no byte yet
_HEAD = 2  # request line and headers arriving
_BODY = 3  # body arriving

# room for the request line and the header framing ("name: value\r\n") on top
# of the names and values that server/limits.py counts
_HEAD_SLACK = 8 * 1024
_DEFAULTS = Settings()
_LINGER_SECONDS = 2.0


class DeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header and body deadlines and a head-size cap."""

    header_timeout: float = _DEFAULTS.header_timeout
    body_timeout: float = _DEFAULTS.body_timeout
    max_head_bytes: int = 2 * _DEFAULTS.max_header_bytes + _HEAD_SLACK

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._started = 0.0
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._lingering = False
        # requests still being answered when a pipelined one arrived behind them
        self._ahead: list[RequestResponseCycle] = []

    # -- connection ---------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = _FRESH
        self._started = self.loop.time()
        self._arm(self._started + self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        # uvicorn tells only the newest request (``self.cycle``) that the
        # client left; one ahead of a pipelined request would go on to write
        # its answer into the closed transport (an error in the log instead
        # of a cancellation; found by killing clients, tests/test_cancellation.py)
        for cycle in self._ahead:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._ahead.clear()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        super().data_received(data)
        phase = self._phase
        if phase == _IDLE:
            if self.timeout_keep_alive_task is not None or self.transport.is_closing():
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
                self._refuse(431, f"the request head is over {self.max_head_bytes} bytes")
                return
        elif phase == _BODY and self.cycle.transport is self.transport:
            # the app may answer before the body is in: make its close linger
            self.cycle.transport = _LingeringClose(self)
        deadline = self._started + self._limit(phase)
        if self._timer is None or deadline < self._timer_at:
            self._disarm()
            self._arm(deadline)

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes the transport over from here. It gets
        # the same header deadline for its handshake: uvicorn's
        # websockets-sansio protocol never answers (nor closes) a handshake
        # that websockets cannot parse, such as a POST with a body.
        self._disarm()
        self._phase = _IDLE
        transport = self.transport
        super().handle_websocket_upgrade()
        self.loop.call_later(
            self.header_timeout, _close_unless_open, transport, transport.get_protocol()
        )

    # -- parser callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEAD
        self._started = self.loop.time()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        ahead = self.cycle
        super().on_headers_complete()
        if ahead is not None and ahead is not self.cycle and not ahead.response_complete:
            self._ahead = [c for c in self._ahead if not c.response_complete]
            self._ahead.append(ahead)
        self._phase = _BODY
        self._started = self.loop.time()

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        super().on_message_complete()

    # -- deadlines ----------------------------------------------------------

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
            self._refuse(408, f"the request headers took longer than {self.header_timeout:g} s")
        else:
            self._refuse(408, f"the request body took longer than {self.body_timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` if nothing is answering this connection yet, and close it."""
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
        body = orjson.dumps(
            {"error": message, "reason": "timeout" if status == 408 else "too_large"}
        )
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self._linger()

    def _linger(self) -> None:
        """Close after the answer, without losing it.

        Closing a socket with unread input makes the kernel reset the
        connection, and a reset can destroy the answer before the client
        reads it. So: send FIN after the answer, then read and drop what the
        client still sends, for at most ``_LINGER_SECONDS``, as nginx does.
        """
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


class _LingeringClose(asyncio.Transport):
    """The transport as a request's cycle sees it while the request's body is
    still arriving: ``close()`` (an answer with ``Connection: close`` before
    the body was read, such as a 413) lingers instead of resetting."""

    def __init__(self, protocol: DeadlineProtocol) -> None:
        super().__init__()
        self._protocol = protocol
        self._transport = protocol.transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        if self._protocol._phase == _BODY and not self._transport.is_closing():
            self._protocol._linger()
        else:
            self._transport.close()


def http_protocol(settings: Settings) -> type[DeadlineProtocol]:
    """The protocol class for uvicorn's ``http=``, with ``settings``' limits."""
    return type(
        "CarpoolHttpProtocol",
        (DeadlineProtocol,),
        {
            "header_timeout": settings.header_timeout,
            "body_timeout": settings.body_timeout,
            "max_head_bytes": 2 * settings.max_header_bytes + _HEAD_SLACK,
        },
    )
