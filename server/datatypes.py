"""The Open Inference Protocol v2 datatypes, and everything carpool knows of each.

``DATATYPES`` is the one table: model.toml accepts its names, the codec
checks JSON values against ``json_type`` and the range, the binary tensor
extension packs with ``struct``, the tensor kind builds its arrays with
``numpy``, and /openapi.json describes data and examples from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

JsonType = Literal["boolean", "integer", "number", "string"]


@dataclass(frozen=True, slots=True)
class Datatype:
    """One v2 datatype: how a value of it is written, checked and stored."""

    name: str
    # the JSON-schema type of one element; it also decides which Python
    # values a JSON ``data`` list may hold
    json_type: JsonType
    # the little-endian ``struct`` code of one element in binary data;
    # None for BYTES, whose elements are each prefixed by their length
    struct: str | None
    # the array element type a batch is built in; None for BYTES (text)
    numpy: type[np.generic] | None
    # the values an element may take, ends included: exact integers for the
    # integer types, the largest finite value for the floats, whose values
    # past it would turn into infinity
    low: float = -math.inf
    high: float = math.inf

    @property
    def zero(self) -> bool | int | str:
        """The value of an all-zero example (false, 0 or an empty text)."""
        if self.json_type == "boolean":
            return False
        return "" if self.json_type == "string" else 0


def _integer(name: str, code: str, numpy: type[np.generic], bits: int, signed: bool) -> Datatype:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return Datatype(name, "integer", code, numpy, low, high)


def _float(name: str, code: str, numpy: type[np.generic], largest: float) -> Datatype:
    return Datatype(name, "number", code, numpy, -largest, largest)


DATATYPES: dict[str, Datatype] = {
    datatype.name: datatype
    for datatype in (
        Datatype("BOOL", "boolean", "?", np.bool_),
        _integer("UINT8", "B", np.uint8, 8, signed=False),
        _integer("UINT16", "H", np.uint16, 16, signed=False),
        _integer("UINT32", "I", np.uint32, 32, signed=False),
        _integer("UINT64", "Q", np.uint64, 64, signed=False),
        _integer("INT8", "b", np.int8, 8, signed=True),
        _integer("INT16", "h", np.int16, 16, signed=True),
        _integer("INT32", "i", np.int32, 32, signed=True),
        _integer("INT64", "q", np.int64, 64, signed=True),
        _float("FP16", "e", np.float16, 65504.0),
        _float("FP32", "f", np.float32, 3.4028234663852886e38),
        # a double's range is JSON's own: orjson refuses what overflows it
        _float("FP64", "d", np.float64, math.inf),
        Datatype("BYTES", "string", None, None),
    )
}
