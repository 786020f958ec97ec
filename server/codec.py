"""Open Inference Protocol v2 (KServe v2 REST) request and response bodies.

``decode_request`` parses and validates an infer request against the model's
declared inputs: every error is a ``BadRequest`` naming the field, raised
before anything is queued. Both data forms are accepted: JSON (flat or nested
``data``) and the binary tensor extension (``Inference-Header-Content-Length``
with ``parameters.binary_data_size`` per input), which standard clients such
as tritonclient use by default.

``encode_response`` joins the per-item results again, as JSON ``data`` or as
binary output when the request asked for it (``binary_data_output`` or an
output's ``binary_data``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import orjson

from server.errors import BadRequest
from server.repository import ModelConfig, TensorSpec

_FLOAT_MAX = {"FP16": 65504.0, "FP32": 3.4028234663852886e38, "FP64": math.inf}
_INT_RANGE = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}
_STRUCT = {
    "BOOL": "?",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
_NUMBER = frozenset({int, float})
_INT = frozenset({int})
_BOOL = frozenset({bool})
_STR = frozenset({str})
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
        params = _parameters(entry.get("parameters"), f"inputs[{position}].parameters")
        binary_size = params.get("binary_data_size")
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
            data = _from_binary(spec, chunk, size)
        else:
            data = entry.get("data")
            if type(data) is not list:
                raise BadRequest(f'input {spec.name!r}: "data" must be a list')
            data = _flatten(spec.name, data, shape)
            if len(data) != size:
                raise BadRequest(
                    f"input {spec.name!r}: shape {shape} needs {size} values, the data has {len(data)}"
                )
            _check_values(spec, data)
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


def encode_response(
    config: ModelConfig, request: InferRequest, results: Sequence[dict[str, Any]]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when it has binary data."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for spec in request.outputs:
        data = _gather(spec, results)
        shape = [len(results), *_item_shape(spec, results)]
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": shape}
        if spec.name in request.binary_outputs:
            raw = _to_binary(spec.datatype, data)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": config.name, "model_version": config.version}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = outputs
    header = orjson.dumps(doc)
    if chunks:
        return header + b"".join(chunks), len(header)
    return header, None


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


# -- inputs ----------------------------------------------------------------


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
    if (
        type(shape) is not list
        or len(shape) != len(spec.shape)
        or not all(type(d) is int and d >= 0 for d in shape)
        or not all(want in (-1, got) for want, got in zip(spec.shape, shape, strict=True))
        or shape[0] == 0
    ):
        raise BadRequest(
            f"input {spec.name!r}: shape {shape!r} does not fit {list(spec.shape)} "
            "(-1 is any size; the first axis is the number of items, at least 1)"
        )
    return spec, shape


def _flatten(name: str, data: list[Any], shape: list[int]) -> list[Any]:
    for depth, dim in enumerate(shape[1:], start=1):
        if not data or type(data[0]) is not list:
            return data  # already flat (or ragged: the count check says so)
        if not all(type(row) is list and len(row) == dim for row in data):
            raise BadRequest(
                f"input {name!r}: nested data does not match the shape {shape} at depth {depth}"
            )
        data = list(chain.from_iterable(data))
    return data


def _check_values(spec: TensorSpec, data: list[Any]) -> None:
    datatype = spec.datatype
    types = set(map(type, data))
    if datatype in _FLOAT_MAX:
        if not types <= _NUMBER:
            raise BadRequest(
                f"input {spec.name!r}: {datatype} data must be numbers, found {_type_names(types - _NUMBER)}"
            )
        limit = _FLOAT_MAX[datatype]
        if data and (max(data) > limit or min(data) < -limit):
            raise BadRequest(f"input {spec.name!r}: a value is outside the {datatype} range")
    elif datatype in _INT_RANGE:
        if not types <= _INT:
            raise BadRequest(
                f"input {spec.name!r}: {datatype} data must be integers, found {_type_names(types - _INT)}"
            )
        low, high = _INT_RANGE[datatype]
        if data and (min(data) < low or max(data) > high):
            raise BadRequest(
                f"input {spec.name!r}: a value is outside the {datatype} range [{low}, {high}]"
            )
    elif datatype == "BOOL":
        if not types <= _BOOL:
            raise BadRequest(f"input {spec.name!r}: BOOL data must be true or false")
    elif not types <= _STR:
        raise BadRequest(
            f"input {spec.name!r}: BYTES data must be strings, found {_type_names(types - _STR)}"
        )


def _type_names(types: set[type]) -> str:
    names = {
        int: "integer",
        float: "number",
        str: "string",
        bool: "boolean",
        list: "list",
        dict: "object",
    }
    return ", ".join(sorted(names.get(t, "null" if t is type(None) else t.__name__) for t in types))


def _from_binary(spec: TensorSpec, raw: memoryview, size: int) -> list[Any]:
    if spec.datatype == "BYTES":
        return _bytes_elements(spec.name, raw, size)
    code = _STRUCT[spec.datatype]
    width = struct.calcsize(code)
    if len(raw) != size * width:
        raise BadRequest(
            f"input {spec.name!r}: {size} {spec.datatype} values take {size * width} bytes, got {len(raw)}"
        )
    values = list(struct.unpack(f"<{size}{code}", raw))
    if spec.datatype in _FLOAT_MAX and not all(map(math.isfinite, values)):
        raise BadRequest(f"input {spec.name!r}: NaN and infinity are not accepted")
    return values


def _bytes_elements(name: str, raw: memoryview, size: int) -> list[Any]:
    values: list[Any] = []
    offset = 0
    for _ in range(size):
        if offset + 4 > len(raw):
            raise BadRequest(f"input {name!r}: binary BYTES data ends early")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest(f"input {name!r}: binary BYTES data ends early")
        try:
            values.append(str(raw[offset : offset + length], "utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(f"input {name!r}: BYTES elements must be UTF-8 text") from None
        offset += length
    if offset != len(raw):
        raise BadRequest(f"input {name!r}: binary BYTES data holds more than {size} elements")
    return values


# -- outputs ---------------------------------------------------------------


def _requested_outputs(
    value: object, config: ModelConfig, parameters: dict[str, Any]
) -> tuple[list[TensorSpec], frozenset[str]]:
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


def _gather(spec: TensorSpec, results: Sequence[dict[str, Any]]) -> list[Any]:
    name = spec.name
    values = [result[name] for result in results]
    for _ in spec.item_shape:
        values = list(chain.from_iterable(values))
    return values


def _item_shape(spec: TensorSpec, results: Sequence[dict[str, Any]]) -> list[int]:
    if -1 not in spec.item_shape:
        return list(spec.item_shape)
    shape, value = [], results[0][spec.name] if results else []
    for _ in spec.item_shape:
        shape.append(len(value))
        value = value[0] if value else []
    return shape


def _to_binary(datatype: str, data: list[Any]) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in data:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return struct.pack(f"<{len(data)}{_STRUCT[datatype]}", *data)
