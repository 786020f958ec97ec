"""``GET /openapi.json``: an OpenAPI 3.1 description of this server.

Built from the models it serves, once they are loaded: every model gets its
own metadata, ready and infer paths (versioned too), and its infer request
schema names that model's inputs, datatypes and shapes. This module is the
document, its paths and operations; the bodies' schemas are
``server.schemas``. Every response is described, errors included: they are
all ``{"error": "<what to do>"}``. WebSocket routes cannot be OpenAPI
operations; the description lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

import server
from server import schemas
from server.auth import load_tokens
from server.models import ModelSet, ServedModel
from server.schemas import JSON, Schema
from server.settings import Settings

_ERRORS = {
    400: "Malformed JSON, an unknown or missing input, a wrong datatype or shape, "
    "or a value outside its datatype's range.",
    401: "A bearer token is required and was missing or not valid (only when the server "
    "has tokens; see WWW-Authenticate).",
    403: "The bearer token is valid, but not for this route.",
    404: "Unknown model, version or route.",
    408: "The request's headers or body did not arrive in time; the connection is closed.",
    413: "The body, or the number of items, is over this server's limit.",
    422: "The model failed on one item of the batch; the other items were answered.",
    431: "The request headers are too large.",
    500: "The model's forward pass failed, or the server has a bug (no details are sent).",
    503: "The model's queue is full, the model is not ready, or the server is shutting down; "
    "retry after Retry-After seconds.",
    504: "The request's deadline passed before its batch ran; it was never computed.",
    507: "The model ran out of memory on this item alone.",
}
# the errors any route can answer (checked before any route runs)
_ANY_ROUTE = (408, 431, 500)
_GUARDED = (401, 403)
_MODEL_ROUTE = (404,)
_INFER = (400, 404, 413, 422, 503, 504, 507)


def route(models: ModelSet, settings: Settings) -> Route:
    """The ``GET /openapi.json`` route (the spec is built once, after startup)."""
    built: list[bytes] = []

    async def endpoint(request: Request) -> Response:
        if not built:
            streams = [r.path for r in request.app.routes if isinstance(r, WebSocketRoute)]
            document = orjson.dumps(spec(models, settings, streams))
            if not models.loaded:
                return Response(document, media_type=JSON)
            built.append(document)
        return Response(built[0], media_type=JSON)

    return Route("/openapi.json", endpoint, methods=["GET"])


def spec(models: ModelSet, settings: Settings, streams: Sequence[str] = ()) -> Schema:
    """The OpenAPI document for ``models``; ``streams`` are WebSocket paths."""
    inference_tokens, metrics_tokens = load_tokens(settings)
    guarded = bool(inference_tokens)
    metrics_guarded = bool(inference_tokens or metrics_tokens)
    paths: dict[str, Schema] = {
        "/v2": {"get": _operation("Server metadata", _ok(schemas.ref("ServerMetadata")), guarded)},
        "/v2/health/live": {
            "get": _operation("Liveness: 200 while the process serves", _live(), None)
        },
        "/v2/health/ready": {
            "get": _operation(
                "Readiness: 200 once every model is loaded and warmed up, 503 before and "
                "while draining",
                _ready({"ready": {"type": "boolean"}}),
                None,
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {}}}}},
                metrics_guarded,
            )
        },
        "/openapi.json": {"get": _operation("This document", _ok({"type": "object"}), guarded)},
    }
    for model in models:
        for prefix in _prefixes(model):
            paths.update(_model_paths(model, prefix, guarded, settings.max_items_per_request))
    document: Schema = {
        "openapi": "3.1.0",
        "info": {
            "title": "carpool",
            "version": server.__version__,
            "description": _description(streams),
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    return document


def _prefixes(model: ServedModel) -> list[str]:
    name, version = model.config.name, model.config.version
    return [f"/v2/models/{name}", f"/v2/models/{name}/versions/{version}"]


def _model_paths(
    model: ServedModel, prefix: str, guarded: bool, max_items: int
) -> dict[str, Schema]:
    config = model.config
    infer = _operation(
        f"Infer with {config.name}: an input of shape [n, ...] is n items, batched with "
        "other callers' items. The binary tensor extension (Inference-Header-Content-Length) "
        "is accepted too.",
        schemas.infer_responses(config.name, config.outputs),
        guarded,
        _MODEL_ROUTE + _INFER,
    )
    infer["parameters"] = [
        {
            "name": "x-carpool-timeout-ms",
            "in": "header",
            "required": False,
            "description": "Shortens (never lengthens) how long the request may wait in the queue.",
            "schema": {"type": "integer", "minimum": 1, "maximum": 2**62},
        }
    ]
    infer["requestBody"] = {
        "required": True,
        "content": {
            JSON: {
                "schema": schemas.infer_request(
                    config.name, config.inputs, config.outputs, max_items
                ),
                "example": schemas.example(config.inputs),
            }
        },
    }
    return {
        prefix: {
            "get": _operation(
                f"Metadata of {config.name}",
                _ok(schemas.model_metadata(config.name)),
                guarded,
                _MODEL_ROUTE,
            )
        },
        prefix + "/ready": {
            "get": _operation(
                f"Readiness of {config.name}",
                _ready({"name": {"type": "string"}, "ready": {"type": "boolean"}}),
                guarded,
                _MODEL_ROUTE,
            )
        },
        prefix + "/infer": {"post": infer},
    }


def _operation(
    summary: str,
    responses: dict[str, Schema],
    guarded: bool | None,
    errors: tuple[int, ...] = (),
) -> Schema:
    """An operation; ``guarded`` None means open even when the server has tokens."""
    codes = sorted({*_ANY_ROUTE, *errors, *(_GUARDED if guarded is not None else ())})
    operation: Schema = {"summary": summary, "responses": dict(responses)}
    for code in codes:
        operation["responses"].setdefault(str(code), _error(code))
    if guarded:
        operation["security"] = [{"bearer": []}]
    return operation


def _error(code: int) -> Schema:
    response: Schema = {
        "description": _ERRORS[code],
        "content": {JSON: {"schema": schemas.ref("Error")}},
    }
    if code == 503:
        response["headers"] = {
            "Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}
        }
    elif code == 401:
        response["headers"] = {
            "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}
        }
    return response


def _ok(schema: Schema) -> dict[str, Schema]:
    return {"200": {"description": "OK", "content": {JSON: {"schema": schema}}}}


def _live() -> dict[str, Schema]:
    return _ok({"type": "object", "properties": {"live": {"const": True}}, "required": ["live"]})


def _ready(properties: Schema) -> dict[str, Schema]:
    body = {"type": "object", "properties": properties, "required": list(properties)}
    return {
        "200": {"description": "Ready", "content": {JSON: {"schema": body}}},
        "503": {"description": "Not ready (yet, or any more)", "content": {JSON: {"schema": body}}},
    }


def _description(streams: Sequence[str]) -> str:
    lines = [
        "Batched PyTorch inference: the Open Inference Protocol v2 (KServe v2 REST).",
        'Every error is JSON {"error": "<what went wrong and what to do>"}.',
    ]
    if streams:
        lines.append(
            "WebSocket streaming (not an OpenAPI operation): "
            + ", ".join(f"WS {path}" for path in streams)
            + '. Each text message is one infer request body with an "id"; answers come '
            "back with that id as each finishes, in any order; an error answers "
            '{"id", "error", "status", "reason"} and the connection stays open. '
            "The bearer token, when required, is checked at the handshake."
        )
    return "\n\n".join(lines)
