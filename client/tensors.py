"""Tensors into v2 requests and out of v2 answers, with numpy where installed.

An input is a numpy array, a (nested) list or a scalar; it is converted to
the datatype the model declares. One with an axis fewer than the declared
shape is a single item: it is sent as a batch of one, and its answer comes
back without the item axis. Numeric numpy arrays travel as raw
little-endian bytes (the binary tensor extension); everything else as JSON.
Outputs are numpy arrays when numpy is installed, nested lists otherwise.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import numpy as np
except ImportError:  # lists work without it
    np = None  # type: ignore[assignment]

# v2 datatype -> numpy dtype (explicitly little-endian) and struct code
_DTYPES = {
    "BOOL": "?",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
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

# without numpy, list values are cast by the datatype's first two letters
_CASTS: dict[str, type] = {"FP": float, "IN": int, "UI": int, "BO": bool}


@dataclass(frozen=True, slots=True)
class Spec:
    """A model's declared input, from its metadata."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, metadata: Mapping[str, Any]) -> list[Spec]:
        return [
            cls(entry["name"], entry["datatype"], tuple(entry["shape"]))
            for entry in metadata["inputs"]
        ]


@dataclass(slots=True)
class Encoded:
    """A request's inputs: v2 entries, the raw bytes some of them point to,
    and whether the caller gave a single item (its answer drops the axis)."""

    inputs: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    single: bool = False


def encode(specs: Sequence[Spec], inputs: Any, *, binary: bool = True) -> Encoded:
    """``inputs``: a mapping from input name to value, or a bare value for a
    model with one input."""
    if not isinstance(inputs, Mapping):
        if len(specs) != 1:
            raise ValueError(f"this model takes {_names(specs)}: pass a dict of them")
        inputs = {specs[0].name: inputs}
    known = {spec.name: spec for spec in specs}
    problems = []
    if unknown := sorted(set(inputs) - set(known)):
        problems.append(f"unknown {unknown}")
    if missing := sorted(set(known) - set(inputs)):
        problems.append(f"missing {missing}")
    if problems:
        raise ValueError(f"this model takes {_names(specs)} ({'; '.join(problems)})")
    encoded = Encoded()
    singles = set()
    for name, value in inputs.items():
        entry, chunk, single = _encode_one(known[name], value, binary)
        encoded.inputs.append(entry)
        if chunk is not None:
            encoded.chunks.append(chunk)
        singles.add(single)
    if len(singles) > 1:
        raise ValueError("give every input as one item, or every input as a batch, not a mix")
    encoded.single = singles.pop()
    return encoded


def decode(doc: Mapping[str, Any], raw: bytes | memoryview | None, single: bool) -> dict[str, Any]:
    """The outputs of a v2 answer, by name; ``raw`` holds its binary data."""
    outputs: dict[str, Any] = {}
    offset = 0
    for entry in doc["outputs"]:
        datatype, shape = entry["datatype"], entry["shape"]
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if raw is None or offset + size > len(raw):
                raise ValueError(f"output {entry['name']!r}: the answer ends inside its data")
            value = _from_binary(datatype, raw[offset : offset + size], shape)
            offset += size
        else:
            value = _from_data(datatype, entry["data"], shape)
        outputs[entry["name"]] = value[0] if single else value
    return outputs


# -- inputs ----------------------------------------------------------------------


def _names(specs: Sequence[Spec]) -> str:
    return ", ".join(f"{s.name} ({s.datatype} {list(s.shape)})" for s in specs)


def _encode_one(spec: Spec, value: Any, binary: bool) -> tuple[dict[str, Any], bytes | None, bool]:
    entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype}
    if np is not None and spec.datatype != "BYTES":
        array = np.asarray(value, dtype=_DTYPES[spec.datatype])
        single = _single(spec, array.ndim)
        if single:
            array = array[np.newaxis]
        entry["shape"] = list(array.shape)
        if binary:
            chunk = np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(chunk)}
            return entry, chunk, single
        entry["data"] = array.ravel().tolist()
        return entry, None, single
    if np is not None and isinstance(value, np.ndarray):
        value = value.tolist()
    shape = _shape(value)
    single = _single(spec, len(shape))
    flat = _flatten(value, len(shape))
    cast = _CASTS.get(spec.datatype[:2])
    if cast is not None:
        flat = [cast(x) for x in flat]
    entry["shape"] = [1, *shape] if single else shape
    entry["data"] = flat
    return entry, None, single


def _single(spec: Spec, ndim: int) -> bool:
    rank = len(spec.shape)
    if ndim == rank - 1:
        return True
    if ndim != rank:
        raise ValueError(
            f"input {spec.name!r} is {spec.datatype} {list(spec.shape)}: give one item "
            f"({rank - 1} dimensions) or a batch ({rank} dimensions), not {ndim} dimensions"
        )
    return False


def _shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list | tuple):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def _flatten(value: Any, depth: int) -> list[Any]:
    if depth == 0:
        return [value]
    flat = list(value)
    for _ in range(depth - 1):
        flat = [x for row in flat for x in row]
    return flat


# -- outputs ---------------------------------------------------------------------


def _from_data(datatype: str, data: list[Any], shape: list[int]) -> Any:
    if np is not None:
        dtype = object if datatype == "BYTES" else _DTYPES[datatype]
        return np.asarray(data, dtype=dtype).reshape(shape)
    return _nest(data, shape)


def _from_binary(datatype: str, raw: bytes | memoryview, shape: list[int]) -> Any:
    count = 1
    for dim in shape:
        count *= dim
    if datatype == "BYTES":
        values: list[Any] = []
        offset = 0
        for _ in range(count):
            (length,) = struct.unpack_from("<I", raw, offset)
            values.append(bytes(raw[offset + 4 : offset + 4 + length]).decode())
            offset += 4 + length
        return _from_data(datatype, values, shape)
    if np is not None:
        return np.frombuffer(raw, dtype=_DTYPES[datatype], count=count).reshape(shape)
    return _nest(list(struct.unpack(f"<{count}{_STRUCT[datatype]}", raw)), shape)


def _nest(flat: list[Any], shape: list[int]) -> Any:
    """A flat row-major list as nested lists of ``shape``."""
    for dim in reversed(shape[1:]):
        flat = [flat[i : i + dim] for i in range(0, len(flat), dim)]
    return flat
