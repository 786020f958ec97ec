"""The floor: the least a Python server on carpool's HTTP stack spends on a request.

A bare ASGI callable run under carpool's own uvicorn configuration
(``server.cli.uvicorn_config``: uvloop, carpool's httptools protocol with its
deadlines, the same limits and lifespan), doing for each tiny request only
what any server must: read the whole body, parse it with orjson, find the
answer, and encode with orjson the answer carpool gives (same keys in the same
order, so the same size). No framework, no validation beyond what finding
the answer needs, no queue, no batching and no model on the request path:
the answers are the digits model's for the suite's corpus, computed once at
start-up one image at a time (as the offline reference is), and looked up by
the image's pixels. An image outside the corpus gets 400: the floor serves
the suite's tiny requests and nothing else.

Over WebSocket (``/v2/models/digits/stream``) it is the least a stream costs
on carpool's stack: carpool's stream protocol parses each message and hands
it to the floor as it arrives (``frames.PUSH``), the floor answers it at
once, and carpool's outbox sends every waiting answer in one write
(``frames.SEND_MANY``). What carpool's stream adds on top (validation, the
batcher, the cap on messages in flight, ids, errors) is what the ratio of
the two measures.

    BENCH_MODEL=digits python -m bench.peers.floor_app --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, cast

import orjson

from bench import workloads
from server import frames
from server.outbox import Outbox

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Answer = tuple[list[float], int]  # (probabilities, label) of one image

MODEL = "digits"
ALL_OUTPUTS = ("probabilities", "label")  # carpool's order when none are asked for
_NOT_FOUND = orjson.dumps({"error": "the floor serves only POST /v2/models/digits/infer"})
_UNKNOWN_IMAGE = orjson.dumps({"error": "the floor answers only the images of the suite's corpus"})


class Floor:
    """The ASGI app: ``answers`` maps an image's 64 pixels to the model's answer."""

    def __init__(self, answers: Mapping[tuple[int, ...], Answer]) -> None:
        self.answers = answers
        self.path = f"/v2/models/{MODEL}/infer"
        self.stream_path = f"/v2/models/{MODEL}/stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)
        elif scope["path"] == self.stream_path:
            await self._websocket(scope, receive, send)
        else:
            await send({"type": "websocket.close"})  # before accepting: the handshake is refused

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if scope["method"] == "POST" and scope["path"] == self.path:
            status, body = self.answer(b"".join(chunks))
        else:
            status, body = 404, _NOT_FOUND
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        extensions = scope.get("extensions") or {}
        outbox = Outbox(send, frames.SEND_MANY in extensions, lambda count: None)
        writer = asyncio.create_task(outbox.write())

        def take(data: bytes, binary: bool) -> bool:
            outbox.post(frames.text(self.answer(data)[1]))
            return True  # taken: the floor has no cap on messages in flight

        try:
            if frames.PUSH in extensions:
                await send({"type": frames.PUSH, "sink": take})
            while True:  # without PUSH every message; with it, only the disconnect
                message = await receive()
                if message["type"] != "websocket.receive":
                    return
                text = message.get("text")
                take(text.encode() if text is not None else message.get("bytes") or b"", False)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await writer

    def answer(self, body: bytes) -> tuple[int, bytes]:
        """(status, answer) for one v2 infer body of one image."""
        try:
            doc = orjson.loads(body)
            found = self.answers.get(tuple(doc["inputs"][0]["data"]))
            wanted = doc.get("outputs")
            names = [o["name"] for o in wanted] if wanted else ALL_OUTPUTS
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            return 400, orjson.dumps({"error": f"not a v2 infer request: {exc}"})
        if found is None:
            return 400, _UNKNOWN_IMAGE
        probabilities, label = found
        outputs = []
        for name in names:
            if name == "label":
                outputs.append({"name": name, "datatype": "INT64", "shape": [1], "data": [label]})
            elif name == "probabilities":
                outputs.append(
                    {"name": name, "datatype": "FP32", "shape": [1, 10], "data": probabilities}
                )
            else:
                return 400, orjson.dumps({"error": f"unknown output {name!r}"})
        answer: dict[str, Any] = {"model_name": MODEL, "model_version": "1"}
        if "id" in doc:
            answer["id"] = doc["id"]
        answer["outputs"] = outputs
        return 200, orjson.dumps(answer)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def corpus_answers() -> dict[tuple[int, ...], Answer]:
    """The digits model's answer to every image of the tiny corpus."""
    from bench.models import Digits, set_threads  # torch: start-up only

    set_threads()
    model = Digits()
    table: dict[tuple[int, ...], Answer] = {}
    # the full run's corpus; the quick run's is its first images
    for image in workloads.items_for("tiny", quick=False):
        probabilities, labels = model([image])
        table[tuple(image)] = (probabilities[0], labels[0])
    return table


def main() -> None:
    # carpool's own uvicorn configuration and start-up steps, so that the
    # difference between the two servers is the app alone
    import uvicorn

    from server.cli import raise_open_files_limit, uvicorn_config
    from server.settings import Settings
    from server.uvicorn_internals import YOUNG_GC_THRESHOLD

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    if os.environ.get("BENCH_MODEL", MODEL) != MODEL:
        raise SystemExit("the floor serves the tiny workload (BENCH_MODEL=digits) only")
    floor = Floor(corpus_answers())
    settings = Settings.from_env(host=args.host, port=args.port, log_level=args.log_level)
    # typed for carpool's app, uvicorn_config hands the app to uvicorn.Config untouched
    config = uvicorn_config(cast(Any, floor), settings)
    raise_open_files_limit()
    # as carpool's Server does after start-up: full collections never walk
    # what start-up built (torch, imported by server.cli, and the answers),
    # and young ones wait for as many objects
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
