"""WebSocket streaming: ``WS /v2/models/{name}[/versions/{v}]/stream``.

One connection carries many infer requests, each tagged with an ``id``
(``server/frames.py`` has the message format). Each message runs the same
infer transaction as an HTTP body (``server/infer.py``); its items ride in
the same batches as HTTP traffic, and answers go out as each finishes, in
any order. A bad message gets an error message with its id and the
connection stays open. ``server/stream.py`` serves one connection.

Shutdown: the server's drain (``server/lifecycle.py``, which runs before
uvicorn's own shutdown would fail open WebSockets with 1012) has this
registry refuse new streams with HTTP 503, then drain every open one: stop
reading, answer what each has accepted, close with 1001.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from starlette.routing import BaseRoute, WebSocketRoute

from batching import Closed
from server import frames
from server.asgi import Receive, Scope, Send, refuse
from server.errors import NotFound
from server.infer import Infer
from server.metrics import Metrics
from server.models import ServedModel
from server.settings import Settings
from server.stream import Stream

logger = logging.getLogger("carpool.server")


def routes(
    infer: Infer, metrics: Metrics, registry: StreamRegistry, settings: Settings
) -> list[BaseRoute]:
    endpoint = StreamEndpoint(infer, metrics, registry, settings)
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

    def stop_accepting(self) -> None:
        """Refuse new streams (HTTP 503) from now on."""
        self.draining = True

    async def drain(self, timeout: float | None) -> None:
        """Stop reading every open stream, answer what each has accepted
        within ``timeout`` seconds (503 for the rest), close each with 1001."""
        self.stop_accepting()
        streams = list(self._streams)
        if streams:
            logger.info("draining %d WebSocket stream(s)", len(streams))
            await asyncio.gather(*(stream.drain(timeout) for stream in streams))


class StreamEndpoint:
    """The WebSocket route, as raw ASGI."""

    def __init__(
        self, infer: Infer, metrics: Metrics, registry: StreamRegistry, settings: Settings
    ) -> None:
        self.infer = infer
        self.metrics = metrics
        self.registry = registry
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if self.registry.draining:
            await refuse(
                scope, send, Closed("the server is shutting down; connect to another replica")
            )
            return
        params = scope["path_params"]
        name: str = params["name"]
        model: ServedModel | None = None
        missing = ""
        try:
            model = self.infer.resolve(name, params.get("version"))
        except NotFound as exc:
            # Told per message, like the HTTP route: a client sees a 404 for each request.
            missing = str(exc)
        extensions = scope.get("extensions", {})
        stream = Stream(
            name,
            model,
            missing,
            self.infer,
            self.metrics,
            receive,
            send,
            self.settings,
            send_many=frames.SEND_MANY in extensions,
            push=frames.PUSH in extensions,
        )
        self.registry.add(stream)  # before the first await: a drain from now on sees it
        try:
            await send({"type": "websocket.accept"})
            await stream.serve()
        finally:
            self.registry.discard(stream)
            stream.closed.set()
