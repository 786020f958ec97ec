"""Open Inference Protocol v2 routes: health, metadata and infer.

``POST /v2/models/{name}/infer`` is a raw ASGI endpoint: parse and validate
(400 before anything is queued), split into items, submit them to the
model's batcher, and answer with the joined results plus timing headers that
show the batch each request rode in.
"""

from __future__ import annotations

import asyncio
import time
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
from server.codec import decode_request, encode_response, queue_timeout
from server.errors import NotFound, PayloadTooLarge, http_error
from server.metrics import Metrics
from server.models import ModelSet, ServedModel
from server.settings import Settings

EXTENSIONS = ["binary_tensor_data"]


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def routes(models: ModelSet, metrics: Metrics, settings: Settings) -> list[BaseRoute]:
    def model_for(request: Request) -> ServedModel:
        model = models.get(request.path_params["name"])
        version = request.path_params.get("version")
        if model is None or (version is not None and version != model.config.version):
            raise NotFound(unknown_model(models, request.path_params["name"], version))
        return model

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

    infer = InferEndpoint(models, metrics, settings)
    versioned = "/v2/models/{name}/versions/{version}"
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{name}", model_metadata, methods=["GET"]),
        Route(versioned, model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route(versioned + "/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route(versioned + "/infer", infer, methods=["POST"]),
    ]


def check_items(count: int, max_items: int, model: ServedModel) -> None:
    """413 for a request with more items than the server takes in one request,
    or than the model's whole queue holds: a 503 would invite a retry that can
    never fit."""
    if count > max_items:
        raise PayloadTooLarge(
            f"the request has {count} items; this server takes at most "
            f"{max_items} per request (CARPOOL_MAX_ITEMS_PER_REQUEST)"
        )
    if count > model.config.max_queue:
        raise PayloadTooLarge(
            f"the request has {count} items; model {model.config.name!r} queues at most "
            f"{model.config.max_queue} (max_queue in its model.toml): split the request"
        )


def unknown_model(models: ModelSet, name: str, version: str | None) -> str:
    served = sorted(model.config.name for model in models)
    if version is not None and models.get(name) is not None:
        return f"model {name!r} has no version {version!r}"
    return f"unknown model {name!r}; this server serves {served}"


class InferEndpoint:
    """``POST /v2/models/{name}[/versions/{v}]/infer``, as raw ASGI."""

    def __init__(self, models: ModelSet, metrics: Metrics, settings: Settings) -> None:
        self.models = models
        self.metrics = metrics
        self.max_body_bytes = settings.max_body_bytes
        self.max_items = settings.max_items_per_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        name: str = params["name"]
        model = self.models.get(name)
        watch: DisconnectWatch | None = None
        body_read = False
        try:
            if model is None or params.get("version", model.config.version) != model.config.version:
                raise NotFound(unknown_model(self.models, name, params.get("version")))
            # Full or draining: refuse before reading the body into memory.
            model.batcher.admit(1)
            body = await read_body(scope, receive, self.max_body_bytes)
            body_read = True
            request = decode_request(
                body, model.config, int_header(scope, b"inference-header-content-length")
            )
            check_items(request.count, self.max_items, model)
            items = model.kind.split(request)
            timeout = queue_timeout(
                model.config, request.parameters, int_header(scope, b"x-carpool-timeout-ms")
            )
            watch = DisconnectWatch(receive)
            completion = await model.batcher.submit_many(items, time.monotonic() + timeout)
            watch.close()
            watch = None
            payload, header_length = encode_response(model.config, request, completion.results)
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
            error = http_error(exc)
            if model is not None:
                self.metrics.count(name, error.reason)
            headers = error.headers
            if not body_read:  # the unread body must not be taken for the next request
                headers = [*headers, (b"connection", b"close")]
            await respond(send, error.status, error.body, headers)
        finally:
            if watch is not None:
                watch.close()
