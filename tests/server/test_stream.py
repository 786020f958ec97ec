"""``WS /v2/models/{name}/stream``, specified against a real uvicorn.

Every test talks to a server on a loopback port with a raw WebSocket client
(``websockets``), over the fake model of tests/fakes.py: ``y = 2 x``, every
forward pass recorded, and a gate that holds a batch in the worker thread so
that queue states are exact.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.models import ServedModel
from server.settings import Settings
from server.stream import Stream
from server.websocket import StreamRegistry
from tests.fakes import infer_body, model_dir, recorder
from tests.servers import Running, in_thread, scrape

WAIT = 30.0  # the longest any awaited condition may take before a test fails


# -- helpers ------------------------------------------------------------------


@contextmanager
def serving(
    root: Path, name: str = "echo", settings: dict[str, Any] | None = None, **model: Any
) -> Iterator[Running]:
    """A server over one fake model; its gate is open again when this exits."""
    model.setdefault("queue_timeout_ms", 120_000)  # gated tests must not time out by accident
    model_dir(root, name, **model)
    try:
        with in_thread(Settings(models_dir=root, torch_threads=1, **(settings or {}))) as running:
            yield running
            recorder(name).gate.set()  # before the server's own drain waits on it
    finally:
        recorder(name).gate.set()


@asynccontextmanager
async def stream_to(
    running: Running, path: str = "/v2/models/echo/stream"
) -> AsyncIterator[ClientConnection]:
    async with connect(running.url.replace("http", "ws", 1) + path, compression=None) as ws:
        yield ws


def request(request_id: str | None, *xs: float, **extra: Any) -> str:
    doc: dict[str, Any] = infer_body(xs)
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps({**doc, **extra}).decode()


def binary_request(request_id: str, *xs: float) -> bytes:
    header = orjson.dumps(
        {
            "id": request_id,
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [len(xs), 1],
                    "parameters": {"binary_data_size": 4 * len(xs)},
                }
            ],
        }
    )
    return struct.pack("<I", len(header)) + header + struct.pack(f"<{len(xs)}f", *xs)


async def answer(ws: ClientConnection) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), WAIT)
    assert isinstance(message, str), "a text request is answered with a text frame"
    doc: dict[str, Any] = orjson.loads(message)
    return doc


def ys(doc: dict[str, Any]) -> list[float]:
    (output,) = doc["outputs"]
    assert output["name"] == "y"
    return list(output["data"])


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Let both event loops run until ``condition()`` holds (bounded)."""
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def entered_forward(name: str = "echo") -> None:
    await asyncio.wait_for(asyncio.to_thread(recorder(name).entered.wait), WAIT)


def registry(running: Running) -> StreamRegistry:
    streams: StreamRegistry = running.app.streams
    return streams


def only_stream(running: Running) -> Stream:
    (stream,) = list(registry(running))
    return stream


def served(running: Running, name: str = "echo") -> ServedModel:
    model: ServedModel | None = running.app.models.get(name)
    assert model is not None
    return model


async def metrics(running: Running) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=running.url, timeout=WAIT) as client:
        return scrape((await client.get("/metrics")).text)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A server for tests that never close the gate."""
    with serving(tmp_path_factory.mktemp("plain"), "plain") as running:
        yield running


PLAIN = "/v2/models/plain/stream"


# -- ordering and matching ----------------------------------------------------------


async def test_a_thousand_pipelined_requests_are_each_answered_once_with_their_own_result(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, max_batch_size=64) as running:
        async with stream_to(running) as ws:

            async def send_all() -> None:
                for i in range(1000):
                    await ws.send(request(f"r{i}", float(i)))

            sender = asyncio.create_task(send_all())
            answers = [await answer(ws) for _ in range(1000)]
            await sender
        seen: dict[str, list[float]] = {}
        for doc in answers:
            assert doc["id"] not in seen, f"{doc['id']} answered twice"
            seen[doc["id"]] = ys(doc)
        assert seen == {f"r{i}": [2.0 * i] for i in range(1000)}
        batches = recorder("echo").batches
        assert sum(map(len, batches)) == 1000
        assert len(batches) < 1000, "pipelined requests share batches"
        figures = await metrics(running)
        assert figures['carpool_requests_total{model="echo",outcome="ok"}'] == 1000


async def test_a_binary_request_is_answered_with_a_binary_frame_of_raw_tensors(
    plain: Running,
) -> None:
    async with stream_to(plain, PLAIN) as ws:
        await ws.send(binary_request("b1", 1.5, -2.0, 3.0))
        frame = await asyncio.wait_for(ws.recv(), WAIT)
    assert isinstance(frame, bytes)
    (length,) = struct.unpack_from("<I", frame)
    header = orjson.loads(frame[4 : 4 + length])
    assert header["id"] == "b1"
    (output,) = header["outputs"]
    assert output["shape"] == [3, 1]
    assert output["parameters"]["binary_data_size"] == 12
    assert struct.unpack("<3f", frame[4 + length :]) == (3.0, -4.0, 6.0)


async def test_a_stream_outlives_the_header_deadline_of_its_handshake(tmp_path: Path) -> None:
    """The receipt deadlines are for HTTP requests: once the handshake is
    done, a stream stays open as long as it is used (it was closed, without
    a close frame, header_timeout after it opened)."""
    with serving(tmp_path, settings={"header_timeout": 0.5}) as running:
        async with stream_to(running) as ws:
            await ws.send(request("early", 1.0))
            assert ys(await answer(ws)) == [2.0]
            await asyncio.sleep(1.5)  # three header deadlines
            await ws.send(request("late", 3.0))
            late = await answer(ws)
            assert (late["id"], ys(late)) == ("late", [6.0])


async def test_an_answer_carries_its_batch_figures(plain: Running) -> None:
    async with stream_to(plain, PLAIN) as ws:
        await ws.send(request("t", 1.0, 2.0))
        doc = await answer(ws)
    assert doc["parameters"]["batch_size"] == 2
    assert doc["parameters"]["queue_ms"] >= 0
    assert doc["parameters"]["compute_ms"] >= 0


async def test_the_versioned_route_streams_too(plain: Running) -> None:
    async with stream_to(plain, "/v2/models/plain/versions/1/stream") as ws:
        await ws.send(request("v", 4.0))
        assert ys(await answer(ws)) == [8.0]


# -- shared batches ------------------------------------------------------------------


async def test_http_and_websocket_requests_ride_in_the_same_batch(tmp_path: Path) -> None:
    with serving(tmp_path, max_batch_size=32) as running:
        record = recorder("echo")
        record.gate.clear()
        async with (
            httpx.AsyncClient(base_url=running.url, timeout=WAIT) as http,
            stream_to(running) as ws,
        ):
            infer = "/v2/models/echo/infer"
            first = asyncio.create_task(http.post(infer, json=infer_body([0.5])))
            await entered_forward()
            for x in (1.0, 2.0, 3.0):
                await ws.send(request(f"ws{x}", x))
            posts = [
                asyncio.create_task(http.post(infer, json=infer_body([x])))
                for x in (11.0, 12.0, 13.0)
            ]
            batcher = served(running).batcher
            await eventually(lambda: batcher.stats.queued == 6, "six items queued")
            record.gate.set()
            streamed = [await answer(ws) for _ in range(3)]
            responses = [await post for post in posts]
            assert (await first).status_code == 200
        assert record.batches[0] == [0.5]
        assert sorted(record.batches[1]) == [1.0, 2.0, 3.0, 11.0, 12.0, 13.0]
        assert all(doc["parameters"]["batch_size"] == 6 for doc in streamed)
        assert all(r.headers["x-carpool-batch-size"] == "6" for r in responses)
        figures = await metrics(running)
        assert figures['carpool_batch_size_count{model="echo"}'] == 2
        assert figures['carpool_batch_size_sum{model="echo"}'] == 7
        assert figures['carpool_batch_size_bucket{le="4.0",model="echo"}'] == 1


# -- errors, by message ------------------------------------------------------------


BAD_MESSAGES: dict[str, tuple[str | bytes, int, str | None]] = {
    "not JSON": ("{this is not json", 400, None),
    "not an object": ("[1, 2, 3]", 400, None),
    "no id": (request(None, 1.0), 400, None),
    "unknown input": (
        orjson.dumps(
            {"id": "u", "inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}
        ).decode(),
        400,
        "u",
    ),
    "wrong shape": (
        orjson.dumps(
            {
                "id": "s",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}],
            }
        ).decode(),
        400,
        "s",
    ),
    "wrong datatype": (
        orjson.dumps(
            {
                "id": "d",
                "inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 1], "data": [1]}],
            }
        ).decode(),
        400,
        "d",
    ),
    "bad timeout": (request("t", 1.0, parameters={"timeout": -5}), 400, "t"),
    "too many items": (request("n", *([1.0] * 1025)), 413, "n"),
    "binary frame shorter than its length": (b"\x01\x00", 400, None),
    "binary header length past the frame": (struct.pack("<I", 999) + b'{"id": "h"}', 400, "h"),
    "binary data of the wrong size": (binary_request("w", 1.0, 2.0)[:-1], 400, "w"),
}


@pytest.mark.parametrize("case", BAD_MESSAGES)
async def test_a_bad_message_is_answered_by_id_and_the_stream_stays_open(
    plain: Running, case: str
) -> None:
    message, status, request_id = BAD_MESSAGES[case]
    async with stream_to(plain, PLAIN) as ws:
        await ws.send(message)
        error = await answer(ws)
        assert error["status"] == status, error
        assert error["id"] == request_id
        assert error["error"]
        assert "Traceback" not in error["error"]
        await ws.send(request("after", 21.0))
        assert ys(await answer(ws)) == [42.0]


async def test_an_id_already_in_flight_is_refused_and_the_first_is_still_answered(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as running:
        recorder("echo").gate.clear()
        async with stream_to(running) as ws:
            await ws.send(request("same", 1.0))
            await entered_forward()
            await ws.send(request("same", 2.0))
            error = await answer(ws)
            assert (error["id"], error["status"]) == ("same", 400)
            recorder("echo").gate.set()
            assert ys(await answer(ws)) == [2.0]
        assert recorder("echo").computed == [1.0]


async def test_an_unknown_model_is_answered_404_per_message_and_the_stream_stays_open(
    plain: Running,
) -> None:
    async with stream_to(plain, "/v2/models/nope/stream") as ws:
        for request_id in ("a", "b"):
            await ws.send(request(request_id, 1.0))
            error = await answer(ws)
            assert (error["id"], error["status"]) == (request_id, 404)
            assert "nope" in error["error"]
            assert "plain" in error["error"], "the error names the models there are"


async def test_overload_is_answered_503_with_retry_after_and_the_stream_stays_open(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, max_queue=2) as running:
        record = recorder("echo")
        record.gate.clear()
        async with stream_to(running) as ws:
            await ws.send(request("running", 1.0))
            await entered_forward()
            await ws.send(request("q1", 2.0))
            await ws.send(request("q2", 3.0))
            batcher = served(running).batcher
            await eventually(lambda: batcher.stats.queued == 2, "two items queued")
            await ws.send(request("over", 4.0))
            error = await answer(ws)  # while the gate is still closed: it never waited
            assert (error["id"], error["status"], error["reason"]) == ("over", 503, "overloaded")
            assert error["retry_after"] >= 1
            record.gate.set()
            done = {doc["id"]: ys(doc) for doc in [await answer(ws) for _ in range(3)]}
            assert done == {"running": [2.0], "q1": [4.0], "q2": [6.0]}
            await ws.send(request("later", 5.0))
            assert ys(await answer(ws)) == [10.0]
        assert 4.0 not in record.computed


async def test_a_request_past_its_deadline_is_answered_504_and_never_computed(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as running:
        record = recorder("echo")
        record.gate.clear()
        async with stream_to(running) as ws:
            await ws.send(request("running", 1.0))
            await entered_forward()
            await ws.send(request("late", 2.0, parameters={"timeout": 1000}))  # 1 ms
            error = await answer(ws)  # the gate is still closed
            assert (error["id"], error["status"]) == ("late", 504)
            assert error["reason"] == "deadline_exceeded"
            record.gate.set()
            assert ys(await answer(ws)) == [2.0]
            await ws.send(request("later", 3.0))
            assert ys(await answer(ws)) == [6.0]
        assert 2.0 not in record.computed


async def test_a_message_over_the_size_limit_closes_the_stream_with_1009(tmp_path: Path) -> None:
    with serving(tmp_path, settings={"ws_max_message_bytes": 64 * 1024}) as running:
        async with stream_to(running) as ws:
            await ws.send(request("big", *([1.0] * 20_000)))  # about 100 kB of JSON
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
        async with stream_to(running) as ws:  # survive, then serve
            await ws.send(request("small", 1.0))
            assert ys(await answer(ws)) == [2.0]


async def test_a_stream_without_a_valid_token_is_refused_at_the_handshake(tmp_path: Path) -> None:
    with serving(tmp_path, settings={"auth_tokens": "s3cret"}) as running:
        with pytest.raises(InvalidStatus) as refused:
            async with stream_to(running):
                pass
        assert refused.value.response.status_code == 401
        url = running.url.replace("http", "ws", 1) + "/v2/models/echo/stream"
        headers = {"Authorization": "Bearer s3cret"}
        async with connect(url, additional_headers=headers, compression=None) as ws:
            await ws.send(request("ok", 1.0))
            assert ys(await answer(ws)) == [2.0]


# -- disconnects ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_a_client_that_leaves_has_its_queued_requests_dropped_before_compute(
    tmp_path: Path, how: str
) -> None:
    with serving(tmp_path) as running:
        record = recorder("echo")
        record.gate.clear()
        batcher = served(running).batcher
        async with stream_to(running) as ws:
            await ws.send(request("running", 1.0))
            await entered_forward()
            for i in range(5):
                await ws.send(request(f"queued{i}", 100.0 + i))
            await eventually(lambda: batcher.stats.queued == 5, "five items queued")
            stream = only_stream(running)
            if how == "close":
                await ws.close()
            else:
                assert ws.transport is not None
                ws.transport.abort()
        await eventually(lambda: stream.closed.is_set(), "the stream has ended")
        assert batcher.stats.queued == 0
        assert stream.pending == 0
        assert len(registry(running)) == 0
        await eventually(lambda: not running.server.server_state.tasks, "no ASGI task left")
        record.gate.set()
        async with httpx.AsyncClient(base_url=running.url, timeout=WAIT) as http:
            sentinel = await http.post("/v2/models/echo/infer", json=infer_body([7.0]))
        assert sentinel.status_code == 200
        assert record.batches == [[1.0], [7.0]], "no queued item of the stream was computed"
        figures = await metrics(running)
        assert figures['carpool_dropped_items_total{model="echo",reason="cancelled"}'] == 5
        assert figures['carpool_requests_total{model="echo",outcome="cancelled"}'] == 6


# -- backpressure --------------------------------------------------------------------


async def test_a_client_that_sends_without_reading_has_at_most_the_cap_accepted(
    tmp_path: Path,
) -> None:
    cap = 8
    settings = {"ws_max_in_flight": cap}
    with serving(tmp_path, settings=settings, max_batch_size=64, max_queue=1024) as running:
        record = recorder("echo")
        record.gate.clear()
        batcher = served(running).batcher
        async with stream_to(running) as ws:
            for i in range(200):
                await ws.send(request(f"r{i}", float(i)))
            stream = only_stream(running)
            await eventually(lambda: stream.in_flight == cap, "the stream is at its cap")
            await entered_forward()
            stats = batcher.stats
            await eventually(lambda: stats.queued + stats.in_flight == cap, "cap items taken")
            assert stream.in_flight == cap
            record.gate.set()
            answers = {doc["id"]: ys(doc) for doc in [await answer(ws) for _ in range(200)]}
        assert answers == {f"r{i}": [2.0 * i] for i in range(200)}
        assert max(map(len, record.batches)) <= cap, "never more than the cap was accepted"


# -- shutdown ------------------------------------------------------------------------


async def test_shutdown_answers_every_accepted_request_then_closes_with_1001(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as running:
        record = recorder("echo")
        record.gate.clear()
        batcher = served(running).batcher
        async with stream_to(running) as ws:
            for i in range(5):
                await ws.send(request(f"r{i}", float(i)))
            stream = only_stream(running)
            await entered_forward()
            stats = batcher.stats
            await eventually(lambda: stats.queued + stats.in_flight == 5, "five items taken")
            running.server.should_exit = True
            await eventually(lambda: stream.draining, "the drain has begun")
            await ws.send(request("unread", 99.0))  # sent after the drain began: never read
            record.gate.set()
            answers = {doc["id"]: ys(doc) for doc in [await answer(ws) for _ in range(5)]}
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), WAIT)
        assert answers == {f"r{i}": [2.0 * i] for i in range(5)}
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001
        assert 99.0 not in record.computed


async def test_a_new_stream_is_refused_with_503_while_the_server_drains(tmp_path: Path) -> None:
    with serving(tmp_path) as running:
        record = recorder("echo")
        record.gate.clear()
        async with stream_to(running) as ws:
            await ws.send(request("held", 1.0))
            await entered_forward()
            running.server.should_exit = True
            await eventually(lambda: registry(running).draining, "the drain has begun")
            with pytest.raises(InvalidStatus) as refused:
                async with stream_to(running):
                    pass
            assert refused.value.response.status_code == 503
            record.gate.set()
            assert ys(await answer(ws)) == [2.0]


async def test_requests_still_running_at_the_drain_deadline_are_answered_503_before_1001(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, settings={"drain_timeout": 0.5}) as running:
        record = recorder("echo")
        record.gate.clear()
        async with stream_to(running) as ws:
            for i in range(3):
                await ws.send(request(f"r{i}", float(i)))
            stream = only_stream(running)
            await eventually(lambda: stream.pending == 3, "three requests submitted")
            running.server.should_exit = True
            errors = [await answer(ws) for _ in range(3)]  # the gate stays closed
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), WAIT)
        record.gate.set()
        assert sorted(doc["id"] for doc in errors) == ["r0", "r1", "r2"]
        assert {(doc["status"], doc["reason"]) for doc in errors} == {(503, "shutting_down")}
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1001
