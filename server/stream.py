"""One WebSocket stream: many infer requests on one connection.

Messages are taken while fewer than ``max_in_flight`` are unanswered: handed
over by carpool's stream protocol as it parses them (``frames.PUSH``), or
read from ``receive()`` under any other server and whenever the stream was
full. Each request is queued in the batcher without a task of its own (a
task per message was the stream's largest cost), and its future's
done-callback posts the answer; one writer sends the answers in the order
they finish, all that are waiting in one write with ``frames.SEND_MANY``
(``server/outbox.py``; ``server/frames.py`` has their format).

Backpressure: at most ``max_in_flight`` messages per connection are between
read and answered. At the cap the stream takes no more: the protocol queues
what it has parsed, stops reading its socket past a small read-ahead, and a
client that sends without reading fills its own buffers, never the
server's memory.

Draining (``drain``): stop reading, answer what was accepted within the
deadline (503 for what is still running then), close with 1001.
"""

from __future__ import annotations

import asyncio
import logging
import math
from functools import partial
from typing import Any

from batching import Cancelled, Completion, Pending
from server import frames
from server.asgi import Message, Receive, Send
from server.errors import BadRequest, NotFound, answer
from server.infer import Infer, Job
from server.kinds import Result
from server.metrics import Metrics
from server.models import ServedModel
from server.outbox import Outbox
from server.settings import Settings

logger = logging.getLogger("carpool.server")

GOING_AWAY = 1001
TOO_BIG = 1009
# After the drain deadline, how long the last answers and the close frame
# may take to reach a client before the connection is left to uvicorn.
_FLUSH_SECONDS = 1.0


class Stream:
    """One connection: a reader that takes messages while fewer than the cap
    are unanswered, a queued future per request whose done-callback posts its
    answer, and one writer that sends the answers in the order they finish.

    Every answer, result or error, holds its message's place under the cap
    until it has been sent, so what waits to go out is bounded too.
    """

    def __init__(
        self,
        name: str,
        model: ServedModel | None,
        missing: str,
        infer: Infer,
        metrics: Metrics,
        receive: Receive,
        send: Send,
        settings: Settings,
        send_many: bool = False,
        push: bool = False,
    ) -> None:
        self.name = name
        self.model = model
        self.missing = missing
        self.infer = infer
        self.metrics = metrics
        self.max_in_flight = settings.ws_max_in_flight
        self.max_message_bytes = settings.ws_max_message_bytes
        self.in_flight = 0  # messages read and not yet answered
        self.draining = False
        self.closed = asyncio.Event()
        self._receive = receive
        self._send = send
        self._push = push  # the protocol hands over messages as they arrive (frames.PUSH)
        self._serving = True  # False once serve() has ended: the sink takes nothing more
        # the requests queued in the batcher, by id
        self._pending: dict[str, Pending[Any, Result]] = {}
        self._outbox = Outbox(send, send_many, self._sent)
        self._room = asyncio.Event()  # in_flight is under the cap
        self._idle = asyncio.Event()  # in_flight is 0
        self._room.set()
        self._idle.set()
        self._reader: asyncio.Task[None] | None = None
        self._deadline = math.inf  # of the drain, on the loop's clock
        self._past_deadline = False

    @property
    def pending(self) -> int:
        """Requests submitted to the batcher and not yet finished."""
        return len(self._pending)

    # -- the connection's life ---------------------------------------------------

    async def serve(self) -> None:
        writer = asyncio.create_task(self._outbox.write())
        reader: asyncio.Task[None] | None = None
        try:
            if not self.draining:
                if self._push:
                    await self._send({"type": frames.PUSH, "sink": self._feed})
                reader = self._reader = asyncio.create_task(self._read())
                await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            if self.draining and not writer.done():
                await self._finish(writer)
            elif self._outbox.closing and not writer.done():
                await asyncio.wait((writer,), timeout=_FLUSH_SECONDS)
        finally:
            # The client left (or we are done): what is still queued is withdrawn
            # from the batcher before it is computed.
            self._serving = False
            self._withdraw_all()
            tasks: list[asyncio.Future[Any]] = [writer]
            if reader is not None:
                tasks.append(reader)
            for task in tasks:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, Exception) and not isinstance(outcome, OSError):
                    logger.error("stream %s: unexpected error", self.name, exc_info=outcome)

    async def drain(self, timeout: float | None) -> None:
        """Stop reading, answer what was accepted, close with 1001."""
        if not self.draining:
            self.draining = True
            if timeout is not None:
                self._deadline = asyncio.get_running_loop().time() + timeout
            if self._reader is not None:
                self._reader.cancel()
        await self.closed.wait()

    async def _finish(self, writer: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        if not self._idle.is_set():
            idle = asyncio.create_task(self._idle.wait())
            timeout = None if self._deadline == math.inf else self._deadline - loop.time()
            await asyncio.wait((idle, writer), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            await asyncio.gather(idle, return_exceptions=True)  # no task outlives its owner
        if writer.done():
            return  # the client went away
        if not self._idle.is_set():
            # Past the drain deadline: what is still running is answered 503.
            self._past_deadline = True
            self._withdraw_all()
            await asyncio.sleep(0)  # their done-callbacks post the 503s
        self._outbox.post_close(GOING_AWAY, "the server is shutting down")
        await asyncio.wait((writer,), timeout=max(self._deadline - loop.time(), _FLUSH_SECONDS))

    # -- reading -----------------------------------------------------------------

    async def _read(self) -> None:
        """Take messages from ``receive()``: every one without ``frames.PUSH``;
        with it, the ones the protocol queued while the stream was full (and
        the disconnect)."""
        receive = self._receive
        cap = self.max_in_flight
        while True:
            if self.in_flight >= cap:
                self._room.clear()
                await self._room.wait()
            message = await receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            if self.in_flight >= cap:  # filled by pushed messages while this one waited
                self._room.clear()
                await self._room.wait()
            if not self._take(message):
                return

    def _feed(self, data: bytes, binary: bool) -> bool:
        """``frames.PUSH``'s sink: take a message as the protocol parses it,
        unless the stream is full, draining or closing (False: the protocol
        queues it, and the reader takes it when there is room)."""
        if (
            self.in_flight >= self.max_in_flight
            or self.draining
            or self._outbox.closing
            or not self._serving
        ):
            return False
        self._take_frame(data, binary)
        return True

    def _take(self, message: Message) -> bool:
        """Accept one ASGI message: see ``_take_frame``."""
        text: str | None = message.get("text")
        if text is not None:
            return self._take_frame(text.encode(), False)
        return self._take_frame(message.get("bytes") or b"", True)

    def _take_frame(self, frame: bytes, binary: bool) -> bool:
        """Accept one message: answer it at once if it is bad, else submit it.
        False when the connection must close."""
        if len(frame) > self.max_message_bytes:
            # uvicorn's websockets implementations enforce ws_max_size first;
            # this holds under any other.
            self._outbox.post_close(TOO_BIG, f"a message is over {self.max_message_bytes} bytes")
            return False
        self.in_flight += 1
        self._idle.clear()
        request_id: str | None = None
        infer = self.infer
        try:
            model = self.model
            if model is None:
                raise NotFound(self.missing)
            body, header_length = frames.body_of(frame, binary)
            request = infer.decode(model, body, header_length)
            request_id = request.id
            if request_id is None:
                raise BadRequest('a stream message needs an "id": its answer carries the same id')
            if request_id in self._pending:
                raise BadRequest(f"id {request_id!r} is already in flight on this stream")
            if binary and "binary_data_output" not in request.parameters:
                # binary in, binary out, unless the message asks otherwise
                request.binary_outputs = request.binary_outputs or frozenset(
                    spec.name for spec in request.outputs
                )
            job = infer.prepare(model, request, None)
            pending = infer.enqueue(job)
        except Exception as exc:
            self._post_error(
                exc, request_id if request_id is not None else frames.id_of(frame, binary)
            )
            return True
        self._pending[request_id] = pending
        pending.future.add_done_callback(partial(self._answer, request_id, job, binary))
        return True

    def _withdraw_all(self) -> None:
        """Stop waiting for every queued request: what has not reached a
        batch is never computed; each one's done-callback still runs."""
        if self.model is not None:
            for pending in list(self._pending.values()):
                self.model.batcher.withdraw(pending)

    # -- answering ---------------------------------------------------------------

    def _answer(
        self, request_id: str, job: Job, binary: bool, task: asyncio.Future[Completion[Result]]
    ) -> None:
        """The done-callback of every queued request: post its answer."""
        self._pending.pop(request_id, None)
        if task.cancelled():
            if self._past_deadline:
                self._post_error(
                    Cancelled("the server shut down before this request finished"), request_id
                )
            else:
                self.metrics.count(self.name, "cancelled")
            return
        error = task.exception()
        if error is not None:
            self._post_error(error, request_id)
            return
        completion = task.result()
        try:
            payload, header_length = self.infer.encode(job, completion)
        except Exception as exc:
            self._post_error(exc, request_id)
            return
        self._outbox.post(frames.result(payload, header_length, completion, binary))
        self.metrics.count(self.name, "ok")

    def _post_error(self, exc: BaseException, request_id: str | None) -> None:
        told = answer(exc)
        if self.model is not None:
            self.metrics.count(self.name, told.reason)
        self._outbox.post(frames.text(told.frame(request_id)))

    def _sent(self, count: int) -> None:
        """``count`` answers have left: their places under the cap are free."""
        self.in_flight -= count
        if self.in_flight < self.max_in_flight:
            self._room.set()
        if self.in_flight == 0:
            self._idle.set()
