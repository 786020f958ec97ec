"""WebSocket streaming: ``WS /v2/models/{name}[/versions/{v}]/stream``.

One connection carries many infer requests. Each client message is one v2
infer request with an ``id``: a text frame holds its JSON body; a binary
frame holds the binary tensor extension's body (JSON header, then raw
little-endian tensors) behind a 4-byte little-endian length of the header.
Each message is validated like an HTTP body, split into items and submitted
to the model's batcher, where its items ride in the same batches as HTTP
traffic. Answers go out as each finishes, in any order, with the request's
``id``: a text frame for a text request, a binary frame in the same layout
for a binary one (``binary_data_output`` defaults to true there). An error
is a text frame ``{"id", "error", "status", "reason"}`` with the HTTP status
the same fault would get; the connection stays open.

Backpressure: at most ``max_in_flight`` messages per connection are between
read and answered. At the cap the connection stops calling ``receive()``,
uvicorn stops reading its socket, and a client that sends without reading
fills its own buffers, never the server's memory.

Shutdown: ``StreamRegistry.drain`` (``server/lifecycle.py`` calls it before
uvicorn's own shutdown, which would fail open WebSockets with 1012) stops
reading every stream, answers what each has accepted, and closes it with
1001; new streams are refused with HTTP 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Iterator
from functools import partial
from typing import Any

import orjson
from starlette.routing import BaseRoute, WebSocketRoute

from batching import Cancelled, Completion
from server.asgi import Message, Receive, Scope, Send
from server.codec import InferRequest, decode_request, encode_response, queue_timeout
from server.errors import BadRequest, NotFound, http_error
from server.kinds import Result
from server.limits import refuse
from server.metrics import Metrics
from server.models import ModelSet, ServedModel
from server.settings import Settings
from server.v2 import check_items, unknown_model

logger = logging.getLogger("carpool.server")

GOING_AWAY = 1001
TOO_BIG = 1009
# After the drain deadline, how long the last answers and the close frame
# may take to reach a client before the connection is left to uvicorn.
_FLUSH_SECONDS = 1.0
_HEADER = struct.Struct("<I")
_SHUTTING_DOWN = orjson.dumps(
    {"error": "the server is shutting down; connect to another replica", "reason": "shutting_down"}
)


def routes(
    models: ModelSet, metrics: Metrics, registry: StreamRegistry, settings: Settings
) -> list[BaseRoute]:
    endpoint = StreamEndpoint(models, metrics, registry, settings)
    return [
        WebSocketRoute("/v2/models/{name}/stream", endpoint),
        WebSocketRoute("/v2/models/{name}/versions/{version}/stream", endpoint),
    ]


class StreamRegistry:
    """The open streams, so that shutdown can drain them."""

    def __init__(self) -> None:
        self.draining = False
        self._streams: set[Stream] = set()

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams))

    def add(self, stream: Stream) -> None:
        self._streams.add(stream)

    def discard(self, stream: Stream) -> None:
        self._streams.discard(stream)

    def begin_drain(self) -> None:
        """Nothing yet: streams are served as usual through the drain delay."""

    async def drain(self, timeout: float | None) -> None:
        """Refuse new streams; stop reading every open one, answer what each
        has accepted within ``timeout`` seconds (503 for the rest), close
        each with 1001."""
        self.draining = True
        streams = list(self._streams)
        if streams:
            logger.info("draining %d WebSocket stream(s)", len(streams))
            await asyncio.gather(*(stream.drain(timeout) for stream in streams))


class StreamEndpoint:
    """The WebSocket route, as raw ASGI."""

    def __init__(
        self,
        models: ModelSet,
        metrics: Metrics,
        registry: StreamRegistry,
        settings: Settings,
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.registry = registry
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if self.registry.draining:
            await refuse(scope, send, 503, _SHUTTING_DOWN, ((b"retry-after", b"1"),))
            return
        params = scope["path_params"]
        name: str = params["name"]
        model = self.models.get(name)
        missing = ""
        if model is None or params.get("version", model.config.version) != model.config.version:
            # Told per message, like the HTTP route: a client sees a 404 for each request.
            missing = unknown_model(self.models, name, params.get("version"))
            model = None
        stream = Stream(
            name,
            model,
            missing,
            self.metrics,
            receive,
            send,
            self.settings,
        )
        self.registry.add(stream)  # before the first await: a drain from now on sees it
        try:
            await send({"type": "websocket.accept"})
            await stream.serve()
        finally:
            self.registry.discard(stream)
            stream.closed.set()


class Stream:
    """One connection: a reader that takes messages while fewer than the cap
    are unanswered, a submit task per request whose done-callback posts its
    answer, and one writer that sends the answers in the order they finish.

    Every answer, result or error, holds its message's place under the cap
    until it has been sent, so what waits to go out is bounded too.
    """

    def __init__(
        self,
        name: str,
        model: ServedModel | None,
        missing: str,
        metrics: Metrics,
        receive: Receive,
        send: Send,
        settings: Settings,
    ) -> None:
        self.name = name
        self.model = model
        self.missing = missing
        self.metrics = metrics
        self.max_in_flight = settings.ws_max_in_flight
        self.max_message_bytes = settings.ws_max_message_bytes
        self.max_items = settings.max_items_per_request
        self.in_flight = 0  # messages read and not yet answered
        self.draining = False
        self.closed = asyncio.Event()
        self._receive = receive
        self._send = send
        self._tasks: dict[str, asyncio.Task[Completion[Result]]] = {}
        self._outbox: deque[Message] = deque()
        self._wake = asyncio.Event()  # the outbox has something
        self._room = asyncio.Event()  # in_flight is under the cap
        self._idle = asyncio.Event()  # in_flight is 0
        self._room.set()
        self._idle.set()
        self._reader: asyncio.Task[None] | None = None
        self._deadline = math.inf  # of the drain, on the loop's clock
        self._closing = False  # a close frame is in the outbox
        self._past_deadline = False

    @property
    def pending(self) -> int:
        """Requests submitted to the batcher and not yet finished."""
        return len(self._tasks)

    # -- the connection's life ---------------------------------------------------

    async def serve(self) -> None:
        writer = asyncio.create_task(self._write())
        reader: asyncio.Task[None] | None = None
        try:
            if not self.draining:
                reader = self._reader = asyncio.create_task(self._read())
                await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            if self.draining and not writer.done():
                await self._finish(writer)
            elif self._closing and not writer.done():
                await asyncio.wait((writer,), timeout=_FLUSH_SECONDS)
        finally:
            # The client left (or we are done): what is still queued is withdrawn
            # from the batcher before it is computed.
            tasks: list[asyncio.Future[Any]] = [*self._tasks.values(), writer]
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
        if writer.done():
            return  # the client went away
        if not self._idle.is_set():
            # Past the drain deadline: what is still running is answered 503.
            self._past_deadline = True
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._post_close(GOING_AWAY, "the server is shutting down")
        await asyncio.wait((writer,), timeout=max(self._deadline - loop.time(), _FLUSH_SECONDS))

    # -- reading -----------------------------------------------------------------

    async def _read(self) -> None:
        receive = self._receive
        cap = self.max_in_flight
        while True:
            if self.in_flight >= cap:
                self._room.clear()
                await self._room.wait()
            message = await receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            if not self._take(message):
                return

    def _take(self, message: Message) -> bool:
        """Accept one message: answer it at once if it is bad, else submit it.
        False when the connection must close."""
        text: str | None = message.get("text")
        frame: bytes = text.encode() if text is not None else message.get("bytes") or b""
        if len(frame) > self.max_message_bytes:
            # uvicorn's websockets implementations enforce ws_max_size first;
            # this holds under any other.
            self._post_close(TOO_BIG, f"a message is over {self.max_message_bytes} bytes")
            return False
        self.in_flight += 1
        self._idle.clear()
        binary = text is None
        request_id: str | None = None
        try:
            model = self.model
            if model is None:
                raise NotFound(self.missing)
            body, header_length = frame, None
            if binary:
                if len(frame) < _HEADER.size:
                    raise BadRequest(
                        "a binary message starts with the 4-byte little-endian length of its JSON header"
                    )
                (header_length,) = _HEADER.unpack_from(frame)
                body = frame[_HEADER.size :]
            request = decode_request(body, model.config, header_length)
            request_id = request.id
            check_items(request.count, self.max_items, model)
            if request_id is None:
                raise BadRequest('a stream message needs an "id": its answer carries the same id')
            if request_id in self._tasks:
                raise BadRequest(f"id {request_id!r} is already in flight on this stream")
            if binary and "binary_data_output" not in request.parameters:
                # binary in, binary out, unless the message asks otherwise
                request.binary_outputs = request.binary_outputs or frozenset(
                    spec.name for spec in request.outputs
                )
            items = model.kind.split(request)
            seconds = queue_timeout(model.config, request.parameters, None)
        except Exception as exc:
            self._post_error(exc, request_id if request_id is not None else _id_of(frame, binary))
            return True
        task = asyncio.create_task(model.batcher.submit_many(items, time.monotonic() + seconds))
        self._tasks[request_id] = task
        task.add_done_callback(partial(self._answer, model, request_id, request, binary))
        return True

    # -- answering ---------------------------------------------------------------

    def _answer(
        self,
        model: ServedModel,
        request_id: str,
        request: InferRequest,
        binary: bool,
        task: asyncio.Task[Completion[Result]],
    ) -> None:
        """The done-callback of every submit task: post its answer."""
        self._tasks.pop(request_id, None)
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
            self._post_error(error, request.id)
            return
        completion = task.result()
        try:
            payload, header_length = encode_response(model.config, request, completion.results)
        except Exception as exc:
            self._post_error(exc, request.id)
            return
        # The timings the HTTP route sends as x-carpool-* headers, as the
        # answer's v2 "parameters"; orjson's object ends with its "}".
        timings = b',"parameters":{"queue_ms":%.3f,"compute_ms":%.3f,"batch_size":%d}}' % (
            completion.queue_seconds * 1000,
            completion.compute_seconds * 1000,
            completion.batch_size,
        )
        if binary:
            end = len(payload) if header_length is None else header_length
            header = payload[: end - 1] + timings
            frame = b"".join((_HEADER.pack(len(header)), header, payload[end:]))
            self._post({"type": "websocket.send", "bytes": frame})
        else:
            self._post({"type": "websocket.send", "text": (payload[:-1] + timings).decode()})
        self.metrics.count(self.name, "ok")

    def _post_error(self, exc: BaseException, request_id: str | None) -> None:
        error = http_error(exc)
        if self.model is not None:
            self.metrics.count(self.name, error.reason)
        doc: dict[str, Any] = {
            "id": request_id,
            "error": orjson.loads(error.body)["error"],
            "status": error.status,
            "reason": error.reason,
        }
        if error.error_id is not None:
            doc["error_id"] = error.error_id
        for key, value in error.headers:
            if key == b"retry-after":
                doc["retry_after"] = int(value)
        self._post({"type": "websocket.send", "text": orjson.dumps(doc).decode()})

    def _post(self, message: Message) -> None:
        self._outbox.append(message)
        self._wake.set()

    def _post_close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self._post({"type": "websocket.close", "code": code, "reason": reason})

    async def _write(self) -> None:
        outbox = self._outbox
        send = self._send
        cap = self.max_in_flight
        while True:
            if not outbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            message = outbox.popleft()
            try:
                await send(message)
            except RuntimeError as exc:
                # uvicorn refuses to send once the protocol has closed the
                # connection itself (a 1009, say) and before it reports the loss
                raise ConnectionError(f"the connection is closed: {exc}") from exc
            if message["type"] == "websocket.close":
                return
            self.in_flight -= 1
            if self.in_flight < cap:
                self._room.set()
            if self.in_flight == 0:
                self._idle.set()


def _id_of(frame: bytes, binary: bool) -> str | None:
    """The id of a message that failed validation, when it can be read."""
    try:
        if binary:
            (length,) = _HEADER.unpack_from(frame)
            frame = frame[_HEADER.size : _HEADER.size + length]
        doc = orjson.loads(frame)
    except (struct.error, orjson.JSONDecodeError):
        return None
    value = doc.get("id") if type(doc) is dict else None
    return value if type(value) is str else None
