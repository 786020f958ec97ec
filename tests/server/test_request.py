"""The v2 codec, specified without a server: ``decode_request`` and
``encode_response`` (``server/request.py``, ``server/response.py`` and the
JSON and binary data forms they use) against hand-built model configs."""

from __future__ import annotations

import contextlib
import math
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import BadRequest
from server.repository import ModelConfig, TensorSpec
from server.request import InferRequest, decode_request
from server.response import encode_response

# An image-like model: one FP32 input of fixed item shape, two outputs.
IMAGE = ModelConfig(
    name="image",
    kind="custom",
    folder=Path("."),
    inputs=(TensorSpec("x", "FP32", (-1, 2, 3)),),
    outputs=(TensorSpec("y", "FP32", (-1, 2)), TensorSpec("label", "INT64", (-1,))),
)
# Several inputs of different datatypes, and a BYTES output.
MIXED = ModelConfig(
    name="mixed",
    kind="custom",
    folder=Path("."),
    inputs=(
        TensorSpec("x", "FP32", (-1, 2)),
        TensorSpec("t", "BYTES", (-1,)),
        TensorSpec("k", "INT8", (-1,)),
        TensorSpec("b", "BOOL", (-1,)),
    ),
    outputs=(TensorSpec("s", "BYTES", (-1,)), TensorSpec("v", "FP32", (-1, -1))),
)
# Any shape at all past the batch axis: for the round-trip property.
ANY = ModelConfig(
    name="any",
    kind="custom",
    folder=Path("."),
    inputs=(TensorSpec("v", "FP32", (-1, -1, -1)),),
    outputs=(TensorSpec("v", "FP32", (-1, -1, -1)),),
)


def body(*inputs: Any, **fields: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **fields})


def x_entry(count: int = 1, **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "x",
        "datatype": "FP32",
        "shape": [count, 2, 3],
        "data": [float(i) for i in range(6 * count)],
    }
    entry.update(changes)
    return entry


def mixed_entries(**changes: dict[str, Any]) -> list[dict[str, Any]]:
    entries = {
        "x": {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]},
        "t": {"name": "t", "datatype": "BYTES", "shape": [2], "data": ["a", "bc"]},
        "k": {"name": "k", "datatype": "INT8", "shape": [2], "data": [-128, 127]},
        "b": {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
    }
    for name, change in changes.items():
        entries[name] = {**entries[name], **change}
    return list(entries.values())


def binary_body(header: dict[str, Any], raw: bytes) -> tuple[bytes, int]:
    json = orjson.dumps(header)
    return json + raw, len(json)


def bytes_elements(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(value)) + value for value in values)


# -- decoding ---------------------------------------------------------------------


def test_flat_data_decodes_to_one_flat_column_per_input() -> None:
    request = decode_request(body(x_entry(2)), IMAGE)
    assert request.count == 2
    assert request.columns == {"x": [float(i) for i in range(12)]}


def test_nested_data_decodes_to_the_same_flat_column_as_flat_data() -> None:
    nested = [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    request = decode_request(body(x_entry(2, data=nested)), IMAGE)
    assert request.columns == {"x": list(range(12))}


def test_id_and_parameters_are_kept_and_every_output_is_returned_as_json_by_default() -> None:
    request = decode_request(body(x_entry(), id="r1", parameters={"p": 1}), IMAGE)
    assert request.id == "r1"
    assert request.parameters == {"p": 1}
    assert [spec.name for spec in request.outputs] == ["y", "label"]
    assert request.binary_outputs == frozenset()


def test_inputs_of_several_datatypes_decode_together() -> None:
    request = decode_request(body(*mixed_entries()), MIXED)
    assert request.count == 2
    assert request.columns == {
        "x": [1.0, 2.0, 3.0, 4.0],
        "t": ["a", "bc"],
        "k": [-128, 127],
        "b": [True, False],
    }


def test_a_binary_fp32_input_decodes_from_the_bytes_after_the_json_header() -> None:
    values = [0.5, -1.25, 3.0, 4.5, 1e-3, 7.0]
    raw = struct.pack("<6f", *values)
    entry: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [1, 2, 3]}
    entry["parameters"] = {"binary_data_size": len(raw)}
    data, length = binary_body({"inputs": [entry]}, raw)
    request = decode_request(data, IMAGE, length)
    assert request.columns["x"] == [struct.unpack("<f", struct.pack("<f", v))[0] for v in values]


def test_binary_bytes_and_binary_numbers_decode_beside_json_inputs() -> None:
    texts = bytes_elements("héllo".encode(), b"")
    numbers = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    entries = mixed_entries(
        t={"data": None, "parameters": {"binary_data_size": len(texts)}},
        x={"data": None, "parameters": {"binary_data_size": len(numbers)}},
    )
    # the binary chunks follow in the order of the inputs that claim them
    data, length = binary_body({"inputs": entries}, numbers + texts)
    request = decode_request(data, MIXED, length)
    assert request.columns["x"] == [1.0, 2.0, 3.0, 4.0]
    assert request.columns["t"] == ["héllo", ""]
    assert request.columns["k"] == [-128, 127]


def test_binary_data_output_asks_for_every_output_in_binary() -> None:
    request = decode_request(body(x_entry(), parameters={"binary_data_output": True}), IMAGE)
    assert request.binary_outputs == frozenset({"y", "label"})


def test_an_output_s_own_binary_data_overrides_the_request_default() -> None:
    outputs = [{"name": "label"}, {"name": "y", "parameters": {"binary_data": False}}]
    request = decode_request(
        body(x_entry(), outputs=outputs, parameters={"binary_data_output": True}), IMAGE
    )
    assert [spec.name for spec in request.outputs] == ["label", "y"]
    assert request.binary_outputs == frozenset({"label"})


# -- encoding ---------------------------------------------------------------------


def request_for(config: ModelConfig, outputs: list[str], binary: set[str]) -> InferRequest:
    specs = [spec for name in outputs for spec in config.outputs if spec.name == name]
    return InferRequest("r1", 2, {}, specs, frozenset(binary), {})


def test_json_outputs_join_the_items_with_the_batch_axis_first() -> None:
    results = [{"y": [1.0, 2.0], "label": 3}, {"y": [4.0, 5.0], "label": 6}]
    payload, header_length = encode_response(
        IMAGE, request_for(IMAGE, ["y", "label"], set()), results
    )
    assert header_length is None
    assert orjson.loads(payload) == {
        "model_name": "image",
        "model_version": "1",
        "id": "r1",
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 4.0, 5.0]},
            {"name": "label", "datatype": "INT64", "shape": [2], "data": [3, 6]},
        ],
    }


def test_an_output_of_free_item_shape_takes_its_shape_from_the_results() -> None:
    results = [{"s": "a", "v": [1.0, 2.0, 3.0]}, {"s": "b", "v": [4.0, 5.0, 6.0]}]
    payload, _ = encode_response(MIXED, request_for(MIXED, ["v"], set()), results)
    (output,) = orjson.loads(payload)["outputs"]
    assert output["shape"] == [2, 3]


def test_binary_outputs_follow_the_json_header_in_order() -> None:
    results = [{"y": [1.5, 2.5], "label": 3}, {"y": [4.5, 5.5], "label": -6}]
    payload, header_length = encode_response(
        IMAGE, request_for(IMAGE, ["y", "label"], {"y", "label"}), results
    )
    assert header_length is not None
    header = orjson.loads(payload[:header_length])
    sizes = [output["parameters"]["binary_data_size"] for output in header["outputs"]]
    assert sizes == [16, 16]
    assert all("data" not in output for output in header["outputs"])
    raw = payload[header_length:]
    assert struct.unpack("<4f", raw[:16]) == (1.5, 2.5, 4.5, 5.5)
    assert struct.unpack("<2q", raw[16:]) == (3, -6)


def test_binary_bytes_outputs_are_length_prefixed() -> None:
    results = [{"s": "é", "v": [1.0]}, {"s": "", "v": [2.0]}]
    payload, header_length = encode_response(MIXED, request_for(MIXED, ["s"], {"s"}), results)
    assert header_length is not None
    assert payload[header_length:] == bytes_elements("é".encode(), b"")


# -- every bad request is a BadRequest that says where ------------------------------

X = {"name": "x", "datatype": "FP32", "shape": [1, 2, 3]}
BAD: list[Any] = [
    pytest.param(IMAGE, b"{", None, ["not valid JSON"], id="malformed-json"),
    pytest.param(IMAGE, b"[]", None, ["JSON object"], id="not-an-object"),
    pytest.param(IMAGE, body(x_entry(), extra=1), None, ["extra"], id="unknown-field"),
    pytest.param(IMAGE, body(x_entry(), id=5), None, ['"id"'], id="id-not-a-string"),
    pytest.param(IMAGE, body(x_entry(), parameters=[]), None, ['"parameters"'], id="parameters"),
    pytest.param(IMAGE, b"{}", None, ['"inputs"', "x (FP32 [-1, 2, 3])"], id="no-inputs"),
    pytest.param(IMAGE, body(), None, ['"inputs"'], id="empty-inputs"),
    pytest.param(IMAGE, b'{"inputs": 1}', None, ['"inputs"'], id="inputs-not-a-list"),
    pytest.param(IMAGE, body(3), None, ["inputs[0]"], id="input-not-an-object"),
    pytest.param(IMAGE, body(x_entry(name="z")), None, ["inputs[0]", "'z'"], id="unknown-input"),
    pytest.param(IMAGE, body(x_entry(name=None)), None, ["inputs[0]", "None"], id="no-name"),
    pytest.param(IMAGE, body(x_entry(datatype="FP16")), None, ["'x'", "FP16"], id="datatype"),
    pytest.param(IMAGE, body(x_entry(shape=[6])), None, ["'x'", "[6]"], id="rank"),
    pytest.param(IMAGE, body(x_entry(shape=[1, 3, 2])), None, ["'x'", "[1, 3, 2]"], id="dims"),
    pytest.param(IMAGE, body(x_entry(shape=[1, 2, -3])), None, ["'x'", "-3"], id="negative"),
    pytest.param(IMAGE, body(x_entry(shape=[True, 2, 3])), None, ["'x'"], id="bool-dim"),
    pytest.param(IMAGE, body(x_entry(shape="1,2,3")), None, ["'x'"], id="shape-string"),
    pytest.param(IMAGE, body(x_entry(shape=[0, 2, 3], data=[])), None, ["'x'"], id="no-items"),
    pytest.param(IMAGE, body(x_entry(), x_entry()), None, ["'x'", "twice"], id="twice"),
    pytest.param(IMAGE, body(x_entry(data=5)), None, ["'x'", '"data"'], id="data-not-a-list"),
    pytest.param(IMAGE, body(x_entry(data=None)), None, ["'x'", '"data"'], id="no-data"),
    pytest.param(IMAGE, body(x_entry(data=[1.0] * 5)), None, ["'x'", "6 values", "5"], id="count"),
    pytest.param(
        IMAGE,
        body(x_entry(data=[[[1, 2, 3], [4, 5]]])),
        None,
        ["'x'", "nested", "depth 2"],
        id="ragged",
    ),
    pytest.param(
        IMAGE, body(x_entry(data=[[1, 2, 3], [4, 5, 6]])), None, ["'x'"], id="short-nesting"
    ),
    pytest.param(
        IMAGE, body(x_entry(data=[1, 2, 3, 4, 5, "6"])), None, ["'x'", "string"], id="string"
    ),
    pytest.param(
        IMAGE, body(x_entry(data=[1, 2, 3, 4, 5, True])), None, ["'x'", "boolean"], id="bool"
    ),
    pytest.param(
        IMAGE, body(x_entry(data=[1, 2, 3, 4, 5, None])), None, ["'x'", "null"], id="null"
    ),
    pytest.param(
        IMAGE, body(x_entry(data=[1, 2, 3, 4, 5, 1e39])), None, ["'x'", "FP32 range"], id="big"
    ),
    pytest.param(
        IMAGE, body(x_entry(data=[-1e39, 2, 3, 4, 5, 6])), None, ["'x'", "FP32"], id="small"
    ),
    pytest.param(
        MIXED, body(*mixed_entries(k={"data": [0, 128]})), None, ["'k'", "INT8"], id="int-range"
    ),
    pytest.param(
        MIXED, body(*mixed_entries(k={"data": [0, 1.5]})), None, ["'k'", "integers"], id="float"
    ),
    pytest.param(
        MIXED, body(*mixed_entries(b={"data": [1, 0]})), None, ["'b'", "BOOL"], id="bool-ints"
    ),
    pytest.param(
        MIXED, body(*mixed_entries(t={"data": ["a", 2]})), None, ["'t'", "strings"], id="bytes"
    ),
    pytest.param(
        MIXED,
        body(*mixed_entries(t={"shape": [3], "data": ["a", "b", "c"]})),
        None,
        ["'t'", "3 items", "2"],
        id="item-counts-differ",
    ),
    pytest.param(MIXED, body(*mixed_entries()[:2]), None, ["missing", "'k'", "'b'"], id="missing"),
    pytest.param(
        IMAGE,
        body(x_entry(), outputs=[{"name": "z"}]),
        None,
        ["output 'z'", "y (FP32 [-1, 2])"],
        id="unknown-output",
    ),
    pytest.param(IMAGE, body(x_entry(), outputs={}), None, ['"outputs"'], id="outputs-object"),
    pytest.param(
        IMAGE,
        body(x_entry(parameters=[])),
        None,
        ["inputs[0].parameters"],
        id="input-parameters-not-an-object",
    ),
    pytest.param(
        IMAGE,
        body({**X, "parameters": {"binary_data_size": 24}}),
        None,
        ["'x'", "Inference-Header-Content-Length"],
        id="binary-without-header",
    ),
    pytest.param(
        IMAGE,
        *binary_body({"inputs": [{**X, "parameters": {"binary_data_size": -1}}]}, b""),
        ["'x'", "binary_data_size"],
        id="binary-size-negative",
    ),
    pytest.param(
        IMAGE,
        *binary_body({"inputs": [{**X, "parameters": {"binary_data_size": 24}}]}, bytes(20)),
        ["'x'", "ends inside"],
        id="binary-body-too-short",
    ),
    pytest.param(
        IMAGE,
        *binary_body({"inputs": [{**X, "parameters": {"binary_data_size": 20}}]}, bytes(20)),
        ["'x'", "24 bytes", "20"],
        id="binary-size-not-the-shape-s",
    ),
    pytest.param(
        IMAGE,
        *binary_body(
            {"inputs": [{**X, "parameters": {"binary_data_size": 24}}]},
            struct.pack("<6f", 1, 2, 3, 4, 5, math.nan),
        ),
        ["'x'", "NaN"],
        id="binary-nan",
    ),
    pytest.param(
        IMAGE,
        *binary_body({"inputs": [x_entry()]}, b"\x00" * 4),
        ["4 bytes", "no input claims"],
        id="binary-unclaimed",
    ),
    pytest.param(IMAGE, b'{"inputs": []}', 0, ["Inference-Header-Content-Length"], id="header-0"),
    pytest.param(
        IMAGE, b'{"inputs": []}', 99, ["Inference-Header-Content-Length", "99"], id="header-long"
    ),
    pytest.param(
        MIXED,
        *binary_body(
            {"inputs": mixed_entries(t={"data": None, "parameters": {"binary_data_size": 6}})},
            bytes_elements(b"ab"),
        ),
        ["'t'", "ends early"],
        id="binary-bytes-too-few",
    ),
    pytest.param(
        MIXED,
        *binary_body(
            {"inputs": mixed_entries(t={"data": None, "parameters": {"binary_data_size": 15}})},
            bytes_elements(b"a", b"b", b"c"),
        ),
        ["'t'", "more than 2"],
        id="binary-bytes-too-many",
    ),
    pytest.param(
        MIXED,
        *binary_body(
            {"inputs": mixed_entries(t={"data": None, "parameters": {"binary_data_size": 10}})},
            bytes_elements(b"\xff", b"a"),
        ),
        ["'t'", "UTF-8"],
        id="binary-bytes-not-utf8",
    ),
]


@pytest.mark.parametrize(("config", "data", "header_length", "fragments"), BAD)
def test_a_bad_request_raises_bad_request_naming_the_field(
    config: ModelConfig, data: bytes, header_length: int | None, fragments: list[str]
) -> None:
    with pytest.raises(BadRequest) as raised:
        decode_request(data, config, header_length)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message


def test_a_negative_binary_data_size_is_not_reported_as_a_missing_header() -> None:
    data, length = binary_body({"inputs": [{**X, "parameters": {"binary_data_size": -1}}]}, b"")
    with pytest.raises(BadRequest) as raised:
        decode_request(data, IMAGE, length)
    assert "'x'" in str(raised.value)
    assert "needs an Inference-Header-Content-Length" not in str(raised.value)


# -- properties -----------------------------------------------------------------------

fp32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
shapes = st.tuples(st.integers(1, 4), st.integers(0, 4), st.integers(0, 4))


def nest(flat: list[float], shape: tuple[int, ...]) -> list[Any]:
    if len(shape) == 1:
        return flat
    stride = len(flat) // shape[0] if shape[0] else 0
    return [nest(flat[i * stride : (i + 1) * stride], shape[1:]) for i in range(shape[0])]


@settings(deadline=None, max_examples=200)
@given(data=st.data(), shape=shapes, nested=st.booleans())
def test_any_fp32_tensor_survives_a_json_round_trip(
    data: st.DataObject, shape: tuple[int, int, int], nested: bool
) -> None:
    flat = data.draw(st.lists(fp32, min_size=math.prod(shape), max_size=math.prod(shape)))
    entry = {"name": "v", "datatype": "FP32", "shape": list(shape)}
    entry["data"] = nest(flat, shape) if nested else flat
    request = decode_request(body(entry), ANY)
    assert request.count == shape[0]
    assert request.columns["v"] == flat


@settings(deadline=None, max_examples=200)
@given(data=st.data(), shape=shapes)
def test_any_fp32_tensor_survives_a_binary_round_trip(
    data: st.DataObject, shape: tuple[int, int, int]
) -> None:
    flat = data.draw(st.lists(fp32, min_size=math.prod(shape), max_size=math.prod(shape)))
    raw = struct.pack(f"<{len(flat)}f", *flat)
    entry: dict[str, Any] = {"name": "v", "datatype": "FP32", "shape": list(shape)}
    entry["parameters"] = {"binary_data_size": len(raw)}
    payload, length = binary_body({"inputs": [entry]}, raw)
    request = decode_request(payload, ANY, length)
    assert request.columns["v"] == flat


def decodes_or_refuses(payload: bytes, config: ModelConfig, header_length: int | None) -> None:
    with contextlib.suppress(BadRequest):
        decode_request(payload, config, header_length)


@settings(deadline=None, max_examples=300)
@given(payload=st.binary(max_size=512), header_length=st.none() | st.integers(-2, 600))
def test_arbitrary_bytes_either_decode_or_raise_bad_request(
    payload: bytes, header_length: int | None
) -> None:
    decodes_or_refuses(payload, IMAGE, header_length)


# Documents built from the words a request is made of, so that most of them
# get past the JSON parser and deep into validation.
WORDS = ["inputs", "outputs", "name", "datatype", "shape", "data", "parameters", "id"]
WORDS += ["binary_data_size", "binary_data", "binary_data_output", "x", "t", "k", "b", "s", "v"]
WORDS += ["FP32", "BYTES", "INT8", "BOOL"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(WORDS)
    | st.text(max_size=4)
)
documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(WORDS), inner, max_size=6)
    ),
    max_leaves=30,
)

# Requests that are nearly right for the model: each field is most often
# valid, so that many of them get deep into validation, and some all the way.
VALUES = {
    "FP32": st.floats(width=32, allow_nan=False, allow_infinity=False) | st.integers(-9, 9),
    "BYTES": st.text(max_size=5),
    "INT8": st.integers(-130, 130),
    "BOOL": st.booleans(),
}
PACK = {"FP32": "f", "INT8": "b", "BOOL": "?"}


def nearly(
    valid: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any] = scalars, odds: int = 6
) -> st.SearchStrategy[Any]:
    """``valid``, and now and then (about one time in ``odds``) ``wrong``."""
    return st.integers(0, odds).flatmap(lambda pick: wrong if pick == 0 else valid)


@st.composite
def near_requests(draw: st.DrawFn, config: ModelConfig, odds: int = 6) -> tuple[bytes, int | None]:
    """A body and its Inference-Header-Content-Length, each field wrong one time in ``odds``."""
    count = draw(st.integers(1, 3))
    every = st.permutations(config.inputs)
    specs = draw(
        nearly(every, st.lists(st.sampled_from(config.inputs), min_size=1, max_size=5), odds)
    )
    entries: list[Any] = []
    binary = b""
    for spec in specs:
        shape: Any = [count, *(d if d >= 0 else draw(st.integers(0, 2)) for d in spec.item_shape)]
        shape = draw(nearly(st.just(shape), st.lists(st.integers(-1, 3), max_size=4), odds))
        regular = type(shape) is list and bool(shape) and all(type(d) is int for d in shape)
        size = math.prod(shape) if regular else 1
        size = max(0, min(size, 12) + draw(nearly(st.just(0), st.sampled_from([-1, 1]), odds)))
        values = draw(
            st.lists(nearly(VALUES[spec.datatype], odds=odds * 6), min_size=size, max_size=size)
        )
        entry: dict[str, Any] = {
            "name": draw(nearly(st.just(spec.name), odds=odds)),
            "datatype": draw(nearly(st.just(spec.datatype), odds=odds)),
            "shape": shape,
        }
        if draw(st.booleans()):
            nested = regular and size > 0 and draw(st.booleans())
            entry["data"] = nest(values, tuple(shape)) if nested else values
        else:
            try:
                if spec.datatype == "BYTES":
                    raw = bytes_elements(*(str(value).encode() for value in values))
                else:
                    raw = struct.pack(f"<{size}{PACK[spec.datatype]}", *values)
            except (struct.error, TypeError, OverflowError):
                raw = draw(st.binary(max_size=16))
            claimed = len(raw) + draw(nearly(st.just(0), st.sampled_from([-1, 1]), odds))
            entry["parameters"] = {"binary_data_size": draw(nearly(st.just(claimed), odds=odds))}
            binary += raw
        entries.append(draw(nearly(st.just(entry), odds=odds * 3)))
    document: dict[str, Any] = {"inputs": entries}
    if draw(st.booleans()):
        names = st.sampled_from([spec.name for spec in config.outputs]) | scalars
        outputs = st.fixed_dictionaries(
            {"name": names},
            optional={"parameters": st.dictionaries(st.just("binary_data"), scalars)},
        )
        document["outputs"] = draw(nearly(st.lists(outputs, max_size=3), documents, odds))
    if draw(st.booleans()):
        document["parameters"] = {"binary_data_output": draw(scalars)}
    header = orjson.dumps(document)
    if not binary and draw(st.booleans()):
        return header, None
    return header + binary, len(header)


def test_nearly_right_requests_are_sometimes_right() -> None:
    """The strategy reaches the end of validation, not just its start: even
    for the model with four inputs, some of its requests are valid."""
    config = MIXED
    decoded: list[InferRequest] = []

    @settings(deadline=None, max_examples=100, database=None, derandomize=True)
    @given(request=near_requests(config, odds=40))
    def attempt(request: tuple[bytes, int | None]) -> None:
        with contextlib.suppress(BadRequest):
            decoded.append(decode_request(request[0], config, request[1]))

    attempt()
    assert decoded


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), config=st.sampled_from([IMAGE, MIXED, ANY]))
def test_nearly_right_requests_either_decode_or_raise_bad_request(
    data: st.DataObject, config: ModelConfig
) -> None:
    payload, header_length = data.draw(near_requests(config))
    decodes_or_refuses(payload, config, header_length)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from([IMAGE, MIXED, ANY]),
    document=documents,
    tail=st.none() | st.binary(max_size=64),
)
def test_arbitrary_documents_either_decode_or_raise_bad_request(
    config: ModelConfig, document: Any, tail: bytes | None
) -> None:
    header = orjson.dumps(document)
    if tail is None:
        decodes_or_refuses(header, config, None)
    else:
        decodes_or_refuses(header + tail, config, len(header))
