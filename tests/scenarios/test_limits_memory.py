"""What abusive requests cost the server in memory (RELIABILITY R17).

The server runs as a child process so that its memory is its own: before each
case the child's peak RSS (VmHWM) is reset through /proc/PID/clear_refs, and
after it the new peak is compared with the RSS the case started from. A
server that buffered a body past the limit, or allocated the tensor a
declared shape asks for, shows up in the peak even if it freed it since.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes import infer_body, model_dir
from tests.servers import Child, subprocess_server

ECHO = "/v2/models/echo/infer"
BODY_LIMIT = 1024 * 1024
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    root = model_dir(tmp_path_factory.mktemp("memory"))
    env = {"CARPOOL_MAX_BODY_BYTES": str(BODY_LIMIT), "CARPOOL_TORCH_THREADS": "1"}
    with subprocess_server(["--models", str(root)], env=env) as running:
        yield running


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Peak:
    """The child's peak RSS growth, in bytes, over a ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0

    def __enter__(self) -> Peak:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.start = _status_kib(self.pid, "VmRSS")
        return self

    def __exit__(self, *_: object) -> None:
        self.growth = (_status_kib(self.pid, "VmHWM") - self.start) * 1024


async def _still_serving(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        answer = await client.post(ECHO, json=infer_body([1.5]))
        assert answer.json()["outputs"][0]["data"] == [3.0]


async def _warm(url: str) -> None:
    """One of each request first, so that what is measured is the abuse, not
    the first use of a code path."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await client.post(ECHO, json=infer_body([1.0] * 4))
        await client.post(ECHO, content=b"[" * 1000)


async def test_a_1_gib_chunked_body_costs_at_most_the_limit_plus_16_mib(child: Child) -> None:
    await _warm(child.url)
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"1" * 64 * 1024)
    with Peak(child.process.pid) as peak:
        reader, writer = await asyncio.open_connection("127.0.0.1", child.port)
        writer.write(
            f"POST {ECHO} HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n".encode()
        )
        answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        sent = 0
        while not answer.done() and sent < 1024**3:
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                break
            sent += 64 * 1024
            await asyncio.sleep(0)
        head = await asyncio.wait_for(answer, 30)
        writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert peak.growth <= BODY_LIMIT + 16 * MIB
    await _still_serving(child.url)


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**31, 2**31], [0, 1], [-1, 1]])
async def test_an_impossible_shape_costs_under_1_mib(child: Child, shape: list[int]) -> None:
    await _warm(child.url)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [1.0]}]}
    async with httpx.AsyncClient(base_url=child.url, timeout=30) as client:
        with Peak(child.process.pid) as peak:
            answer = await client.post(ECHO, json=body)
    assert answer.status_code == 400
    assert peak.growth < MIB
    await _still_serving(child.url)


async def test_json_nested_100000_deep_is_refused_at_once_and_costs_little(child: Child) -> None:
    await _warm(child.url)
    depth = 100_000
    body = b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
    async with httpx.AsyncClient(base_url=child.url, timeout=30) as client:
        with Peak(child.process.pid) as peak:
            started = time.monotonic()
            answer = await client.post(ECHO, content=body)
            seconds = time.monotonic() - started
    assert answer.status_code == 400
    # R17 asks < 100 ms on a quiet machine; a recursion blow-up would take seconds
    assert seconds < 1.0
    assert peak.growth < 4 * MIB  # the 200 KB body itself, plus little
    await _still_serving(child.url)


async def test_the_peak_measure_sees_a_body_the_server_holds(child: Child) -> None:
    """Control: a valid body just under the limit must show in the peak, or
    the bounds above prove nothing."""
    await _warm(child.url)
    body = orjson.dumps(infer_body([1.0])) + b" " * (BODY_LIMIT - 1024)
    async with httpx.AsyncClient(base_url=child.url, timeout=30) as client:
        with Peak(child.process.pid) as peak:
            answer = await client.post(ECHO, content=body)
    assert answer.status_code == 200
    assert peak.growth >= BODY_LIMIT // 2
