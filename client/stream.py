"""One WebSocket to one model: many requests in flight, answers by id.

``Stream.submit`` sends a request and returns a future for its outputs; one
receiver task reads every answer and resolves the future with the same id,
so sending never waits for reading and answers may come in any order.
``Stream.map`` runs an iterable of inputs with a window of requests in
flight and yields their outputs in input order. Get a stream from
``AsyncClient.connect(model)``, or use ``AsyncClient.stream(model, inputs)``.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from itertools import count
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from client.errors import ClientError, InferenceError, StreamClosed
from client.tensors import Spec, decode, encode

_HEADER = struct.Struct("<I")
Outputs = dict[str, Any]


class Stream:
    """Requests to one model over one WebSocket. Close it with ``aclose()``
    (``AsyncClient.connect`` does): requests still in flight are abandoned."""

    def __init__(self, websocket: ClientConnection, specs: list[Spec], *, binary: bool = True):
        self.websocket = websocket
        self.specs = specs
        self.binary = binary
        self._ids = count()
        self._waiting: dict[str, tuple[asyncio.Future[Outputs], bool]] = {}
        self._closed: StreamClosed | None = None
        self._receiver = asyncio.create_task(self._receive())

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._waiting)

    async def submit(
        self, inputs: Any, *, id: str | None = None, outputs: Sequence[str] | None = None
    ) -> asyncio.Future[Outputs]:
        """Send one request; its future gives the outputs by name, or raises
        ``InferenceError`` (or ``StreamClosed``)."""
        if self._closed is not None:
            raise self._closed
        encoded = encode(self.specs, inputs, binary=self.binary)
        request_id = id if id is not None else str(next(self._ids))
        if request_id in self._waiting:
            raise ValueError(f"id {request_id!r} is already in flight")
        doc: dict[str, Any] = {"id": request_id, "inputs": encoded.inputs}
        if outputs is not None:
            doc["outputs"] = [{"name": name} for name in outputs]
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (future, encoded.single)
        try:
            if encoded.chunks:  # binary tensors: a binary frame, answered with one
                header = orjson.dumps(doc)
                await self.websocket.send(
                    b"".join((_HEADER.pack(len(header)), header, *encoded.chunks))
                )
            else:
                await self.websocket.send(orjson.dumps(doc).decode())
        except ConnectionClosed:
            self._waiting.pop(request_id, None)
            if not future.cancel():  # the receiver failed it already: nobody will await it
                future.exception()
            await asyncio.shield(self._receiver)  # it records why the stream closed
            raise self._closed or StreamClosed(None, "") from None
        return future

    async def infer(
        self, inputs: Any, *, id: str | None = None, outputs: Sequence[str] | None = None
    ) -> Outputs:
        """Send one request and wait for its outputs."""
        return await (await self.submit(inputs, id=id, outputs=outputs))

    async def map(
        self, inputs: Iterable[Any] | AsyncIterable[Any], *, window: int = 64
    ) -> AsyncIterator[Outputs]:
        """Outputs for every input, in input order, with up to ``window``
        requests sent ahead of the one yielded next."""
        if window < 1:
            raise ValueError("window must be at least 1")
        ahead: deque[asyncio.Future[Outputs]] = deque()
        try:
            async for item in _each(inputs):
                ahead.append(await self.submit(item))
                if len(ahead) >= window:
                    yield await ahead.popleft()
            while ahead:
                yield await ahead.popleft()
        finally:
            for future in ahead:  # left behind by an error or a break
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: no "never retrieved" noise

    async def aclose(self) -> None:
        """Close the WebSocket (1000) and stop the receiver."""
        await self.websocket.close()
        await self._receiver

    async def _receive(self) -> None:
        error: ClientError | None = None
        try:
            async for message in self.websocket:
                error = self._deliver(message)
                if error is not None:
                    await self.websocket.close(1002, "an answer carries no id of ours")
                    break
        except ConnectionClosed:
            pass
        finally:
            self._closed = StreamClosed(
                self.websocket.close_code, self.websocket.close_reason or ""
            )
            for future, _ in self._waiting.values():
                if not future.done():
                    future.set_exception(error or self._closed)
            self._waiting.clear()

    def _deliver(self, message: str | bytes) -> ClientError | None:
        raw: memoryview | None = None
        if isinstance(message, str):
            doc = orjson.loads(message)
        else:
            (length,) = _HEADER.unpack_from(message)
            doc = orjson.loads(memoryview(message)[_HEADER.size : _HEADER.size + length])
            raw = memoryview(message)[_HEADER.size + length :]
        request_id = doc.get("id")
        waiting = self._waiting.pop(request_id, None) if type(request_id) is str else None
        if waiting is None:
            # Our messages always carry a fresh id: this is a protocol error.
            return InferenceError(
                int(doc.get("status", 500)), str(doc.get("error", "an answer with no id of ours"))
            )
        future, single = waiting
        if future.done():
            return None  # its caller gave up on it
        if "error" in doc:
            future.set_exception(
                InferenceError(
                    int(doc["status"]),
                    str(doc["error"]),
                    reason=doc.get("reason"),
                    retry_after=doc.get("retry_after"),
                    id=request_id,
                )
            )
            return None
        try:
            future.set_result(decode(doc, raw, single))
        except (ValueError, KeyError, TypeError) as exc:
            future.set_exception(exc)
        return None


async def _each(inputs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(inputs, AsyncIterable):
        async for item in inputs:
            yield item
    else:
        for item in inputs:
            yield item
