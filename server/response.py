"""An Open Inference Protocol v2 infer response, encoded.

``encode_response`` joins the per-item results of a request again, each
output as JSON ``data`` or as binary data (``server.binary_data``) when the
request asked for it (``binary_data_output`` or an output's ``binary_data``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import orjson

from server import binary_data
from server.repository import ModelConfig, TensorSpec
from server.request import InferRequest


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
            raw = binary_data.pack(spec.datatype, data)
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


def _gather(spec: TensorSpec, results: Sequence[dict[str, Any]]) -> list[Any]:
    """One output of every item, as one flat row-major list."""
    name = spec.name
    values = [result[name] for result in results]
    for _ in spec.item_shape:
        values = list(chain.from_iterable(values))
    return values


def _item_shape(spec: TensorSpec, results: Sequence[dict[str, Any]]) -> list[int]:
    """The declared item shape, its -1 axes measured on the first item."""
    if -1 not in spec.item_shape:
        return list(spec.item_shape)
    shape, value = [], results[0][spec.name] if results else []
    for _ in spec.item_shape:
        shape.append(len(value))
        value = value[0] if value else []
    return shape
