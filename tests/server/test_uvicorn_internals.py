"""``server/uvicorn_internals/``: an answer leaves in one write.

uvicorn writes a response's status line and headers, then its body, as two
``transport.write`` calls: two syscalls per answer. The transport a request's
cycle sees holds the head back for the body's first write. These drive that
transport with a fake connection and count what reaches the socket.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from server.settings import Settings
from server.uvicorn_internals import (
    _BODY,
    _IDLE,
    DeadlineProtocol,
    _ResponseTransport,
)
from tests.keepalive import Pool
from tests.servers import ROOT, in_thread, scrape, subprocess_server

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Socket(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Cycle:
    def __init__(self, method: str = "POST") -> None:
        self.scope = {"method": method}
        self.response_started = False


class Connection:
    def __init__(self, phase: int = _IDLE) -> None:
        self.transport = Socket()
        self._phase = phase
        self.lingered = False

    def _linger(self) -> None:
        self.lingered = True


def transport_for(
    method: str = "POST", phase: int = _IDLE
) -> tuple[_ResponseTransport, Cycle, Connection]:
    connection, cycle = Connection(phase), Cycle(method)
    transport = _ResponseTransport(
        cast(DeadlineProtocol, connection), cast(RequestResponseCycle, cycle)
    )
    return transport, cycle, connection


def test_the_head_and_the_body_leave_in_one_write() -> None:
    transport, cycle, connection = transport_for()
    cycle.response_started = True
    transport.write(HEAD)
    assert connection.transport.writes == []
    transport.write(b"ok")
    assert connection.transport.writes == [HEAD + b"ok"]


def test_a_100_continue_before_the_response_goes_out_at_once() -> None:
    transport, cycle, connection = transport_for()
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert connection.transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    transport.write(HEAD)
    transport.write(b"ok")
    assert connection.transport.writes[1:] == [HEAD + b"ok"]


def test_a_head_request_whose_answer_has_no_body_write_is_not_held() -> None:
    transport, cycle, connection = transport_for("HEAD")
    cycle.response_started = True
    transport.write(HEAD)
    assert connection.transport.writes == [HEAD]


def test_closing_with_a_held_head_sends_it_first() -> None:
    transport, cycle, connection = transport_for()
    cycle.response_started = True
    transport.write(HEAD)
    transport.close()
    assert connection.transport.writes == [HEAD]
    assert connection.transport.closed


def test_a_large_body_is_not_copied_onto_its_head() -> None:
    transport, cycle, connection = transport_for()
    cycle.response_started = True
    body = b"x" * (1024 * 1024)
    transport.write(HEAD)
    transport.write(body)
    transport.write(b"more")
    assert connection.transport.writes == [HEAD, body, b"more"]


def test_closing_while_the_request_body_still_arrives_lingers() -> None:
    transport, cycle, connection = transport_for(phase=_BODY)
    cycle.response_started = True
    transport.write(HEAD)
    transport.write(b"ok")  # an early answer, such as a 413
    transport.close()
    assert connection.lingered
    assert not connection.transport.closed


# -- the garbage collector while serving ----------------------------------------


def test_a_serving_process_does_not_collect_while_requests_are_in_flight(tmp_path: Path) -> None:
    """``carpool serve`` raises the young-generation threshold once it serves:
    at Python's 700, the objects of a few hundred requests in flight start
    collections that walk all of them, more the more load there is."""
    (tmp_path / "digits").symlink_to(ROOT / "weights" / "digits")
    with subprocess_server(["--models", str(tmp_path), "--torch-threads", "1"]) as child:
        before = asyncio.run(_young_collections(child.port))
        asyncio.run(_load(child.port, requests=4000, in_flight=400))
        after = asyncio.run(_young_collections(child.port))
    assert after - before <= 2


async def _young_collections(port: int) -> float:
    async with Pool(port, 1) as pool:
        page = await pool.get("/metrics")
    return scrape(page.body.decode())['python_gc_collections_total{generation="0"}']


async def _load(port: int, requests: int, in_flight: int) -> None:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1] * 64}]}
    async with Pool(port, in_flight) as pool:
        answers = await asyncio.gather(
            *(pool.post("/v2/models/digits/infer", body) for _ in range(requests))
        )
    assert all(answer.status == 200 for answer in answers)


# -- keep-alive: one timer per connection, not one per answer ---------------------


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout_and_a_busy_one_is_not(
    tmp_path: Path,
) -> None:
    (tmp_path / "digits").symlink_to(ROOT / "weights" / "digits")
    settings = Settings(models_dir=tmp_path, torch_threads=1)
    with in_thread(settings, timeout_keep_alive=1) as running:
        live = b"GET /v2/health/live HTTP/1.1\r\nhost: t\r\n\r\n"
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as busy:
            # a request every 0.4 s for 2.4 s: never idle for the 1 s timeout
            for _ in range(6):
                busy.sendall(live)
                assert busy.recv(4096).startswith(b"HTTP/1.1 200 ")
                time.sleep(0.4)
            busy.sendall(live)
            assert busy.recv(4096).startswith(b"HTTP/1.1 200 ")
            idle_from = time.monotonic()
            assert busy.recv(4096) == b""  # then idle: closed by the server
            assert 0.9 <= time.monotonic() - idle_from < 5
