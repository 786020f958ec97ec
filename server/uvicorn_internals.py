"""Every place carpool relies on uvicorn's internals, and nothing else.

Written against uvicorn 0.54 (pinned to <0.55 in pyproject.toml): read it
again before moving the pin. ``DeadlineProtocol`` is uvicorn's httptools
protocol with what uvicorn lacks: deadlines for receiving a request
(slowloris, uvicorn #157: ``header_timeout`` to the last header,
``body_timeout`` to the body's last byte; 408, or 431 past a cap on an
unfinished head, then a lingering close), answers that leave in one write,
the hand-over of plain infer requests to the direct lane (``server/direct.py``:
no ASGI scope, task or cycle for them), and one keep-alive timer per
connection instead of one per answer. ``server/limits.py`` applies the exact
header limit (431) on the ASGI way. ``Server`` is uvicorn's, with carpool's
drain (``server/lifecycle.py``) first and the GC settings for serving. The
WebSocket protocol's changes are in ``server/stream_protocol.py``.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from server.direct import DirectLane, DirectRequest
from server.errors import HeadersTooLarge, RequestTimeout, answer
from server.lifecycle import Lifecycle
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
YOUNG_GC_THRESHOLD = 50_000  # gc.set_threshold's first value once serving (Python's: 700)
_LINGER_SECONDS = 2.0
_PIPELINE_DEPTH = 8  # whole pipelined requests read ahead; past it, reading pauses
_ONE_WRITE = 64 * 1024  # a body up to this size is joined to its head for one write
_defaults: list[Any] = [None, b""]  # uvicorn's default headers (a new list each second), joined
_CLOSING_JSON = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"


class DeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header and body deadlines and a head-size cap."""

    header_timeout: float = _DEFAULTS.header_timeout
    body_timeout: float = _DEFAULTS.body_timeout
    max_head_bytes: int = 2 * _DEFAULTS.max_header_bytes + HEAD_SLACK
    lane: DirectLane | None = None  # carpool's infer route, answered here (server/direct.py)

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
        # connection; one timer checks it (_keep_alive_check), not one per answer
        self._idle_since: float | None = None
        self._keep_alive: asyncio.TimerHandle | None = None
        # requests still being answered when a pipelined one arrived behind them
        self._ahead: list[RequestResponseCycle] = []

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase = _FRESH
        self._started = self.loop.time()
        self._arm(self._started + self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._idle_since = None
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            self._keep_alive = None
        # uvicorn tells only the newest request (``self.cycle``) that the client
        # left; one ahead of a pipelined request would write its answer into the
        # closed transport and log an error (found by killing clients, R7)
        for cycle in self._ahead:
            if isinstance(cycle, DirectRequest):
                cycle.lose()
            elif not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._ahead.clear()
        # a direct request withdraws its queued items: nobody is left to answer
        for waiting, _ in self.pipeline:
            if isinstance(waiting, DirectRequest):
                waiting.lose()
        if isinstance(self.cycle, DirectRequest):
            self.cycle.lose()
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

    def on_message_begin(self) -> None:
        # uvicorn's on_message_begin also builds the request's ASGI scope; a
        # request that takes the direct lane never needs one, so it is built
        # at the last header, and only for the ASGI way (_build_scope)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._phase = _HEAD
        self._started = self.loop.time()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        ahead = self.cycle
        lane = self.lane
        if lane is not None:
            parser = self.parser
            limit = self.limit_concurrency
            if not parser.should_upgrade() and (limit is None or len(self.connections) < limit):
                keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
                direct = lane.take(self, parser.get_method(), self.url, self.headers, keep_alive)
                if direct is not None:
                    self._start_direct(direct, ahead)
                    return
        self._build_scope()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is ahead or cycle is None:
            return  # a WebSocket upgrade: its protocol has the transport now
        cycle.transport = _ResponseTransport(self, cycle)
        if ahead is not None and not ahead.response_complete:
            self._ahead = [c for c in self._ahead if not c.response_complete]
            self._ahead.append(ahead)
        self._phase = _BODY
        self._started = self.loop.time()

    # -- keep-alive --------------------------------------------------------------

    def on_response_complete(self) -> None:
        # uvicorn's, but for the keep-alive timeout: uvicorn arms a timer after
        # every answer and cancels it when the next request's bytes arrive; here
        # the answer notes the time, and one timer per connection checks it
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        since = self._idle_since = self.loop.time()
        if self._keep_alive is None:
            self._keep_alive = self.loop.call_at(
                since + self.timeout_keep_alive, self._keep_alive_check
            )

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None  # bytes arrived: the connection is not idle

    def _keep_alive_check(self) -> None:
        self._keep_alive = None
        since = self._idle_since
        if since is None or self.transport.is_closing():
            return  # busy now: the next answer arms the check again
        deadline = since + self.timeout_keep_alive
        if deadline <= self.loop.time():
            self.timeout_keep_alive_handler()
        else:
            self._keep_alive = self.loop.call_at(deadline, self._keep_alive_check)

    def _build_scope(self) -> None:
        """uvicorn's scope for the request whose head was just parsed."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()  # builds the scope, and starts url and headers afresh
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if isinstance(cycle, DirectRequest):
            if not cycle.response_complete:
                cycle.add_body(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        cycle = self.cycle
        if isinstance(cycle, DirectRequest):
            cycle.body_complete()
            if not cycle.started and len(self.pipeline) < _PIPELINE_DEPTH:
                # Whole, and waiting its turn behind a request in flight: read on
                # (it paused), or a client that leaves is never seen and the
                # request ahead is computed for nobody.
                self.flow.resume_reading()
            return
        super().on_message_complete()

    # -- the direct lane ---------------------------------------------------------

    def _start_direct(self, direct: DirectRequest, ahead: RequestResponseCycle | None) -> None:
        self.cycle = direct  # type: ignore[assignment]
        self._phase = _BODY
        self._started = self.loop.time()
        if ahead is not None and not ahead.response_complete:
            # pipelined behind a request still being answered: it waits its turn
            self._ahead = [c for c in self._ahead if not c.response_complete]
            self._ahead.append(ahead)
            self.flow.pause_reading()
            self.pipeline.appendleft((direct, self.app))  # type: ignore[arg-type]
        else:
            direct.begin()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if isinstance(cycle, DirectRequest):
            cycle.begin()  # its turn, after the pipelined requests ahead of it
        else:
            super()._start_asgi_task(cycle, app)

    def finish_direct(self, request: DirectRequest, status: int, head: bytes, body: bytes) -> None:
        """Answer a direct request in one write, then start the next pipelined one."""
        transport = self.transport
        if transport.is_closing():
            return
        defaults = self.server_state.default_headers
        if defaults is not _defaults[0]:
            _defaults[:] = [defaults, b"".join([b"%s: %s\r\n" % pair for pair in defaults])]
        ending = b"\r\n" if request.keep_alive else b"connection: close\r\n\r\n"
        head = b"".join((STATUS_LINE[status], _defaults[1], head, ending))
        if len(body) <= _ONE_WRITE:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        if not request.keep_alive:
            transport.close()
        self.on_response_complete()

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

    def __init__(self, protocol: DeadlineProtocol, cycle: RequestResponseCycle) -> None:
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
            if len(data) <= _ONE_WRITE:
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


class Server(uvicorn.Server):
    """uvicorn's server, with carpool's drain in front of its shutdown."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, freeze_heap: bool = False):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.freeze_heap = freeze_heap

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the lifespan has loaded the models by now
        if self.freeze_heap:
            # What start-up built (torch, the models: ~230k objects) lives as long as
            # the process: frozen, full collections (which connection churn triggers)
            # never walk it again (~150 ms each otherwise, bench/slowloris.py).
            gc.collect()
            gc.freeze()
            # A young collection runs whenever tracked objects outnumber the freed
            # ones by the threshold: the objects of in-flight requests do, so at 700
            # collections grow with load (17 us per request at 1,000 connections,
            # measured in-process; 1.4 us at 128). Requests free their own objects
            # (no cycles), so a high threshold costs little memory.
            gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has shut down, so the process
        # dies by SIGTERM; after a completed drain orchestrators expect status 0.
        self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifecycle.shutdown()  # carpool's drain, while connections are open
        await super().shutdown(sockets)  # then uvicorn's: listeners, connections, lifespan
