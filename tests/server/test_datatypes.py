"""``server/datatypes.py``: the one table of v2 datatypes, checked against
numpy and struct, and through the codec that reads it."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from server.datatypes import DATATYPES, Datatype
from server.errors import BadRequest
from server.repository import ModelConfig, TensorSpec
from server.request import decode_request
from server.response import encode_response

NUMERIC = [datatype for datatype in DATATYPES.values() if datatype.numpy is not None]


def one_value(datatype: str, value: Any) -> bytes:
    entry = {"name": "x", "datatype": datatype, "shape": [1], "data": [value]}
    return json.dumps({"inputs": [entry]}).encode()  # orjson cannot write past 64 bits


def of(datatype: str) -> ModelConfig:
    spec = TensorSpec("x", datatype, (-1,))
    return ModelConfig("m", "custom", Path("."), (spec,), (spec,))


@pytest.mark.parametrize("datatype", NUMERIC, ids=lambda datatype: datatype.name)
def test_a_datatypes_struct_code_numpy_type_and_range_agree(datatype: Datatype) -> None:
    assert datatype.struct is not None
    assert struct.calcsize(datatype.struct) == np.dtype(datatype.numpy).itemsize
    if datatype.json_type == "integer":
        info = np.iinfo(np.dtype(datatype.numpy))
        assert (datatype.low, datatype.high) == (int(info.min), int(info.max))
    elif datatype.json_type == "number" and datatype.name != "FP64":
        largest = float(np.finfo(np.dtype(datatype.numpy)).max)
        assert (datatype.low, datatype.high) == (-largest, largest)


@pytest.mark.parametrize(
    "datatype",
    [d for d in NUMERIC if d.json_type == "integer" or d.high < math.inf],
    ids=lambda datatype: datatype.name,
)
def test_a_value_at_either_end_of_a_datatypes_range_is_taken_and_one_past_it_refused(
    datatype: Datatype,
) -> None:
    config = of(datatype.name)
    for end in (datatype.low, datatype.high):
        assert decode_request(one_value(datatype.name, end), config).columns["x"] == [end]
    if datatype.json_type == "integer":
        past = (datatype.low - 1, datatype.high + 1)
    else:
        past = (datatype.low * 2, datatype.high * 2)
    for value in past:
        # past 64 bits orjson reads an integer as a float: refused all the same
        with pytest.raises(BadRequest, match=datatype.name):
            decode_request(one_value(datatype.name, value), config)


def test_integers_are_range_checked_only_where_a_float_type_cannot_hold_them() -> None:
    # FP32 and FP64 hold every integer JSON brings (within 2**64); FP16 does not
    for datatype in ("FP32", "FP64"):
        biggest = 2**64 - 1
        assert decode_request(one_value(datatype, biggest), of(datatype)).columns["x"] == [biggest]
    with pytest.raises(BadRequest, match="FP16"):
        decode_request(one_value("FP16", 65505), of("FP16"))
    with pytest.raises(BadRequest, match="FP16"):
        decode_request(one_value("FP16", -70000), of("FP16"))


@pytest.mark.parametrize("datatype", sorted(DATATYPES), ids=str)
def test_every_datatype_packs_and_unpacks_its_zero_in_binary(datatype: str) -> None:
    zero = DATATYPES[datatype].zero
    config = of(datatype)
    request = decode_request(one_value(datatype, zero), config)
    request.binary_outputs = frozenset({"x"})
    payload, length = encode_response(config, request, [{"x": zero}])
    assert length is not None
    header = orjson.dumps({"inputs": orjson.loads(payload[:length])["outputs"]})
    again = decode_request(header + payload[length:], config, len(header))  # sent back as input
    assert again.columns == {"x": [zero]}
