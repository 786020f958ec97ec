"""The ASGI application: ``create_app(settings) -> Carpool``.

Everything is built here, once, and handed on explicitly: the models, the
metrics, the infer transaction, the stream registry, the lifecycle that
starts and drains them, the middleware (given to Starlette at construction)
and the fast lane, which runs the hot route through the same middleware
without Starlette's routing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server import access, auth, limits, openapi, v2, websocket
from server.errors import MethodNotAllowed, NotFound, ServerError, answer
from server.infer import Infer
from server.lifecycle import Lifecycle
from server.metrics import CONTENT_TYPE, Metrics
from server.models import ModelSet
from server.settings import Settings


class Carpool:
    """The server as one ASGI app, with its parts for whoever runs it.

    ``POST /v2/models/{name}/infer`` goes straight to its raw endpoint through
    the same middleware (access log, limits, tokens), skipping Starlette's
    error and exception layers and its regex routing: about a quarter of the
    per-request cost. Everything else, the versioned infer route included,
    takes Starlette's way.
    """

    def __init__(
        self,
        starlette: Starlette,
        lane: ASGIApp,
        infer: Infer,
        metrics: Metrics,
        streams: websocket.StreamRegistry,
        lifecycle: Lifecycle,
    ) -> None:
        self.starlette = starlette
        self.infer = infer
        self.models = infer.models
        self.metrics = metrics
        self.streams = streams
        self.lifecycle = lifecycle
        self._lane = lane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                name = path[11:-6]
                if name and "/" not in name:
                    scope["app"] = self.starlette
                    scope["path_params"] = {"name": name}
                    await self._lane(scope, receive, send)
                    return
        await self.starlette(scope, receive, send)


def create_app(settings: Settings | None = None) -> Carpool:
    settings = settings or Settings.from_env()
    models = ModelSet(settings.models_dir, settings.torch_threads)
    metrics = Metrics(models)
    infer = Infer(models, settings)
    streams = websocket.StreamRegistry()
    lifecycle = Lifecycle(models, streams, metrics, settings.drain_delay, settings.drain_timeout)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await lifecycle.start()
        try:
            yield
        finally:
            await lifecycle.shutdown()

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    routes = [
        *v2.routes(infer, metrics, settings),
        *websocket.routes(infer, metrics, streams, settings),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        openapi.route(models, settings),
    ]
    # the access log outermost, so it records refusals too; then the header
    # limit, then tokens
    middleware = [
        *access.middleware(settings),  # [] unless CARPOOL_ACCESS_LOG
        *limits.middleware(settings),
        *auth.middleware(settings),  # [] without tokens
    ]
    starlette = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        # ServerError is answered by the exception middleware; only a bug of
        # ours reaches the catch-all, which answers 500 and logs it.
        exception_handlers={
            HTTPException: error_response,
            ServerError: error_response,
            Exception: error_response,
        },
    )
    infer_route = next(r for r in routes if isinstance(r, Route) and r.path == v2.INFER_PATH)
    lane = wrap(infer_route.endpoint, middleware)
    return Carpool(starlette, lane, infer, metrics, streams, lifecycle)


def wrap(app: ASGIApp, middleware: Sequence[Middleware]) -> ASGIApp:
    """``app`` inside ``middleware`` (outermost first), as Starlette stacks it."""
    for cls, args, kwargs in reversed(middleware):
        app = cls(app, *args, **kwargs)
    return app


async def error_response(request: Request, exc: Exception) -> Response:
    """Starlette's way to the one error table: routing's own 404 and 405,
    a ``ServerError`` a route raised, and our bugs (500)."""
    error: BaseException = exc
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            error = NotFound(f"no route {request.url.path}; see GET /v2")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed here")
        else:
            error = ServerError(exc.detail)
            error.status, error.reason = exc.status_code, "invalid"
    told = answer(error)
    headers = {k.decode(): v.decode() for k, v in told.headers}
    return Response(told.body, told.status, headers, media_type="application/json")
