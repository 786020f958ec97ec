"""Request limits that apply before any route runs.

``HeaderLimit`` answers ``431`` when the names and values of a request's
headers add up to more than ``max_header_bytes`` (httptools itself accepts
headers of any size; uvicorn's h11 stops at 16 KiB with a bare 400). A
WebSocket handshake over the limit is refused before it is accepted.

The other limits live where their facts are known:

- body size (413): ``server/asgi.py`` ``read_body``, from Content-Length
  before the body is read, and while it is read;
- header and body deadlines (408), and a cap on an unfinished head:
  ``server/uvicorn_internals/receipt.py``, below the ASGI app, which never sees a request
  whose headers have not arrived;
- items per request (413) and text length (400): where the request is
  decoded (``server/infer.py``, the ``text`` kind);
- JSON nesting depth: orjson refuses documents nested deeper than 1024 (400).
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from server.asgi import refuse
from server.errors import HeadersTooLarge
from server.settings import Settings


class HeaderLimit:
    """Raw ASGI middleware: 431 when the request headers are too large."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" or scope["type"] == "websocket":
            size = 0
            for name, value in scope["headers"]:
                size += len(name) + len(value)
            if size > self.max_bytes:
                await refuse(
                    scope,
                    send,
                    HeadersTooLarge(
                        f"the request headers are over {self.max_bytes} bytes; "
                        "send fewer or shorter ones"
                    ),
                )
                return
        await self.app(scope, receive, send)


def middleware(settings: Settings) -> list[Middleware]:
    """The limit middleware for ``settings``, outermost first."""
    return [Middleware(HeaderLimit, max_bytes=settings.max_header_bytes)]
