"""The v2 infer body, decoded and answered the way carpool does it.

Only what the benchmark sends is supported: one input, items on the first
axis, JSON data, and an optional ``outputs`` list. Answers are compact JSON
(orjson) with the keys in carpool's order, so one checker judges every
server's answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import orjson

from bench.models import Digits, Embedder, set_threads

MODELS = ("digits", "minilm")


class BadRequest(ValueError):
    """A body this peer cannot serve; answered 400."""


@dataclass(slots=True)
class Request:
    id: str | None
    items: list[Any]
    outputs: list[str]


class Served:
    """One model behind ``POST /v2/models/<name>/infer``."""

    def __init__(self, model: str) -> None:
        if model not in MODELS:
            raise ValueError(f"BENCH_MODEL must be one of {MODELS}, not {model!r}")
        set_threads()
        self.name = model
        self.path = f"/v2/models/{model}/infer"
        if model == "digits":
            self.digits: Digits | None = Digits()
            self.embedder: Embedder | None = None
            self.all_outputs = ["probabilities", "label"]
        else:
            self.digits = None
            self.embedder = Embedder()
            self.all_outputs = ["embedding"]

    @classmethod
    def from_env(cls) -> Served:
        return cls(os.environ.get("BENCH_MODEL", "digits"))

    def decode(self, body: bytes) -> Request:
        try:
            doc = orjson.loads(body)
            entry = doc["inputs"][0]
            shape, data = entry["shape"], entry["data"]
            count = shape[0]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise BadRequest(f"not a v2 infer request: {exc}") from None
        if self.digits is not None:
            flat = [v for row in data for v in row] if data and type(data[0]) is list else data
            if len(flat) != count * 64:
                raise BadRequest(f"shape {shape} needs {count * 64} values")
            items: list[Any] = [flat[i * 64 : (i + 1) * 64] for i in range(count)]
        else:
            if len(data) != count or not all(type(t) is str for t in data):
                raise BadRequest(f"shape {shape} needs {count} strings")
            items = list(data)
        wanted = doc.get("outputs")
        outputs = [o["name"] for o in wanted] if wanted else self.all_outputs
        if not set(outputs) <= set(self.all_outputs):
            raise BadRequest(f"unknown outputs {outputs}")
        return Request(doc.get("id"), items, outputs)

    def run(self, requests: list[Request]) -> list[bytes]:
        """One forward pass for every item of ``requests``; one answer each."""
        items = [item for request in requests for item in request.items]
        columns: dict[str, list[Any]]
        if self.digits is not None:
            probabilities, labels = self.digits(items)
            columns = {"probabilities": probabilities, "label": labels}
        else:
            assert self.embedder is not None
            vectors, _, _ = self.embedder(items)
            columns = {"embedding": vectors}
        answers, start = [], 0
        for request in requests:
            end = start + len(request.items)
            answers.append(self._encode(request, columns, start, end))
            start = end
        return answers

    def infer(self, body: bytes) -> tuple[int, bytes]:
        """(status, answer) for one request body: the per-request peers' path."""
        try:
            request = self.decode(body)
        except BadRequest as exc:
            return 400, orjson.dumps({"error": str(exc)})
        return 200, self.run([request])[0]

    def _encode(
        self, request: Request, columns: dict[str, list[Any]], start: int, end: int
    ) -> bytes:
        outputs = []
        for name in request.outputs:
            rows = columns[name][start:end]
            if name == "label":
                entry = {"name": name, "datatype": "INT64", "shape": [len(rows)], "data": rows}
            else:
                flat = [v for row in rows for v in row]
                shape = [len(rows), len(rows[0]) if rows else 0]
                entry = {"name": name, "datatype": "FP32", "shape": shape, "data": flat}
            outputs.append(entry)
        doc: dict[str, Any] = {"model_name": self.name, "model_version": "1"}
        if request.id is not None:
            doc["id"] = request.id
        doc["outputs"] = outputs
        return orjson.dumps(doc)
