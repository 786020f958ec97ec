"""The two workloads: the request bodies every server gets, and how an
answer is judged.

``tiny`` is the digits MLP: its forward pass takes microseconds, so it
measures what HTTP and batching cost. ``embed`` is all-MiniLM-L6-v2 on
seeded sentences of 5-40 words: compute-bound. Every request carries an
``id`` that names its corpus item, and every answer must echo it, so an
answer is judged against the offline result of exactly the item it was for.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from bench import corpus

OK, FAILED, WRONG = 0, 1, 2
# Label ties closer than this may break either way between batch sizes.
_AMBIGUOUS_MARGIN = 1e-4
_PROBABILITY_TOLERANCE = 1e-4
_NORM_TOLERANCE = 1e-3
_MIN_COSINE = 0.999


class Workload(ABC):
    """One model, its corpus, and the rules an answer must follow."""

    name: str
    model: str
    input_name: str
    datatype: str
    output: str
    timeout_s: float

    def __init__(self, items: Sequence[Any], reference: Mapping[str, Any]) -> None:
        self.items = list(items)
        self.reference = reference
        self._inputs = [
            orjson.dumps(
                [
                    {
                        "name": self.input_name,
                        "datatype": self.datatype,
                        "shape": self._shape(item),
                        "data": item if isinstance(item, list) else [item],
                    }
                ]
            )
            for item in self.items
        ]

    @property
    def path(self) -> str:
        return f"/v2/models/{self.model}/infer"

    @property
    def stream_path(self) -> str:
        return f"/v2/models/{self.model}/stream"

    def body(self, index: int, request_id: str, full: bool = False) -> bytes:
        """The v2 request for item ``index``; ``full`` asks for every output."""
        tail = b"}" if full else self._load_tail()
        return b'{"id":"%s","inputs":%s%s' % (request_id.encode(), self._inputs[index], tail)

    def judge(
        self, index: int, request_id: str, status: int, body: bytes, full: bool = False
    ) -> tuple[int, str]:
        """(OK, "") or (FAILED | WRONG, why): the answer to ``body(index, request_id)``."""
        if status != 200:
            return FAILED, f"status {status}: {body[:160]!r}"
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return WRONG, f"not JSON: {body[:160]!r}"
        if type(doc) is not dict:
            return WRONG, "the answer is not a JSON object"
        return self.judge_doc(index, request_id, doc, full)

    def judge_doc(
        self, index: int, request_id: str, doc: dict[str, Any], full: bool = False
    ) -> tuple[int, str]:
        if doc.get("id") != request_id:
            return WRONG, f"id {doc.get('id')!r}, expected {request_id!r}"
        outputs = doc.get("outputs")
        if type(outputs) is not list:
            return WRONG, 'no "outputs" list'
        named: dict[str, Any] = {
            o["name"]: o for o in outputs if type(o) is dict and type(o.get("name")) is str
        }
        why = self._check(index, named, full)
        return (WRONG, why) if why else (OK, "")

    @abstractmethod
    def lua_expectation(self, index: int) -> str:
        """A substring the answer to item ``index`` must contain (wrk's check)."""

    @abstractmethod
    def _shape(self, item: Any) -> list[int]: ...

    @abstractmethod
    def _load_tail(self) -> bytes: ...

    @abstractmethod
    def _check(self, index: int, outputs: dict[str, Any], full: bool) -> str: ...


class Tiny(Workload):
    name = "tiny"
    model = "digits"
    input_name = "pixels"
    datatype = "FP32"
    output = "label"
    timeout_s = 5.0

    def _shape(self, item: Any) -> list[int]:
        return [1, 64]

    def _load_tail(self) -> bytes:
        return b',"outputs":[{"name":"label"}]}'

    def _accepted(self, index: int) -> tuple[int, ...]:
        ref = self.reference
        if ref["margins"][index] < _AMBIGUOUS_MARGIN:
            return (ref["labels"][index], ref["runner_up"][index])
        return (ref["labels"][index],)

    def lua_expectation(self, index: int) -> str:
        accepted = self._accepted(index)
        head = '"name":"label","datatype":"INT64","shape":[1],"data":['
        return head if len(accepted) > 1 else f"{head}{accepted[0]}]"

    def _check(self, index: int, outputs: dict[str, Any], full: bool) -> str:
        label = outputs.get("label")
        if label is None:
            return 'no "label" output'
        if label.get("shape") != [1] or label.get("datatype") != "INT64":
            return (
                f"label has shape {label.get('shape')} {label.get('datatype')}, expected [1] INT64"
            )
        data = label.get("data")
        if type(data) is not list or len(data) != 1 or data[0] not in self._accepted(index):
            return f"label {data}, the offline model says {self._accepted(index)}"
        if not full:
            return ""
        probabilities = outputs.get("probabilities")
        if probabilities is None or probabilities.get("shape") != [1, 10]:
            return "no probabilities of shape [1, 10]"
        want = self.reference["probabilities"][index]
        got = probabilities.get("data")
        if type(got) is not list or len(got) != 10:
            return "probabilities do not hold 10 values"
        worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
        if worst > _PROBABILITY_TOLERANCE:
            return f"probabilities differ from the offline model's by {worst:.2g}"
        return ""


class Embed(Workload):
    name = "embed"
    model = "minilm"
    input_name = "text"
    datatype = "BYTES"
    output = "embedding"
    timeout_s = 10.0
    dim = 384

    def _shape(self, item: Any) -> list[int]:
        return [1]

    def _load_tail(self) -> bytes:
        return b"}"

    def lua_expectation(self, index: int) -> str:
        return f'"name":"embedding","datatype":"FP32","shape":[1,{self.dim}],"data":['

    def _check(self, index: int, outputs: dict[str, Any], full: bool) -> str:
        embedding = outputs.get("embedding")
        if embedding is None:
            return 'no "embedding" output'
        if embedding.get("shape") != [1, self.dim]:
            return f"embedding shape {embedding.get('shape')}, expected [1, {self.dim}]"
        data = embedding.get("data")
        if type(data) is not list or len(data) != self.dim:
            return f"embedding does not hold {self.dim} values"
        norm = math.sqrt(math.fsum(v * v for v in data))
        if abs(norm - 1) > _NORM_TOLERANCE:
            return f"embedding norm {norm:.4f}, expected 1"
        want = self.reference["embeddings"].get(str(index)) if full else None
        if want is not None:
            cosine = math.fsum(a * b for a, b in zip(data, want, strict=True))
            if cosine < _MIN_COSINE:
                return f"embedding has cosine {cosine:.5f} with the offline model's"
        return ""


def corpus_size(name: str, quick: bool) -> int:
    if name == "tiny":
        return 256
    return 128 if quick else 512


def items_for(name: str, quick: bool) -> list[Any]:
    """The corpus of workload ``name``: the same here and in the offline run."""
    count = corpus_size(name, quick)
    if name == "tiny":
        return list(corpus.digit_images(count))
    return list(corpus.sentences(count))


def make(name: str, quick: bool, reference: Mapping[str, Any]) -> Workload:
    items = items_for(name, quick)
    return Tiny(items, reference) if name == "tiny" else Embed(items, reference)


NAMES = ("tiny", "embed")
