"""The binary tensor extension: tensors as raw little-endian bytes after the
JSON header, each input's length in its ``parameters.binary_data_size``.

Fixed-size datatypes are packed with ``struct``; a BYTES tensor is its
elements in order, each prefixed by its length as a 4-byte unsigned integer.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from server.datatypes import DATATYPES
from server.errors import BadRequest
from server.repository import TensorSpec


def unpack(spec: TensorSpec, raw: memoryview, size: int) -> list[Any]:
    """The ``size`` values of input ``spec`` in ``raw``, as a flat list."""
    datatype = DATATYPES[spec.datatype]
    code = datatype.struct
    if code is None:
        return _bytes_elements(spec.name, raw, size)
    width = struct.calcsize(code)
    if len(raw) != size * width:
        raise BadRequest(
            f"input {spec.name!r}: {size} {spec.datatype} values take {size * width} bytes, got {len(raw)}"
        )
    values = list(struct.unpack(f"<{size}{code}", raw))
    # JSON cannot spell them, so binary data may not smuggle them in either
    if datatype.json_type == "number" and not all(map(math.isfinite, values)):
        raise BadRequest(f"input {spec.name!r}: NaN and infinity are not accepted")
    return values


def pack(datatype: str, data: list[Any]) -> bytes:
    """A flat list of output values as the raw bytes of the extension."""
    code = DATATYPES[datatype].struct
    if code is None:
        parts = []
        for value in data:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return struct.pack(f"<{len(data)}{code}", *data)


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
