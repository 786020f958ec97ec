"""An input's JSON ``data``: flattened to one row-major list, its values checked
against the input's datatype (type and range) before anything is queued."""

from __future__ import annotations

import math
from itertools import chain
from typing import Any

from server.datatypes import DATATYPES
from server.errors import BadRequest
from server.repository import TensorSpec

_NUMBER = frozenset({int, float})
_INT = frozenset({int})
_BOOL = frozenset({bool})
_STR = frozenset({str})
_INT_REACH = 2.0**64  # orjson reads integers within +-2**64; larger ones come as floats
_TYPE_NAMES = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    list: "list",
    dict: "object",
}


def flatten(name: str, data: list[Any], shape: list[int]) -> list[Any]:
    """``data`` as one flat list, whether it came flat or nested as ``shape``."""
    for depth, dim in enumerate(shape[1:], start=1):
        if not data or type(data[0]) is not list:
            return data  # already flat (or ragged: the count check says so)
        if not all(type(row) is list and len(row) == dim for row in data):
            raise BadRequest(
                f"input {name!r}: nested data does not match the shape {shape} at depth {depth}"
            )
        data = list(chain.from_iterable(data))
    return data


def check_values(spec: TensorSpec, data: list[Any]) -> None:
    """Raise BadRequest unless every value is of ``spec``'s datatype and in its range."""
    datatype = DATATYPES[spec.datatype]
    name = datatype.name
    types = set(map(type, data))
    if datatype.json_type == "number":
        if not types <= _NUMBER:
            raise BadRequest(
                f"input {spec.name!r}: {name} data must be numbers, found {_type_names(types - _NUMBER)}"
            )
        # JSON's integers reach every float type's range but FP16's, and FP64's
        # range is JSON's own: most requests need no pass over their values
        reach = _INT_REACH if float not in types else math.inf
        if (
            data
            and datatype.high < reach
            and (max(data) > datatype.high or min(data) < datatype.low)
        ):
            raise BadRequest(f"input {spec.name!r}: a value is outside the {name} range")
    elif datatype.json_type == "integer":
        if not types <= _INT:
            raise BadRequest(
                f"input {spec.name!r}: {name} data must be integers, found {_type_names(types - _INT)}"
            )
        low, high = datatype.low, datatype.high
        if data and (min(data) < low or max(data) > high):
            raise BadRequest(
                f"input {spec.name!r}: a value is outside the {name} range [{low}, {high}]"
            )
    elif datatype.json_type == "boolean":
        if not types <= _BOOL:
            raise BadRequest(f"input {spec.name!r}: BOOL data must be true or false")
    elif not types <= _STR:
        raise BadRequest(
            f"input {spec.name!r}: BYTES data must be strings, found {_type_names(types - _STR)}"
        )


def _type_names(types: set[type]) -> str:
    return ", ".join(
        sorted(_TYPE_NAMES.get(t, "null" if t is type(None) else t.__name__) for t in types)
    )
