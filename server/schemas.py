"""The JSON schemas that /openapi.json gives for v2 bodies.

The ``components`` every document shares (the error, server and tensor
metadata), and for each model the schemas that name its own inputs and
outputs: its metadata, its infer request (datatypes, shapes, the item limit)
with an example, and its infer response.
"""

from __future__ import annotations

from typing import Any

from server.datatypes import DATATYPES
from server.repository import TensorSpec

JSON = "application/json"
Schema = dict[str, Any]

# v2 parameters: an object of booleans, numbers and strings
_PARAMETERS: Schema = {
    "type": "object",
    "additionalProperties": {"type": ["boolean", "number", "string"]},
}


def components() -> Schema:
    """The schemas every document refers to (``ref(name)``)."""
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "what went wrong, what to do"},
                "reason": {"type": "string", "description": "a label, as in /metrics"},
                "error_id": {
                    "type": "string",
                    "description": "for failures (model errors, 507, internal): "
                    "the id of the server log line with the details",
                },
            },
        },
        "ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "TensorMetadata": {
            "type": "object",
            "required": ["name", "datatype", "shape"],
            "properties": {
                "name": {"type": "string"},
                "datatype": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer"}},
            },
        },
    }


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def model_metadata(name: str) -> Schema:
    return {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"const": name},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": ref("TensorMetadata")},
            "outputs": {"type": "array", "items": ref("TensorMetadata")},
        },
    }


def infer_request(
    name: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], max_items: int
) -> Schema:
    tensors = [
        {
            "type": "object",
            "required": ["name", "datatype", "shape", "data"],
            "properties": {
                "name": {"type": "string", "enum": [spec.name]},
                "datatype": {"const": spec.datatype},
                "shape": _shape(spec, max_items),
                "data": {
                    "type": "array",
                    "description": "flat (row-major) or nested as the shape",
                    "items": _nested(spec.datatype, len(spec.shape) - 1),
                },
                "parameters": _PARAMETERS,
            },
        }
        for spec in inputs
    ]
    return {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "inputs": {"type": "array", "minItems": 1, "items": {"anyOf": tensors}},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "enum": [spec.name for spec in outputs]},
                        "parameters": _PARAMETERS,
                    },
                },
            },
        },
        "description": f"A v2 infer request for {name}",
    }


def example(inputs: tuple[TensorSpec, ...]) -> Schema:
    """One item of zeros (or empty texts, or false)."""
    tensors = []
    for spec in inputs:
        shape = [1, *(1 if dim == -1 else dim for dim in spec.item_shape)]
        size = 1
        for dim in shape:
            size *= dim
        value = DATATYPES[spec.datatype].zero
        tensors.append(
            {"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": [value] * size}
        )
    return {"inputs": tensors}


def infer_responses(name: str, outputs: tuple[TensorSpec, ...]) -> dict[str, Schema]:
    """The infer operation's 200 response (its errors are the operation's)."""
    tensors = [
        {
            "type": "object",
            "required": ["name", "datatype", "shape"],
            "properties": {
                "name": {"const": spec.name},
                "datatype": {"const": spec.datatype},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "data": {"type": "array", "items": _item(spec.datatype, output=True)},
                "parameters": {"type": "object"},
            },
        }
        for spec in outputs
    ]
    body = {
        "type": "object",
        "required": ["model_name", "model_version", "outputs"],
        "properties": {
            "model_name": {"const": name},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {"anyOf": tensors}},
        },
    }
    timing = {
        header: {"schema": {"type": "string"}, "description": description}
        for header, description in [
            ("x-carpool-queue-ms", "how long the request waited for its batch"),
            ("x-carpool-compute-ms", "how long its batch's forward pass took"),
            ("x-carpool-batch-size", "how many items rode in its batch"),
        ]
    }
    return {
        "200": {
            "description": "The outputs. NaN and infinities are sent as null (strict JSON). "
            "With binary outputs asked for, the body is the JSON header followed by the raw "
            "tensors, and Inference-Header-Content-Length gives the header's length.",
            "headers": timing,
            "content": {
                JSON: {"schema": body},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


def _shape(spec: TensorSpec, max_items: int) -> Schema:
    """The first axis counts the items; the others are fixed, or any size where -1."""
    dims: list[Schema] = [{"type": "integer", "minimum": 1, "maximum": max_items}]
    for dim in spec.item_shape:
        dims.append({"type": "integer", "minimum": 0} if dim == -1 else {"const": dim})
    return {"type": "array", "prefixItems": dims, "minItems": len(dims), "maxItems": len(dims)}


def _nested(datatype: str, depth: int) -> Schema:
    """An element of ``data``: a value, or (nested as the shape) a list of them."""
    item = _item(datatype)
    for _ in range(depth):
        item = {"anyOf": [_item(datatype), {"type": "array", "items": item}]}
    return item


def _item(datatype: str, output: bool = False) -> Schema:
    json_type = DATATYPES[datatype].json_type
    if output and json_type == "number":
        return {"type": ["number", "null"]}  # a model's NaN or infinity is encoded as null
    return {"type": json_type}
