"""The ASGI application: ``create_app(settings)``.

Its lifespan loads, warms up and starts every model of the repository, and
drains their batchers on shutdown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server import access, auth, limits, openapi, stream, v2
from server.errors import ServerError, http_error
from server.metrics import CONTENT_TYPE, Metrics
from server.models import ModelSet
from server.settings import Settings

logger = logging.getLogger("carpool.server")


class Carpool(Starlette):
    """Starlette, with a fast lane for the hot route.

    ``POST /v2/models/{name}/infer`` goes straight to its raw ASGI endpoint
    through the same user middleware (access log, limits, tokens), skipping
    Starlette's error and exception layers and its regex routing: about a
    quarter of the per-request cost here. Everything else, the versioned
    infer route included, takes the ordinary way.
    """

    def __init__(self, *, infer: ASGIApp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._infer = infer
        self._lane: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                name = path[11:-6]
                if name and "/" not in name:
                    if self._lane is None:
                        self._lane = self._infer
                        for middleware in reversed(self.user_middleware):
                            self._lane = middleware.cls(
                                self._lane, *middleware.args, **middleware.kwargs
                            )
                    scope["app"] = self
                    scope["path_params"] = {"name": name}
                    await self._lane(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    models = ModelSet(settings.models_dir, settings.torch_threads)
    metrics = Metrics(models)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await models.start(metrics.listener)
        try:
            yield
        finally:
            await models.aclose(settings.drain_timeout)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {
            404: f"no route {request.url.path}; see GET /v2",
            405: f"{request.method} is not allowed here",
        }
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid")
        return v2.JSONResponse(
            {"error": message.get(exc.status_code, exc.detail), "reason": reason},
            status_code=exc.status_code,
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        error = http_error(exc)
        return Response(
            error.body,
            error.status,
            dict((k.decode(), v.decode()) for k, v in error.headers),
            media_type="application/json",
        )

    streams = stream.StreamRegistry()  # drained by server/lifecycle.py
    routes = [
        *v2.routes(models, metrics, settings),
        *stream.routes(models, metrics, streams, settings),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        openapi.route(models, settings),
    ]
    app = Carpool(
        infer=next(
            r.endpoint
            for r in routes
            if isinstance(r, Route) and r.path == "/v2/models/{name}/infer"
        ),
        routes=routes,
        lifespan=lifespan,
        middleware=access.middleware(settings),  # [] unless CARPOOL_ACCESS_LOG
        # ServerError is answered by the exception middleware; only a bug of
        # ours reaches the catch-all, which answers 500 and logs it.
        exception_handlers={
            HTTPException: http_exception,
            ServerError: server_error,
            Exception: server_error,
        },
    )
    # header limit, then tokens: inside the access log, so it records refusals too
    app.user_middleware += [*limits.middleware(settings), *auth.middleware(settings)]
    app.state.models = models
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.streams = streams
    return app
