"""WebSocket abuse (RELIABILITY R21) and in-flight streams across shutdown
(R10), against a real uvicorn on loopback.

The faults are sent from a plain socket (``RawStream``): a client library
answers pings, masks its frames and refuses to send bad UTF-8, which is
exactly what these tests must not do. Memory is read from the server
process's ``/proc/PID/status``, so the servers that are measured run as
children. What uvicorn's websockets-sansio protocol does with each fault
(read from its source): a missed pong is a close 1011 "keepalive ping
timeout" and the socket is closed; a frame the parser rejects (unmasked,
reserved bits, unknown opcode, bad control frame) is a close 1002; invalid
UTF-8 in a text message is a close 1007; a message over ``ws_max_size`` is a
close 1009 as soon as its frame header announces it, before its payload is
read. In every case the server closes the TCP connection at once and the app
sees ``websocket.disconnect``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from server.app import create_app
from server.cli import uvicorn_config
from server.settings import Settings
from server.websocket import StreamRegistry
from tests.fakes import infer_body, model_dir, wait_until
from tests.servers import Child, Running, in_thread, scrape, subprocess_server

WAIT = 30.0  # the longest any awaited condition may take before a test fails
MIB = 1024 * 1024

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


# -- a raw WebSocket client ------------------------------------------------------


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, key: bytes | None = None
) -> bytes:
    """One client frame. ``key=None`` masks with a random key; ``key=b""``
    sends it unmasked, which a server must refuse."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    masked = 0x80 if key != b"" else 0
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, masked | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, masked | 126, n)
    else:
        head = struct.pack("!BBQ", first, masked | 127, n)
    if not masked:
        return head + payload
    key = key or os.urandom(4)
    return head + key + _mask(payload, key)


def _mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


@dataclass
class Frame:
    opcode: int
    payload: bytes
    at: float  # time.monotonic() when it was read

    @property
    def code(self) -> int:
        """A close frame's status code (1005 when it carries none)."""
        assert self.opcode == CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else 1005


class RawStream:
    """A WebSocket client on a plain blocking socket: it sends exactly the
    bytes a test gives it and answers nothing on its own."""

    def __init__(self, port: int, path: str = "/v2/models/echo/stream") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self._buffer = bytearray()
        while b"\r\n\r\n" not in self._buffer:
            assert self._fill(), "the server closed the connection during the handshake"
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer = bytearray(rest)
        status = head.split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 101"), status
        self.opened = time.monotonic()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, request_id: str, *xs: float) -> None:
        self.send(frame(TEXT, request(request_id, *xs).encode()))

    def read(self) -> Frame | None:
        """The next frame from the server; None once the connection has ended."""
        first = self._take(2)
        if first is None:
            return None
        opcode, length = first[0] & 0x0F, first[1] & 0x7F
        if length >= 126:
            extended = self._take(2 if length == 126 else 8)
            if extended is None:
                return None
            length = int.from_bytes(extended, "big")
        payload = self._take(length)
        return None if payload is None else Frame(opcode, payload, time.monotonic())

    def answer(self) -> dict[str, Any]:
        """The next text frame, skipping pings."""
        while (got := self.read()) is not None:
            if got.opcode == TEXT:
                doc: dict[str, Any] = orjson.loads(got.payload)
                return doc
            assert got.opcode == PING, f"expected an answer, got opcode {got.opcode}"
        raise AssertionError("the connection ended before the answer")

    def rest(self) -> list[Frame]:
        """Every frame until the connection ends (bounded by the socket timeout)."""
        frames = []
        while (got := self.read()) is not None:
            frames.append(got)
        return frames

    def until_quiet(self, seconds: float) -> tuple[list[Frame], bool]:
        """Every frame until none comes for ``seconds``; and whether the
        connection is still open then."""
        frames = []
        self.sock.settimeout(seconds)
        try:
            while (got := self.read()) is not None:
                frames.append(got)
        except TimeoutError:
            return frames, True
        finally:
            self.sock.settimeout(WAIT)
        return frames, False

    def close(self) -> None:
        self.sock.close()

    def _take(self, n: int) -> bytes | None:
        while len(self._buffer) < n:
            if not self._fill():
                return None
        taken = bytes(self._buffer[:n])
        del self._buffer[:n]
        return taken

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            return False
        self._buffer += chunk
        return bool(chunk)


# -- helpers -----------------------------------------------------------------------


def request(request_id: str, *xs: float) -> str:
    return orjson.dumps({"id": request_id, **infer_body(xs)}).decode()


def ys(doc: dict[str, Any]) -> list[float]:
    assert "error" not in doc, doc
    (output,) = doc["outputs"]
    return list(output["data"])


@contextmanager
def serving(root: Path, name: str = "echo", **settings: Any) -> Iterator[Running]:
    model_dir(root, name, queue_timeout_ms=120_000)
    with in_thread(Settings(models_dir=root, torch_threads=1, **settings)) as running:
        yield running


def registry(running: Running) -> StreamRegistry:
    streams: StreamRegistry = running.app.streams
    return streams


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def survives(url: str, model: str = "echo") -> None:
    """After a fault: live within 1 s, and a normal request is answered."""
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
        asked = time.monotonic()
        assert (await http.get("/v2/health/live")).status_code == 200
        assert time.monotonic() - asked <= 1.0
        response = await http.post(f"/v2/models/{model}/infer", json=infer_body([21.0]))
        assert response.status_code == 200
        assert response.json()["outputs"][0]["data"] == [42.0]


@asynccontextmanager
async def live_stream(url: str, path: str = "/v2/models/echo/stream") -> AsyncIterator[Checker]:
    """A well-behaved stream sending request after request while a test runs,
    checking every answer."""
    async with connect(url.replace("http", "ws", 1) + path, compression=None) as ws:
        checker = Checker(ws)
        task = asyncio.create_task(checker.run())
        try:
            yield checker
        finally:
            checker.stop.set()
            await asyncio.wait_for(task, WAIT)


@dataclass
class Checker:
    """One request at a time on ``ws``; every answer checked; stops at the first fault."""

    ws: ClientConnection
    answered: int = 0
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                await self.ws.send(request(f"live{i}", float(i)))
                doc = orjson.loads(await asyncio.wait_for(self.ws.recv(), WAIT))
            except (ConnectionClosed, TimeoutError) as exc:
                self.errors.append(repr(exc))
                return
            if doc.get("id") != f"live{i}" or doc.get("outputs", [{}])[0].get("data") != [2.0 * i]:
                self.errors.append(repr(doc))
            self.answered += 1
            await asyncio.sleep(0.005)

    async def answers_more(self, count: int = 3) -> None:
        """Wait until this stream has had ``count`` more answers (it is still served)."""
        target = self.answered + count
        await wait_until(lambda: self.answered >= target or bool(self.errors), WAIT)


# -- half-open clients: pings ---------------------------------------------------------

PING_INTERVAL = PING_TIMEOUT = 0.5
HALF_OPEN_BOUND = PING_INTERVAL + PING_TIMEOUT + 1.0  # the scenario's bound


def _ponging(raw: RawStream, seconds: float) -> int:
    """Answer every ping for ``seconds``; the number of pings answered."""
    raw.sock.settimeout(0.05)
    pings = 0
    until = time.monotonic() + seconds
    try:
        while time.monotonic() < until:
            try:
                got = raw.read()
            except TimeoutError:
                continue
            assert got is not None, "the server closed a client that answers its pings"
            assert got.opcode == PING, got
            raw.send(frame(PONG, got.payload))
            pings += 1
    finally:
        raw.sock.settimeout(WAIT)
    return pings


@pytest.mark.parametrize("reads", [False, True], ids=["reads-nothing", "reads-never-pongs"])
async def test_a_client_that_never_answers_pings_is_closed_within_interval_plus_timeout(
    tmp_path: Path, reads: bool
) -> None:
    settings: dict[str, Any] = {"ws_ping_interval": PING_INTERVAL, "ws_ping_timeout": PING_TIMEOUT}
    with serving(tmp_path, **settings) as running:
        live = RawStream(running.port)  # answers every ping: it must stay open
        live.request("before", 1.0)
        assert ys(await asyncio.to_thread(live.answer)) == [2.0]
        half_open = RawStream(running.port)
        half_open.request("before", 2.0)
        pinging = asyncio.create_task(asyncio.to_thread(_ponging, live, HALF_OPEN_BOUND + 1.0))
        if reads:
            frames = await asyncio.to_thread(half_open.rest)  # reads, never pongs
        await wait_until(lambda: len(registry(running)) == 1, WAIT)  # only `live` is left
        gone = time.monotonic() - half_open.opened
        assert gone <= HALF_OPEN_BOUND
        assert len(running.server.server_state.connections) == 1, "its socket is closed too"
        if not reads:
            await asyncio.sleep(HALF_OPEN_BOUND - gone)
            frames = await asyncio.to_thread(half_open.rest)  # what it would have read
        opcodes = [f.opcode for f in frames]
        assert opcodes[0] == TEXT
        assert ys(orjson.loads(frames[0].payload)) == [4.0]
        assert PING in opcodes
        assert opcodes[-1] == CLOSE, "the server says why, then closes the socket (EOF)"
        assert frames[-1].code == 1011
        assert b"keepalive ping timeout" in frames[-1].payload
        if reads:
            assert frames[-1].at - half_open.opened <= HALF_OPEN_BOUND
        half_open.close()

        assert await pinging >= 2, "the live client was pinged and answered"
        live.request("after", 3.0)
        assert ys(await asyncio.to_thread(live.answer)) == [6.0]
        assert time.monotonic() - live.opened > HALF_OPEN_BOUND
        live.close()
        await survives(running.url)


# -- garbage frames ------------------------------------------------------------------

GOOD = request("g", 1.0).encode()
GARBAGE: dict[str, tuple[bytes, int]] = {
    "unmasked frame": (frame(TEXT, GOOD, key=b""), 1002),
    "reserved bit set": (frame(TEXT, GOOD, rsv=0b100), 1002),
    "unknown opcode": (frame(0x3, GOOD), 1002),
    "continuation without a start": (frame(0x0, GOOD), 1002),
    "fragmented ping": (frame(PING, b"x", fin=False), 1002),
    "ping over 125 bytes": (frame(PING, b"x" * 200), 1002),
    "close with a bad code": (frame(CLOSE, struct.pack("!H", 999)), 1002),
    "an HTTP request mid-stream": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1002),
    "invalid UTF-8 in a text frame": (frame(TEXT, b'{"id": "\xff\xfe"}'), 1007),
    "invalid UTF-8 across fragments": (frame(TEXT, b"\xe2", fin=False) + frame(0x0, b"("), 1007),
}


@pytest.fixture(scope="module")
def garbage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serving(tmp_path_factory.mktemp("garbage")) as running:
        yield running


@pytest.mark.parametrize("case", GARBAGE)
async def test_a_garbage_frame_mid_stream_closes_that_stream_alone(
    garbage_server: Running, case: str
) -> None:
    data, code = GARBAGE[case]
    async with live_stream(garbage_server.url) as other:
        raw = RawStream(garbage_server.port)
        raw.request("valid", 5.0)  # valid traffic first
        assert ys(await asyncio.to_thread(raw.answer)) == [10.0]
        raw.send(data)
        frames = await asyncio.to_thread(raw.rest)  # up to the EOF
        raw.close()
        assert [f.opcode for f in frames] == [CLOSE], frames
        assert frames[0].code == code
        await wait_until(lambda: len(registry(garbage_server)) == 1, WAIT)  # only `other`
        await other.answers_more()
    assert other.errors == []
    assert other.answered >= 3
    await survives(garbage_server.url)


# -- the server process: over-size messages and floods, measured ----------------------

CAP = 64  # CARPOOL_WS_MAX_IN_FLIGHT
LIMIT = 4 * MIB  # CARPOOL_WS_MAX_MESSAGE_BYTES


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    """carpool as a child process (its memory is its own), over a slow model:
    500 ms a batch of up to CAP items, so a flood cannot be worked off while
    it is watched."""
    root = tmp_path_factory.mktemp("child")
    model_dir(
        root,
        "echo",
        max_batch_size=CAP,
        max_queue=16_384,  # a flood past the cap would queue, not be refused
        max_wait_ms=5,
        queue_timeout_ms=120_000,
        options={"sleep_ms": 500},
    )
    env = {
        "CARPOOL_WS_MAX_MESSAGE_BYTES": str(LIMIT),
        "CARPOOL_WS_MAX_IN_FLIGHT": str(CAP),
        "CARPOOL_TORCH_THREADS": "1",
    }
    with subprocess_server(["--models", str(root)], env=env) as running:
        yield running


async def test_a_64_mib_message_is_closed_1009_within_1_s_without_being_read(child: Child) -> None:
    before = rss(child.process.pid)
    raw = RawStream(child.port)
    sent = [0]

    def send_64_mib() -> None:
        raw.send(struct.pack("!BBQ", 0x80 | BINARY, 0x80 | 127, 64 * MIB) + bytes(4))  # zero key
        chunk = bytes(MIB)
        try:
            for _ in range(64):
                raw.sock.sendall(chunk)
                sent[0] += MIB
        except OSError:
            pass  # the server has closed the connection: the point of the test

    started = time.monotonic()
    sender = threading.Thread(target=send_64_mib)
    sender.start()
    frames = await asyncio.to_thread(raw.rest)
    sender.join(WAIT)
    raw.close()
    assert [f.opcode for f in frames] == [CLOSE]
    assert frames[0].code == 1009
    assert frames[0].at - started <= 1.0
    assert sent[0] < 64 * MIB, "the server closed the connection before reading the message"
    assert rss(child.process.pid) - before <= 2 * LIMIT
    await survives(child.url)


def _waiting(url: str) -> tuple[int, int]:
    """(items queued or in a forward pass, items taken in all) of the model."""
    m = scrape(httpx.get(url + "/metrics", timeout=WAIT).text)
    waiting = int(m['carpool_queue_depth{model="echo"}'] + m['carpool_in_flight{model="echo"}'])
    return waiting, waiting + int(m['carpool_items_total{model="echo"}'])


async def test_a_client_that_floods_without_reading_is_held_at_the_in_flight_cap(
    child: Child,
) -> None:
    """carpool's answer to a flood is backpressure, not a close (1013/1008):
    at CAP unanswered messages it stops reading the socket, the rest of the
    flood stays in the kernel's buffers, and the connection stays open."""
    before = rss(child.process.pid)
    flood = RawStream(child.port)
    messages = 10_000
    blob = b"".join(frame(TEXT, request(f"f{i}", float(i)).encode()) for i in range(messages))

    def send_flood() -> None:
        flood.sock.settimeout(2.0)  # the server stopped reading and the buffers are full
        with suppress(TimeoutError):
            flood.sock.sendall(blob)

    sender = threading.Thread(target=send_flood)
    sender.start()
    samples: list[tuple[int, int]] = []
    peak = before
    for _ in range(60):  # about 1.5 s: three batches at most
        samples.append(await asyncio.to_thread(_waiting, child.url))
        peak = max(peak, rss(child.process.pid))
        await asyncio.sleep(0.02)
    sender.join(WAIT)
    waiting = [w for w, _ in samples]
    assert max(waiting) == CAP, "the cap is reached"
    assert all(w <= CAP for w in waiting), "never more than the cap is taken"
    assert samples[-1][1] < messages, "the rest of the flood is left unread"
    assert peak - before < 64 * MIB

    # the flooding connection is still open (no 1013/1008) and others are served
    async with live_stream(child.url) as other:
        await other.answers_more(1)
    assert other.errors == []
    frames, still_open = flood.until_quiet(0.2)
    assert still_open
    assert {f.opcode for f in frames} <= {TEXT}, "answers only: no close frame"
    flood.close()
    await survives(child.url)


# -- R10: streams in flight across shutdown ---------------------------------------------

STREAMS, OUTSTANDING = 100, 50
DRAIN_TIMEOUT = 30.0


def _slow_model(root: Path) -> None:
    """50 ms a batch of up to 128: the 5,000 requests take about 2 s."""
    model_dir(
        root,
        "echo",
        max_batch_size=128,
        max_queue=STREAMS * OUTSTANDING,
        max_wait_ms=5,
        queue_timeout_ms=120_000,
        options={"sleep_ms": 50},
    )


@dataclass
class StreamEnd:
    answers: dict[str, list[float]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    code: int = 1006  # no close frame: an abnormal close


@dataclass
class Shutdown:
    ends: list[StreamEnd]
    outstanding: int  # requests accepted and not yet computed when the shutdown began
    upgrade_status: int | None  # what a new stream got during the drain (None: no answer)


async def _stream(url: str, index: int) -> StreamEnd:
    end = StreamEnd()
    async with connect(url.replace("http", "ws", 1) + "/v2/models/echo/stream") as ws:
        for j in range(OUTSTANDING):
            await ws.send(request(f"s{index}-{j}", float(index * OUTSTANDING + j)))
        try:
            while True:
                doc = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
                if "error" in doc:
                    end.errors.append(doc)
                else:
                    end.answers[doc["id"]] = doc["outputs"][0]["data"]
        except ConnectionClosed as closed:
            if closed.rcvd is not None:
                end.code = closed.rcvd.code
    return end


async def _taken(url: str) -> tuple[int, int]:
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
        m = scrape((await http.get("/metrics")).text)
    waiting = int(m['carpool_queue_depth{model="echo"}'] + m['carpool_in_flight{model="echo"}'])
    return waiting, waiting + int(m['carpool_items_total{model="echo"}'])


async def _upgrade_during_drain(url: str) -> int | None:
    """Open new streams until one is refused; its HTTP status."""
    for _ in range(int(WAIT / 0.01)):
        try:
            async with connect(url.replace("http", "ws", 1) + "/v2/models/echo/stream"):
                pass  # the drain has not begun yet
        except InvalidStatus as refused:
            return refused.response.status_code
        except (OSError, InvalidHandshake, ConnectionClosed):
            return None  # no HTTP answer (the listener or the connection is gone)
        await asyncio.sleep(0.01)
    return None


async def shutdown_with_streams_in_flight(url: str, shut_down: Callable[[], None]) -> Shutdown:
    """STREAMS streams, each with OUTSTANDING requests accepted and most not
    yet answered, when ``shut_down()`` is called."""
    streams = [asyncio.create_task(_stream(url, i)) for i in range(STREAMS)]
    total = STREAMS * OUTSTANDING
    for _ in range(int(WAIT / 0.02)):
        waiting, taken = await _taken(url)
        if taken >= total:
            break
        await asyncio.sleep(0.02)
    assert taken >= total, "every request was accepted before the shutdown"
    shut_down()
    status = await _upgrade_during_drain(url)
    ends = await asyncio.wait_for(asyncio.gather(*streams), WAIT + DRAIN_TIMEOUT)
    return Shutdown(ends, waiting, status)


def problems(outcome: Shutdown) -> list[str]:
    """R10's pass criteria, as the list of what failed."""
    found = []
    if outcome.outstanding == 0:
        found.append("nothing was outstanding when the shutdown began: the test proves nothing")
    for index, end in enumerate(outcome.ends):
        expected = {f"s{index}-{j}": [2.0 * (index * OUTSTANDING + j)] for j in range(OUTSTANDING)}
        if end.answers != expected or end.errors:
            found.append(
                f"stream {index}: {len(end.answers)}/{OUTSTANDING} answers, errors {end.errors[:1]}"
            )
        if end.code not in (1000, 1001):
            found.append(f"stream {index}: closed with {end.code}")
    if outcome.upgrade_status != 503:
        found.append(f"a new stream during the drain got {outcome.upgrade_status}, not 503")
    return found


async def test_sigterm_answers_every_request_of_100_streams_then_closes_each_with_1001(
    tmp_path: Path,
) -> None:
    _slow_model(tmp_path)
    env = {"CARPOOL_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT), "CARPOOL_TORCH_THREADS": "1"}
    with subprocess_server(["--models", str(tmp_path)], env=env) as server:
        signalled = [0.0]

        def sigterm() -> None:
            signalled[0] = time.monotonic()
            server.signal()

        outcome = await shutdown_with_streams_in_flight(server.url, sigterm)
        assert problems(outcome) == []
        assert await asyncio.to_thread(server.process.wait, DRAIN_TIMEOUT) == 0
        assert time.monotonic() - signalled[0] <= DRAIN_TIMEOUT


class _PlainServer(uvicorn.Server):
    """uvicorn's own Server, telling when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.up.set()


@contextmanager
def plain_uvicorn(settings: Settings) -> Iterator[tuple[str, uvicorn.Server]]:
    """carpool's app under uvicorn's own Server: its shutdown, without the drain."""
    app = create_app(settings)
    config = uvicorn_config(app, settings, port=0, log_level="critical")
    server = _PlainServer(config)
    thread = threading.Thread(target=server.run, name="plain-uvicorn", daemon=True)
    thread.start()
    try:
        while not server.up.wait(0.05):
            assert thread.is_alive(), "plain uvicorn did not start"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(WAIT)


async def test_the_same_check_fails_under_plain_uvicorn_shutdown(tmp_path: Path) -> None:
    """The regression guard: uvicorn alone fails open streams with 1012 at
    once, and the check above must see it."""
    _slow_model(tmp_path)
    settings = Settings(models_dir=tmp_path, torch_threads=1, drain_timeout=5)
    with plain_uvicorn(settings) as (url, server):

        def shut_down() -> None:
            server.should_exit = True  # what uvicorn's SIGTERM handler does

        outcome = await shutdown_with_streams_in_flight(url, shut_down)
    found = problems(outcome)
    assert any("closed with 1012" in p or "closed with 1006" in p for p in found), found
    assert any("answers" in p for p in found), found
