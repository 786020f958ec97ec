"""Callers that leave before their batch runs are never computed, and leave
nothing behind (RELIABILITY R7), against a real uvicorn.

Half of 100 queued requests, HTTP and WebSocket, go away while the gate
holds the model: HTTP clients close their socket (FIN or reset), streams
close with 1000 or are reset (SO_LINGER 0). Then a client process is
``kill -9``'d over and over while it has requests in flight. Each case ends
with the server's tasks and open fds back where they were, no error logged,
and the server still serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from server.models import ServedModel
from server.settings import Settings
from tests.fakes import infer_body, model_dir, recorder, wait_until
from tests.servers import Running, in_thread, scrape

WAIT = 30.0  # bound on any wait in these tests
SETTLE = 5.0  # the scenario's bound for tasks and fds to come back
SLACK = 2  # tasks and fds may differ from their baseline by this much
INFER = "/v2/models/echo/infer"
HTTP_KEEP, HTTP_LEAVE = range(1, 26), range(101, 126)
WS_KEEP, WS_CLOSE, WS_RESET = range(201, 226), range(301, 316), range(401, 411)
PER_STREAM = 5  # requests per WebSocket connection


@pytest.fixture
def errors() -> Iterator[list[logging.LogRecord]]:
    """Every record logged at ERROR or with an exception while the test runs.

    uvicorn's loggers do not propagate to the root logger (caplog's), so the
    handler sits on both."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR or record.exc_info:
                records.append(record)

    handler = Keep(logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@contextmanager
def serving(root: Path, **model: Any) -> Iterator[Running]:
    """A server over the fake echo model; its gate is open again when this exits."""
    model_dir(root, "echo", queue_timeout_ms=120_000, **model)
    try:
        with in_thread(Settings(models_dir=root, torch_threads=1)) as running:
            yield running
            recorder("echo").gate.set()  # before the server's own drain waits on it
    finally:
        recorder("echo").gate.set()


def batcher_stats(running: Running) -> Any:
    model: ServedModel | None = running.app.models.get("echo")
    assert model is not None
    return model.batcher.stats


async def server_tasks(running: Running) -> int:
    """asyncio tasks alive on the server's event loop (not counting this probe)."""

    async def count() -> int:
        return len(asyncio.all_tasks()) - 1

    loop = running.server.servers[0].get_loop()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(count(), loop))


def open_fds() -> int:
    """This process's open fds: the in-thread server's and the test's clients'."""
    return len(os.listdir("/proc/self/fd"))


async def settles(probe: Callable[[], Awaitable[int]], baseline: int, what: str) -> int:
    """The probe's value once it is within SLACK of ``baseline`` (bounded by SETTLE)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + SETTLE
    while True:
        value = await probe()
        if abs(value - baseline) <= SLACK or loop.time() > give_up:
            assert abs(value - baseline) <= SLACK, f"{what}: {value}, baseline {baseline}"
            return value
        await asyncio.sleep(0.05)


async def fds() -> int:
    return open_fds()


async def metrics(running: Running) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=running.url, timeout=WAIT) as client:
        return scrape((await client.get("/metrics")).text)


def cancelled(figures: dict[str, float]) -> tuple[float, float]:
    """(requests answered 'cancelled', items dropped as cancelled)."""
    return (
        figures.get('carpool_requests_total{model="echo",outcome="cancelled"}', 0.0),
        figures.get('carpool_dropped_items_total{model="echo",reason="cancelled"}', 0.0),
    )


def reset(transport: asyncio.WriteTransport) -> None:
    """Drop a connection with a TCP reset: SO_LINGER 0, then close."""
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def raw_post(port: int, x: float) -> asyncio.StreamWriter:
    """An infer request for ``x`` on its own connection, sent whole and left waiting."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    body = orjson.dumps(infer_body([x]))
    writer.write(
        b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (INFER.encode(), len(body), body)
    )
    await writer.drain()
    return writer


async def open_stream(running: Running, xs: range) -> ClientConnection:
    """A WebSocket stream with one request per value of ``xs`` sent on it."""
    url = running.url.replace("http", "ws", 1) + "/v2/models/echo/stream"
    ws = await connect(url, compression=None)
    for x in xs:
        await ws.send(orjson.dumps({"id": str(x), **infer_body([x])}).decode())
    return ws


def chunks(values: range) -> list[range]:
    return [values[i : i + PER_STREAM] for i in range(0, len(values), PER_STREAM)]


async def test_fifty_of_a_hundred_queued_callers_leave_and_none_of_them_is_computed(
    tmp_path: Path, errors: list[logging.LogRecord]
) -> None:
    leavers = {*HTTP_LEAVE, *WS_CLOSE, *WS_RESET}
    keepers = {*HTTP_KEEP, *WS_KEEP}
    assert (len(leavers), len(keepers)) == (50, 50)
    with serving(tmp_path, max_batch_size=8, max_queue=256) as running:
        record = recorder("echo")
        stats = batcher_stats(running)
        before = cancelled(await metrics(running))
        idle_tasks, idle_fds = await server_tasks(running), open_fds()
        record.gate.clear()
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=running.url, timeout=WAIT, limits=limits) as client:
            held = asyncio.create_task(client.post(INFER, json=infer_body([0.0])))
            await asyncio.wait_for(asyncio.to_thread(record.entered.wait), WAIT)
            # The 50 that stay are queued first: with them in place, the
            # tasks and fds are the baseline the leavers must return to.
            kept = [
                asyncio.create_task(client.post(INFER, json=infer_body([x]))) for x in HTTP_KEEP
            ]
            streams = [await open_stream(running, xs) for xs in chunks(WS_KEEP)]
            await wait_until(lambda: stats.queued == 50, WAIT)
            await asyncio.sleep(0.1)  # every request's disconnect watch has started
            tasks, fds_before = await server_tasks(running), open_fds()

            http_leavers = [await raw_post(running.port, x) for x in HTTP_LEAVE]
            closers = [await open_stream(running, xs) for xs in chunks(WS_CLOSE)]
            resetters = [await open_stream(running, xs) for xs in chunks(WS_RESET)]
            await wait_until(lambda: stats.queued == 100, WAIT)
            await asyncio.sleep(0.1)
            for i, writer in enumerate(http_leavers):
                if i % 2:
                    reset(writer.transport)
                else:
                    writer.close()
            for ws in closers:
                await ws.close(1000)
            for ws in resetters:
                assert ws.transport is not None
                reset(ws.transport)
            await wait_until(lambda: stats.queued == 50, WAIT)

            figures = await metrics(running)
            after = cancelled(figures)
            assert (after[0] - before[0], after[1] - before[1]) == (50, 50)
            await settles(lambda: server_tasks(running), tasks, "server tasks after the leavers")
            await settles(fds, fds_before, "open fds after the leavers")

            record.gate.set()
            answers = await asyncio.wait_for(asyncio.gather(held, *kept), WAIT)
            assert [r.status_code for r in answers] == [200] * 26
            assert [r.json()["outputs"][0]["data"] for r in answers] == [
                [0.0],
                *([2.0 * x] for x in HTTP_KEEP),
            ]
            streamed: dict[str, Any] = {}
            for ws, xs in zip(streams, chunks(WS_KEEP), strict=True):
                for _ in xs:
                    doc = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
                    streamed[doc["id"]] = doc.get("outputs", doc)
                await ws.close()
            assert streamed == {
                str(x): [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [2.0 * x]}]
                for x in WS_KEEP
            }
        computed = set(record.computed)
        assert computed & leavers == set(), "a caller that left was computed"
        assert computed == {0.0, *keepers}
        assert cancelled(await metrics(running)) == after, "no further cancellations"
        await settles(lambda: server_tasks(running), idle_tasks, "server tasks at the end")
        await settles(fds, idle_fds, "open fds at the end")
    assert [r.getMessage() for r in errors] == []


async def test_a_client_that_resets_with_a_pipelined_request_queued_is_cancelled_too(
    tmp_path: Path, errors: list[logging.LogRecord]
) -> None:
    # uvicorn tells only the newest (pipelined, not started) request that
    # the client left; the one ahead of it used to be computed and then
    # answered into a closed transport (found by the kill -9 test below)
    with serving(tmp_path, max_batch_size=8, max_queue=256) as running:
        record = recorder("echo")
        stats = batcher_stats(running)
        before = cancelled(await metrics(running))
        record.gate.clear()
        async with httpx.AsyncClient(base_url=running.url, timeout=WAIT) as client:
            held = asyncio.create_task(client.post(INFER, json=infer_body([0.0])))
            await asyncio.wait_for(asyncio.to_thread(record.entered.wait), WAIT)
            first = await raw_post(running.port, 501.0)
            await wait_until(lambda: stats.queued == 1, WAIT)
            body = orjson.dumps(infer_body([502.0]))
            first.write(
                b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s"
                % (INFER.encode(), len(body), body)
            )
            await first.drain()
            await asyncio.sleep(0.1)  # the second request is parsed and waits its turn
            reset(first.transport)
            await wait_until(lambda: stats.queued == 0, WAIT)
            assert cancelled(await metrics(running))[0] - before[0] == 1
            record.gate.set()
            assert (await held).status_code == 200
        assert record.computed == [0.0]
    assert [r.getMessage() for r in errors] == []


# A client process that keeps requests in flight: 8 keep-alive connections
# posting in a loop, one with half a body sent, one stream with 8 requests
# queued. Standard library only, so it starts in a few tens of milliseconds.
CHILD = r"""
import base64, json, os, socket, struct, sys

port = int(sys.argv[1])

def post(x):
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [x]}]})
    head = "POST /v2/models/echo/infer HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
    return (head + "content-length: %d\r\n\r\n%s" % (len(body), body)).encode()

def frame(text):
    data, mask = text.encode(), os.urandom(4)
    head = bytes([0x81, 0x80 | len(data)]) if len(data) < 126 else bytes([0x81, 0xFE]) + struct.pack(">H", len(data))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))

ws = socket.create_connection(("127.0.0.1", port))
key = base64.b64encode(os.urandom(16)).decode()
ws.sendall((
    "GET /v2/models/echo/stream HTTP/1.1\r\nhost: t\r\nupgrade: websocket\r\n"
    "connection: upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: %s\r\n\r\n" % key
).encode())
ws.recv(4096)
for i in range(8):
    ws.sendall(frame(json.dumps({"id": str(i), "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [i]}]})))
half = socket.create_connection(("127.0.0.1", port))
half.sendall(post(1.0)[:-4])
busy = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
for sock in busy:
    sock.sendall(post(2.0))
print("sent", flush=True)
while True:
    for sock in busy:
        sock.recv(65536)
        sock.sendall(post(3.0))
"""


async def test_a_client_process_killed_again_and_again_leaves_the_server_serving(
    tmp_path: Path, errors: list[logging.LogRecord]
) -> None:
    with serving(tmp_path, max_batch_size=8, max_queue=256, options={"sleep_ms": 20}) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=WAIT) as client:
            assert (await client.post(INFER, json=infer_body([1.0]))).status_code == 200
        idle_tasks, idle_fds = await server_tasks(running), open_fds()
        before = cancelled(await metrics(running))
        rng = random.Random(7)
        loop = asyncio.get_running_loop()
        stop, kills = loop.time() + 3.0, 0
        while loop.time() < stop:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CHILD, str(running.port), stdout=asyncio.subprocess.PIPE
            )
            try:
                assert child.stdout is not None
                line = await asyncio.wait_for(child.stdout.readline(), WAIT)
                assert line == b"sent\n"
                await asyncio.sleep(rng.uniform(0.0, 0.1))
            finally:
                child.kill()  # SIGKILL, to this child's pid
                await child.wait()
            kills += 1
        assert kills >= 3
        # the kills landed while requests were queued or running
        assert cancelled(await metrics(running))[0] > before[0]
        async with httpx.AsyncClient(base_url=running.url, timeout=WAIT) as client:
            assert (await client.get("/v2/health/live")).status_code == 200
            answer = await client.post(INFER, json=infer_body([2.5]))
            assert answer.status_code == 200
            assert answer.json()["outputs"][0]["data"] == [5.0]
        await settles(lambda: server_tasks(running), idle_tasks, "server tasks after the kills")
        await settles(fds, idle_fds, "open fds after the kills")
    assert [r.getMessage() for r in errors] == []
