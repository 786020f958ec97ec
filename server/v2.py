"""Open Inference Protocol v2 routes: health, metadata and infer.

``POST /v2/models/{name}/infer`` is a raw ASGI endpoint: it reads the body,
runs the infer transaction (``server/infer.py``: 4xx before anything is
queued) and answers with the joined results plus timing headers that show
the batch each request rode in.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

import server
from server.asgi import (
    OCTETS,
    ClientGone,
    DisconnectWatch,
    Receive,
    Scope,
    Send,
    int_header,
    read_body,
    respond,
)
from server.errors import answer
from server.infer import Infer
from server.metrics import Metrics
from server.models import ServedModel
from server.settings import Settings

EXTENSIONS = ["binary_tensor_data"]
INFER_PATH = "/v2/models/{name}/infer"  # the route the fast lane takes (server/app.py)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def routes(infer: Infer, metrics: Metrics, settings: Settings) -> list[BaseRoute]:
    models = infer.models

    def model_for(request: Request) -> ServedModel:
        params = request.path_params
        return models.resolve(params["name"], params.get("version"))

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(
            {"name": "carpool", "version": server.__version__, "extensions": EXTENSIONS}
        )

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = models.ready
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    async def model_metadata(request: Request) -> Response:
        config = model_for(request).config
        return JSONResponse(
            {
                "name": config.name,
                "versions": [config.version],
                "platform": "pytorch",
                "inputs": [spec.metadata() for spec in config.inputs],
                "outputs": [spec.metadata() for spec in config.outputs],
            }
        )

    async def model_ready(request: Request) -> Response:
        is_ready = model_for(request).ready
        return JSONResponse(
            {"name": request.path_params["name"], "ready": is_ready},
            status_code=200 if is_ready else 503,
        )

    endpoint = InferEndpoint(infer, metrics, settings)
    versioned = "/v2/models/{name}/versions/{version}"
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{name}", model_metadata, methods=["GET"]),
        Route(versioned, model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route(versioned + "/ready", model_ready, methods=["GET"]),
        Route(INFER_PATH, endpoint, methods=["POST"]),
        Route(versioned + "/infer", endpoint, methods=["POST"]),
    ]


class InferEndpoint:
    """``POST /v2/models/{name}[/versions/{v}]/infer``, as raw ASGI: the
    HTTP frame around the infer transaction."""

    def __init__(self, infer: Infer, metrics: Metrics, settings: Settings) -> None:
        self.infer = infer
        self.metrics = metrics
        self.max_body_bytes = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        infer = self.infer
        params = scope["path_params"]
        name: str = params["name"]
        model: ServedModel | None = None
        watch: DisconnectWatch | None = None
        body_read = False
        try:
            model = infer.resolve(name, params.get("version"))
            # Full or draining: refuse before reading the body into memory.
            model.batcher.admit(1)
            body = await read_body(scope, receive, self.max_body_bytes)
            body_read = True
            request = infer.decode(
                model, body, int_header(scope, b"inference-header-content-length")
            )
            job = infer.prepare(model, request, int_header(scope, b"x-carpool-timeout-ms"))
            watch = DisconnectWatch(receive)
            completion = await infer.submit(job)
            watch.close()
            watch = None
            payload, header_length = infer.encode(job, completion)
            headers = [
                (b"x-carpool-queue-ms", b"%.3f" % (completion.queue_seconds * 1000)),
                (b"x-carpool-compute-ms", b"%.3f" % (completion.compute_seconds * 1000)),
                (b"x-carpool-batch-size", b"%d" % completion.batch_size),
            ]
            if header_length is None:
                await respond(send, 200, payload, headers)
            else:
                headers.append((b"inference-header-content-length", b"%d" % header_length))
                await respond(send, 200, payload, headers, OCTETS)
            self.metrics.count(name, "ok")
        except ClientGone:
            self.metrics.count(name, "cancelled")
        except asyncio.CancelledError:
            if watch is None or not watch.gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self.metrics.count(name, "cancelled")
        except Exception as exc:
            told = answer(exc)
            if model is not None or infer.models.get(name) is not None:
                self.metrics.count(name, told.reason)  # counted under models that exist
            headers = told.headers
            if not body_read:  # the unread body must not be taken for the next request
                headers = [*headers, (b"connection", b"close")]
            await respond(send, told.status, told.body, headers)
        finally:
            if watch is not None:
                watch.close()
