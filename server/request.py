"""An Open Inference Protocol v2 (KServe v2 REST) infer request, decoded.

``decode_request`` parses and validates an infer request against the model's
declared inputs: every error is a ``BadRequest`` naming the field, raised
before anything is queued. Both data forms are accepted: JSON (flat or nested
``data``, see ``server.json_data``) and the binary tensor extension
(``Inference-Header-Content-Length`` with ``parameters.binary_data_size`` per
input, see ``server.binary_data``), which standard clients such as
tritonclient use by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from server import binary_data, json_data
from server.errors import BadRequest
from server.repository import ModelConfig, TensorSpec

_REQUEST_KEYS = frozenset({"id", "inputs", "outputs", "parameters"})
_PARAMETER_TYPES = frozenset({bool, int, float, str})


@dataclass(slots=True)
class InferRequest:
    """A validated request: ``count`` items, each input a flat row-major list."""

    id: str | None
    count: int
    columns: dict[str, list[Any]]
    outputs: list[TensorSpec]
    binary_outputs: frozenset[str]
    parameters: dict[str, Any]


def decode_request(
    body: bytes, config: ModelConfig, header_length: int | None = None
) -> InferRequest:
    binary: memoryview | None = None
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes"
            )
        binary = memoryview(body)[header_length:]
        body = body[:header_length]
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise BadRequest('the body must be a JSON object: {"inputs": [...]}')
    if not doc.keys() <= _REQUEST_KEYS:
        raise BadRequest(
            f"unknown fields {sorted(doc.keys() - _REQUEST_KEYS)}; expected {sorted(_REQUEST_KEYS)}"
        )
    request_id = doc.get("id")
    if request_id is not None and type(request_id) is not str:
        raise BadRequest('"id" must be a string')
    parameters = _parameters(doc.get("parameters"), "parameters")
    inputs = doc.get("inputs")
    if type(inputs) is not list or not inputs:
        raise BadRequest(
            f'"inputs" must be a non-empty list; model {config.name!r} takes {_names(config.inputs)}'
        )
    columns: dict[str, list[Any]] = {}
    count = -1
    offset = 0
    for position, entry in enumerate(inputs):
        spec, shape = _input_header(entry, position, config)
        if spec.name in columns:
            raise BadRequest(f"input {spec.name!r} is given twice")
        if count == -1:
            count = shape[0]
        elif shape[0] != count:
            raise BadRequest(
                f"input {spec.name!r} has {shape[0]} items, an earlier input has {count}"
            )
        size = math.prod(shape)
        params = entry.get("parameters")
        if params is not None:
            params = _parameters(params, f"inputs[{position}].parameters")
        binary_size = params.get("binary_data_size") if params else None
        if binary_size is not None:
            if binary is None:
                raise BadRequest(
                    f"input {spec.name!r}: binary_data_size needs an Inference-Header-Content-Length header"
                )
            if type(binary_size) is not int or binary_size < 0:
                raise BadRequest(
                    f"input {spec.name!r}: binary_data_size must be a non-negative integer"
                )
            chunk = binary[offset : offset + binary_size]
            offset += binary_size
            if len(chunk) != binary_size:
                raise BadRequest(f"input {spec.name!r}: the body ends inside its binary data")
            data = binary_data.unpack(spec, chunk, size)
        else:
            data = entry.get("data")
            if type(data) is not list:
                raise BadRequest(f'input {spec.name!r}: "data" must be a list')
            data = json_data.flatten(spec.name, data, shape)
            if len(data) != size:
                raise BadRequest(
                    f"input {spec.name!r}: shape {shape} needs {size} values, the data has {len(data)}"
                )
            json_data.check_values(spec, data)
        columns[spec.name] = data
    missing = [spec.name for spec in config.inputs if spec.name not in columns]
    if missing:
        raise BadRequest(
            f"missing inputs {missing}; model {config.name!r} takes {_names(config.inputs)}"
        )
    if binary is not None and offset != len(binary):
        raise BadRequest(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims"
        )
    outputs, binary_outputs = _requested_outputs(doc.get("outputs"), config, parameters)
    return InferRequest(request_id, count, columns, outputs, binary_outputs, parameters)


def queue_timeout(config: ModelConfig, parameters: dict[str, Any], header_ms: int | None) -> float:
    """Seconds a request may wait in the queue: the model's ``queue_timeout_ms``,
    shortened (never lengthened) by the ``X-Carpool-Timeout-Ms`` header or the
    v2 ``timeout`` parameter (microseconds, as Triton takes it)."""
    seconds = config.queue_timeout_ms / 1000
    if header_ms is not None:
        if header_ms <= 0:
            raise BadRequest(
                "header x-carpool-timeout-ms must be a positive number of milliseconds"
            )
        seconds = min(seconds, header_ms / 1000)
    micros = parameters.get("timeout")
    if micros is not None:
        if type(micros) is not int or micros <= 0:
            raise BadRequest("parameters.timeout must be a positive integer (microseconds)")
        seconds = min(seconds, micros / 1_000_000)
    return seconds


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name} ({s.datatype} {list(s.shape)})" for s in specs)


def _parameters(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is not dict:
        raise BadRequest(f'"{where}" must be an object')
    for key, item in value.items():
        if type(item) not in _PARAMETER_TYPES:  # v2: $parameter is a bool, number or string
            raise BadRequest(f'"{where}.{key}" must be a boolean, number or string')
    return value


def _input_header(
    entry: object, position: int, config: ModelConfig
) -> tuple[TensorSpec, list[int]]:
    if type(entry) is not dict:
        raise BadRequest(
            f"inputs[{position}] must be an object with name, datatype, shape and data"
        )
    name = entry.get("name")
    spec = config.input(name) if type(name) is str else None
    if spec is None:
        raise BadRequest(
            f"inputs[{position}]: unknown input {name!r}; model {config.name!r} takes {_names(config.inputs)}"
        )
    datatype = entry.get("datatype")
    if datatype != spec.datatype:
        raise BadRequest(f"input {spec.name!r}: datatype {datatype!r}, expected {spec.datatype!r}")
    shape = entry.get("shape")
    if not _fits(shape, spec.shape):
        raise BadRequest(
            f"input {spec.name!r}: shape {shape!r} does not fit {list(spec.shape)} "
            "(-1 is any size; the first axis is the number of items, at least 1)"
        )
    return spec, shape


def _fits(shape: object, declared: tuple[int, ...]) -> TypeGuard[list[int]]:
    """Whether ``shape`` is a list of non-negative integers matching ``declared``
    (-1 matches any size), with at least one item."""
    if type(shape) is not list or len(shape) != len(declared) or not shape:
        return False
    for got, want in zip(shape, declared, strict=True):
        if type(got) is not int or got < 0 or (want != -1 and want != got):
            return False
    return bool(shape[0])


def _requested_outputs(
    value: object, config: ModelConfig, parameters: dict[str, Any]
) -> tuple[list[TensorSpec], frozenset[str]]:
    """The outputs asked for (all, when ``outputs`` is left out), and which of
    them go back as binary data."""
    binary_default = parameters.get("binary_data_output") is True
    if value is None:
        specs = list(config.outputs)
        return specs, frozenset(s.name for s in specs) if binary_default else frozenset()
    if type(value) is not list:
        raise BadRequest('"outputs" must be a list of {"name": ...}')
    specs, binary = [], set()
    for entry in value:
        name = entry.get("name") if type(entry) is dict else None
        spec = config.output(name) if type(name) is str else None
        if spec is None:
            raise BadRequest(
                f"unknown output {name!r}; model {config.name!r} gives {_names(config.outputs)}"
            )
        wants = _parameters(entry.get("parameters"), "outputs[].parameters").get(
            "binary_data", binary_default
        )
        if wants is True:
            binary.add(spec.name)
        specs.append(spec)
    return specs, frozenset(binary)
