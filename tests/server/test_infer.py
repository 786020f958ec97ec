"""``server/infer.py``: one infer transaction, so HTTP and a WebSocket stream
mean the same by the same request.

Each case goes to a real uvicorn serving ``weights/`` (the session's
``served`` server) once as ``POST /v2/models/{name}/infer`` and once as a
message on ``WS /v2/models/{name}/stream``; the two answers must agree: the
same outputs for a good request, the same status, reason and message for a
bad one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.servers import Running

WAIT = 30.0
PIXELS = [float(i % 17) for i in range(64)]


def body(**changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "id": "case",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": PIXELS}],
        "outputs": [{"name": "label"}],
    }
    doc.update(changes)
    return orjson.dumps(doc)


def pixels(**changes: Any) -> list[dict[str, Any]]:
    return [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": PIXELS, **changes}]


CASES: dict[str, tuple[str, bytes]] = {
    "a good request": ("digits", body()),
    "two items": ("digits", body(inputs=pixels(shape=[2, 64], data=PIXELS * 2))),
    "an unknown model": ("no-such-model", body()),
    "a body that is not JSON": ("digits", b'{"id": "case", "inputs": ['),
    "a wrong datatype": ("digits", body(inputs=pixels(datatype="INT64"))),
    "a wrong shape": ("digits", body(inputs=pixels(shape=[1, 63]))),
    "an unknown input": ("digits", body(inputs=pixels(name="image"))),
    "an unknown output": ("digits", body(outputs=[{"name": "logits"}])),
    "a value outside FP32": ("digits", body(inputs=pixels(data=[1e39] * 64))),
    "more items than a request may have": (
        "digits",
        body(inputs=pixels(shape=[1025, 64], data=PIXELS * 1025)),
    ),
    "a timeout that is not positive": ("digits", body(parameters={"timeout": 0})),
}


async def over_http(served: Running, model: str, payload: bytes) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=served.url, timeout=WAIT) as client:
        response = await client.post(f"/v2/models/{model}/infer", content=payload)
    return response.status_code, orjson.loads(response.content)


async def over_stream(served: Running, model: str, payload: bytes) -> dict[str, Any]:
    url = served.url.replace("http", "ws", 1) + f"/v2/models/{model}/stream"
    async with connect(url, compression=None) as ws:
        await ws.send(payload.decode())
        message = await asyncio.wait_for(ws.recv(), WAIT)
    assert isinstance(message, str)
    doc: dict[str, Any] = orjson.loads(message)
    return doc


@pytest.mark.parametrize("case", list(CASES))
async def test_http_and_a_stream_answer_a_request_alike(served: Running, case: str) -> None:
    model, payload = CASES[case]
    status, http_doc = await over_http(served, model, payload)
    stream_doc = await over_stream(served, model, payload)
    if status == 200:
        assert "error" not in stream_doc, stream_doc
        assert stream_doc["outputs"] == http_doc["outputs"]
        assert stream_doc["id"] == http_doc["id"] == "case"
        return
    assert status in (400, 404, 413), http_doc
    # the stream says in its message what HTTP says with its status line
    assert (stream_doc["status"], stream_doc["reason"], stream_doc["error"]) == (
        status,
        http_doc["reason"],
        http_doc["error"],
    )
    # an id that can be read is carried back, one that cannot is null
    assert stream_doc["id"] == (None if case == "a body that is not JSON" else "case")
