"""carpool's HTTP protocol: uvicorn's httptools protocol with the receipt
deadlines (``receipt.py``), plus the hand-over of plain infer requests to
the direct lane (``server/direct.py``: no ASGI scope, task or cycle for
them, and answers in one write), in-order answers to pipelined requests
across both lanes, and one keep-alive timer per connection instead of one
per answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from server.direct import DirectLane, DirectRequest
from server.uvicorn_internals.receipt import (
    _BODY,
    _HEAD,
    _IDLE,
    ONE_WRITE,
    ReceiptDeadlines,
    _ResponseTransport,
)

_PIPELINE_DEPTH = 8  # whole pipelined requests read ahead; past it, reading pauses
_defaults: list[Any] = [None, b""]  # uvicorn's default headers (a new list each second), joined


class DeadlineProtocol(ReceiptDeadlines):
    """The receipt deadlines, the direct lane, pipelining and keep-alive."""

    lane: DirectLane | None = None  # carpool's infer route, answered here (server/direct.py)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # keep-alive: one timer checks _idle_since (_keep_alive_check), not one per answer
        self._keep_alive: asyncio.TimerHandle | None = None
        # requests still being answered when a pipelined one arrived behind them
        self._ahead: list[RequestResponseCycle] = []

    def connection_lost(self, exc: Exception | None) -> None:
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
        if len(body) <= ONE_WRITE:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        if not request.keep_alive:
            transport.close()
        self.on_response_complete()
