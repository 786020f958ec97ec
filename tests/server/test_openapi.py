"""GET /openapi.json, and schemathesis against it (RELIABILITY R18).

The served repository: the fake echo model (tests/fakes.py), a model whose
outputs are NaN and infinities (``NanKind`` below), and the real digits
model. ``CARPOOL_FUZZ_EXAMPLES`` sets the schemathesis examples per
infer operation: 2,000, as RELIABILITY R18 asks of CI (a fifth of that on the
versioned paths, which share their endpoint and schema; a tenth in negative
mode). The six infer operations took 3.4 minutes on an idle 2-core machine,
8 on a busy one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import requests
import schemathesis

# Imported here, from a shallow stack: schemathesis imports it lazily from
# deep inside from_url, where pytest's assertion rewriting can hit CPython
# 3.11's "AST constructor recursion depth mismatch" SystemError.
import schemathesis.specs.openapi.schemas
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route, WebSocketRoute
from websockets.asyncio.client import connect

from server.errors import BadRequest
from server.kinds import BatchFn, ModelKind, Result
from server.models import ModelSet
from server.openapi import spec
from server.repository import ModelConfig, TensorSpec
from server.request import InferRequest, decode_request
from server.settings import Settings
from tests.fakes import infer_body, model_dir
from tests.scenarios.test_fuzz import revealing
from tests.servers import ROOT, Running, in_thread

EXAMPLES = int(os.environ.get("CARPOOL_FUZZ_EXAMPLES", "2000"))
WAIT = 30.0
MODELS = ["echo", "nan", "digits"]
Document = dict[str, Any]
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


class NanKind(ModelKind[float]):
    """``y = [NaN]`` for x >= 0, ``[+inf]`` for x < 0 (the warm-up), ``[-inf]`` for x < -1."""

    def split(self, request: InferRequest) -> list[float]:
        return list(request.columns["x"])

    def example(self) -> float:
        return -0.5

    def load(self, device: torch.device) -> BatchFn[float]:
        def run(xs: list[float]) -> Sequence[Result]:
            return [
                {"y": [math.nan if x >= 0 else (math.inf if x >= -1 else -math.inf)]} for x in xs
            ]

        return run


def nan_model(root: Path) -> None:
    folder = root / "nan"
    folder.mkdir()
    (folder / "model.toml").write_text(
        'name = "nan"\nkind = "custom"\ndevice = "cpu"\n'
        '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 1]\n'
        '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1, 1]\n'
        '[options]\nmodule = "handler.py"\nclass = "NanKind"\n'
    )
    (folder / "handler.py").write_text("from tests.server.test_openapi import NanKind\n")


@pytest.fixture(scope="module")
def described(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = model_dir(tmp_path_factory.mktemp("openapi"), "echo")
    nan_model(root)
    shutil.copytree(ROOT / "weights" / "digits", root / "digits")
    with in_thread(Settings(models_dir=root, torch_threads=1)) as running:
        yield running


@pytest.fixture(scope="module")
def document(described: Running) -> Document:
    answer = httpx.get(described.url + "/openapi.json", timeout=WAIT)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    loaded: Document = answer.json()
    return loaded


# -- the document ---------------------------------------------------------------


def test_the_document_is_openapi_3_1_describing_carpool(document: Document) -> None:
    assert document["openapi"] == "3.1.0"
    assert isinstance(document["info"], dict)
    assert document["info"]["title"] == "carpool"


def test_every_http_route_of_the_app_is_in_the_document_for_every_model(
    described: Running, document: Document
) -> None:
    paths = document["paths"]
    checked = 0
    for route in described.app.starlette.routes:
        if isinstance(route, WebSocketRoute):
            assert route.path in str(document["info"]["description"]), route.path
            continue
        assert isinstance(route, Route)
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        for name in MODELS:
            path = route.path.replace("{name}", name).replace("{version}", "1")
            assert path in paths, f"{route.path} is not described (as {path})"
            assert set(paths[path]) == methods, path
            checked += 1
    assert checked >= 3 * 10


def test_an_infer_request_schema_names_the_models_inputs_and_shapes(document: Document) -> None:
    operation = document["paths"]["/v2/models/digits/infer"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    (pixels,) = body["properties"]["inputs"]["items"]["anyOf"]
    assert pixels["properties"]["name"]["enum"] == ["pixels"]
    assert pixels["properties"]["datatype"] == {"const": "FP32"}
    shape = pixels["properties"]["shape"]
    assert (shape["minItems"], shape["maxItems"]) == (2, 2)
    items, width = shape["prefixItems"]
    assert (items["minimum"], items["maximum"], width) == (1, 1024, {"const": 64})
    assert body["properties"]["outputs"]["items"]["properties"]["name"]["enum"] == [
        "probabilities",
        "label",
    ]


def test_every_operation_documents_its_errors_as_json(
    document: Document,
) -> None:
    error = {"$ref": "#/components/schemas/Error"}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            for code in ("408", "431", "500"):
                assert code in responses, (path, code)
            for code, response in responses.items():
                if code.startswith(("4", "5")) and not path.endswith("ready"):
                    assert response["content"]["application/json"]["schema"] == error
            if path.endswith("/infer"):
                assert {"400", "401", "403", "404", "413", "422", "503", "504", "507"} <= set(
                    responses
                )
                assert "Retry-After" in responses["503"]["headers"]


def test_with_tokens_every_operation_but_health_requires_the_bearer_scheme(
    tmp_path: Path,
) -> None:
    paths = spec(ModelSet(tmp_path), Settings(auth_tokens="t"))["paths"]
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert "security" not in paths[path]["get"]
        assert "401" not in paths[path]["get"]["responses"]
    for path in ("/v2", "/metrics", "/openapi.json"):
        assert paths[path]["get"]["security"] == [{"bearer": []}]
        assert "WWW-Authenticate" in paths[path]["get"]["responses"]["401"]["headers"]


def test_with_only_a_metrics_token_only_metrics_requires_the_bearer_scheme(
    tmp_path: Path,
) -> None:
    paths = spec(ModelSet(tmp_path), Settings(metrics_token="m"))["paths"]
    assert paths["/metrics"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/v2"]["get"]


# -- schemathesis ---------------------------------------------------------------


def run_schemathesis(
    url: str,
    path: str,
    method: str,
    examples: int,
    mode: GenerationMode = GenerationMode.POSITIVE,
    checks: Sequence[Any] = tuple(CHECKS),
) -> int:
    schema = schemathesis.openapi.from_url(url + "/openapi.json", timeout=WAIT)
    operation = schema[path][method]
    # the queue deadline header is pinned: a generated 1 ms would make a
    # legitimate 504 under load, which is not what this test looks for
    headers = {"x-carpool-timeout-ms": "60000"} if method == "POST" else None
    calls = []

    with requests.Session() as session:

        @given(case=operation.as_strategy(mode, headers=headers))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case[Any]) -> None:
            response = case.call(base_url=url, session=session, timeout=WAIT)
            calls.append(response.status_code)
            case.validate_response(response, checks=list(checks))
            content_type = response.headers.get("content-type") or [""]
            if content_type[0].startswith("application/json"):
                strict(response.text)  # every JSON answer is RFC 8259 JSON (R18)
            if response.status_code >= 400:
                assert revealing(response.content) == []  # R22: no traceback, no path

        check()
    return len(calls)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("versioned", [False, True], ids=["plain", "versioned"])
def test_schemathesis_finds_no_5xx_and_no_schema_violation_on_infer(
    described: Running, model: str, versioned: bool
) -> None:
    path = f"/v2/models/{model}{'/versions/1' if versioned else ''}/infer"
    examples = EXAMPLES // 5 if versioned else EXAMPLES  # the same endpoint and schema
    assert run_schemathesis(described.url, path, "POST", examples) >= min(examples, 10)


@pytest.mark.parametrize("model", MODELS)
def test_schemathesis_negative_data_is_rejected_with_a_documented_4xx_on_infer(
    described: Running, model: str
) -> None:
    checks = (not_a_server_error, negative_data_rejection, status_code_conformance)
    path = f"/v2/models/{model}/infer"
    examples = max(EXAMPLES // 10, 10)
    calls = run_schemathesis(described.url, path, "POST", examples, GenerationMode.NEGATIVE, checks)
    assert calls >= min(examples, 10)


@pytest.mark.parametrize("value", [None, [1], {"a": 1}], ids=["null", "list", "object"])
@pytest.mark.parametrize("where", ["request", "input", "output"])
async def test_a_parameter_that_is_not_a_bool_number_or_string_gets_400(
    described: Running, where: str, value: object
) -> None:
    # frozen schemathesis finding (negative_data_rejection): outputs[].parameters
    # {"": null} was answered 200 while the schema allows only scalars
    body: dict[str, Any] = infer_body([1.0])
    target = {
        "request": body,
        "input": body["inputs"][0],
        "output": (body.setdefault("outputs", [{"name": "y"}]))[0],
    }[where]
    target["parameters"] = {"": value}
    async with httpx.AsyncClient(base_url=described.url, timeout=WAIT) as client:
        answer = await client.post("/v2/models/echo/infer", json=body)
    assert answer.status_code == 400
    assert "boolean, number or string" in answer.json()["error"]


def test_schemathesis_finds_no_5xx_and_no_schema_violation_on_the_get_routes(
    described: Running, document: Document
) -> None:
    gets = [path for path, operations in document["paths"].items() if "get" in operations]
    assert len(gets) == 5 + 4 * len(MODELS)
    for path in gets:
        assert run_schemathesis(described.url, path, "GET", 5) >= 1


@pytest.mark.parametrize("model", MODELS)
def test_each_models_documented_example_is_answered_200_within_the_schema(
    described: Running, document: Document, model: str
) -> None:
    path = f"/v2/models/{model}/infer"
    content = document["paths"][path]["post"]["requestBody"]["content"]
    example = content["application/json"]["example"]
    operation = schemathesis.openapi.from_url(described.url + "/openapi.json")[path]["POST"]
    case = operation.Case(body=example, media_type="application/json")
    with requests.Session() as session:
        response = case.call(base_url=described.url, session=session, timeout=WAIT)
    assert response.status_code == 200
    case.validate_response(response, checks=CHECKS)


# -- NaN and infinity --------------------------------------------------------------


def strict(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON (RFC 8259)")

    return json.loads(text, parse_constant=refuse)


async def test_nan_and_infinite_outputs_are_sent_as_strict_json_null(described: Running) -> None:
    async with httpx.AsyncClient(base_url=described.url, timeout=WAIT) as client:
        answer = await client.post("/v2/models/nan/infer", json=infer_body([1.0, -0.5, -2.0]))
    assert answer.status_code == 200
    document = strict(answer.text)
    assert isinstance(document, dict)
    assert document["outputs"][0]["data"] == [None, None, None]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"])
async def test_nan_and_infinite_json_inputs_get_400(described: Running, literal: bytes) -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [%s]}]}'
    async with httpx.AsyncClient(base_url=described.url, timeout=WAIT) as client:
        answer = await client.post("/v2/models/echo/infer", content=body % literal)
    assert answer.status_code == 400
    assert "error" in answer.json()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_nan_and_infinite_binary_inputs_get_400(described: Running, value: float) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    ).encode()
    async with httpx.AsyncClient(base_url=described.url, timeout=WAIT) as client:
        answer = await client.post(
            "/v2/models/echo/infer",
            content=header + struct.pack("<f", value),
            headers={"inference-header-content-length": str(len(header))},
        )
    assert answer.status_code == 400
    assert "NaN" in answer.json()["error"]


# One policy for non-finite inputs, wherever they come from: every float
# datatype, JSON or binary, flat or nested, HTTP or WebSocket, any position
# in the tensor: 400, before anything is queued. JSON cannot even spell them
# (orjson refuses NaN/Infinity and numbers that overflow a double).

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, "1e999": math.inf}
FLOATS = {"FP16": "e", "FP32": "f", "FP64": "d"}


def float_config(datatype: str) -> ModelConfig:
    spec = TensorSpec("x", datatype, (-1, 3))
    return ModelConfig("m", "tensor", Path("."), (spec,), (TensorSpec("y", "FP32", (-1, 1)),))


def json_with(datatype: str, values: list[float], literal: str | None, nested: bool) -> bytes:
    count = len(values) // 3
    data: list[Any] = [values[i * 3 : i * 3 + 3] for i in range(count)] if nested else values
    entry = {"name": "x", "datatype": datatype, "shape": [count, 3], "data": data}
    body = orjson.dumps({"inputs": [entry]})
    if literal is None:
        return body
    return body.replace(b"12345.5", literal.encode(), 1)  # the planted value


def binary_with(datatype: str, values: list[float]) -> tuple[bytes, int]:
    raw = struct.pack(f"<{len(values)}{FLOATS[datatype]}", *values)
    entry: dict[str, Any] = {"name": "x", "datatype": datatype, "shape": [len(values) // 3, 3]}
    entry["parameters"] = {"binary_data_size": len(raw)}
    header = orjson.dumps({"inputs": [entry]})
    return header + raw, len(header)


@given(
    datatype=st.sampled_from(sorted(FLOATS)),
    count=st.integers(1, 6),
    position=st.integers(0, 17),
    literal=st.sampled_from(sorted(NON_FINITE)),
    nested=st.booleans(),
)
@settings(max_examples=300, deadline=None, database=None)
def test_a_non_finite_input_is_refused_in_every_datatype_form_and_position(
    datatype: str, count: int, position: int, literal: str, nested: bool
) -> None:
    config = float_config(datatype)
    values = [float(i) for i in range(count * 3)]
    where = position % len(values)
    values[where] = 12345.5
    request = decode_request(json_with(datatype, values, None, nested), config)
    assert request.count == count  # the finite control is accepted
    with pytest.raises(BadRequest, match="not valid JSON"):
        decode_request(json_with(datatype, values, literal, nested), config)
    values[where] = NON_FINITE[literal]
    body, header_length = binary_with(datatype, values)
    with pytest.raises(BadRequest, match="NaN and infinity are not accepted"):
        decode_request(body, config, header_length)


async def test_non_finite_inputs_on_a_websocket_get_400_and_the_stream_serves_on(
    described: Running,
) -> None:
    url = f"ws://127.0.0.1:{described.port}/v2/models/echo/stream"
    text = b'{"id": "t", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [NaN]}]}'
    body, header_length = binary_with("FP32", [math.inf, 0.0, 0.0])
    body = body.replace(b"[1,3]", b"[3,1]")  # echo's x is [-1, 1]
    header = orjson.loads(body[:header_length])
    header["id"] = "b"
    framed = orjson.dumps(header)
    frame = struct.pack("<I", len(framed)) + framed + body[header_length:]
    async with connect(url, proxy=None, open_timeout=WAIT) as ws:
        await ws.send(text.decode())
        await ws.send(frame)
        await ws.send(orjson.dumps({"id": "ok", **infer_body([1.5])}).decode())
        answers = [orjson.loads(await ws.recv()) for _ in range(3)]
    by_id = {answer["id"]: answer for answer in answers}
    # a text message with NaN is not JSON, so its id cannot be read: null
    assert (by_id[None]["status"], by_id["b"]["status"]) == (400, 400)
    assert "NaN" in by_id["b"]["error"]
    assert by_id["ok"]["outputs"][0]["data"] == [3.0]
