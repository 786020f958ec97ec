"""``server/direct.py``: the infer route answered by the HTTP protocol itself.

A plain ``POST /v2/models/{name}/infer`` takes the direct lane; the same
request with a chunked body takes uvicorn's ASGI way to the same
transaction. Every case of ``test_infer`` must get the same answer both
ways, byte for byte but for the date and the timing values. Then what the
lane must keep: pipelined requests answered in order across both lanes,
HTTP/1.0 closing, a client that leaves withdrawing its queued items, no
task per request, tokens, and the requests it must leave to the ASGI way.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from server.direct import DirectLane, DirectRequest
from server.settings import Settings
from tests.fakes import infer_body, model_dir, recorder, wait_until
from tests.server.test_infer import CASES
from tests.servers import Running, in_thread

WAIT = 30.0
Answer = tuple[int, dict[str, str], bytes]
TIMINGS = ("x-carpool-queue-ms", "x-carpool-compute-ms")


def head(path: str, length: int | None, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def direct(model: str, body: bytes, *extra: str) -> bytes:
    return head(f"/v2/models/{model}/infer", len(body), *extra) + body


def chunked(model: str, body: bytes) -> bytes:
    """The same request with a chunked body: the ASGI way."""
    framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    return head(f"/v2/models/{model}/infer", None, "Transfer-Encoding: chunked") + framed


def read_answers(sock: socket.socket, count: int) -> list[Answer]:
    """``count`` Content-Length-framed answers from ``sock``."""
    buffer = b""
    answers: list[Answer] = []
    while len(answers) < count:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            lines = buffer[:end].decode("latin-1").split("\r\n")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                assert name.lower() not in headers, f"header {name} twice"
                headers[name.lower()] = value.strip()
            length = int(headers["content-length"])
            if len(buffer) >= end + 4 + length:
                answers.append(
                    (int(lines[0].split()[1]), headers, buffer[end + 4 : end + 4 + length])
                )
                buffer = buffer[end + 4 + length :]
                continue
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed after {len(answers)} of {count} answers")
        buffer += data
    return answers


def exchange(port: int, data: bytes, count: int = 1) -> list[Answer]:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(data)
        return read_answers(sock, count)


def comparable(answer: Answer) -> Answer:
    status, headers, body = answer
    kept = {k: v for k, v in headers.items() if k != "date"}
    for name in TIMINGS:
        if name in kept:
            kept[name] = re.sub(r"[0-9.]+", "N", kept[name])
    return status, kept, body


@pytest.mark.parametrize("case", list(CASES))
def test_both_lanes_give_the_same_answer(served: Running, case: str) -> None:
    model, body = CASES[case]
    (lane,) = exchange(served.port, direct(model, body))
    (asgi,) = exchange(served.port, chunked(model, body))
    assert comparable(lane) == comparable(asgi)
    assert "connection" not in lane[1] or model == "no-such-model"


def test_pipelined_requests_are_answered_in_order_across_both_lanes(served: Running) -> None:
    ok = CASES["a good request"][1]
    bad = CASES["a wrong shape"][1]
    live = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    burst = direct("digits", ok) + live + direct("digits", bad) + chunked("digits", ok)
    burst += direct("digits", ok)
    answers = exchange(served.port, burst, 5)
    assert [status for status, _, _ in answers] == [200, 200, 400, 200, 200]
    assert answers[1][2] == b'{"live":true}'
    assert comparable(answers[0]) == comparable(answers[3]) == comparable(answers[4])


def test_http_1_0_is_answered_and_closed(served: Running) -> None:
    body = CASES["a good request"][1]
    with socket.create_connection(("127.0.0.1", served.port), timeout=WAIT) as sock:
        sock.sendall(head("/v2/models/digits/infer", len(body), version="1.0") + body)
        ((status, headers, _),) = read_answers(sock, 1)
        assert (status, headers["connection"]) == (200, "close")
        assert sock.recv(1) == b""  # closed by the server


def test_a_body_in_many_pieces(served: Running) -> None:
    body = CASES["two items"][1]
    with socket.create_connection(("127.0.0.1", served.port), timeout=WAIT) as sock:
        sock.sendall(head("/v2/models/digits/infer", len(body)))
        for start in range(0, len(body), 100):
            sock.sendall(body[start : start + 100])
        ((status, _, answer),) = read_answers(sock, 1)
    assert status == 200
    assert comparable(exchange(served.port, chunked("digits", body))[0])[2] == answer


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Running]:
    """A server over the fake echo model, its gate shut until the test ends."""
    model_dir(tmp_path, "echo", queue_timeout_ms=120_000, max_batch_size=1)
    try:
        with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
            yield running
            recorder("echo").gate.set()
    finally:
        recorder("echo").gate.set()


def test_a_client_that_leaves_withdraws_its_queued_items(gated: Running) -> None:
    echo = recorder("echo")
    echo.gate.clear()
    stats = gated.app.models.resolve("echo").batcher.stats
    first = socket.create_connection(("127.0.0.1", gated.port), timeout=WAIT)
    first.sendall(direct("echo", _echo(1.0)))
    assert echo.entered.wait(WAIT)  # 1.0 holds the model; the next ones queue
    leaving = [socket.create_connection(("127.0.0.1", gated.port), timeout=WAIT) for _ in range(3)]
    for number, sock in enumerate(leaving):
        sock.sendall(direct("echo", _echo(10.0 + number)))
    asyncio.run(wait_until(lambda: stats.queued == 3, WAIT))
    # no task per request: uvicorn's task set has none of the four
    assert not gated.server.server_state.tasks
    for sock in leaving:
        sock.close()
    asyncio.run(wait_until(lambda: stats.dropped["cancelled"] == 3, WAIT))
    assert stats.queued == 0
    echo.gate.set()
    ((status, _, _),) = read_answers(first, 1)
    first.close()
    assert status == 200
    assert echo.computed == [1.0]  # the three that left were never computed


def _echo(x: float) -> bytes:
    return orjson.dumps(infer_body([x]))


def test_tokens_are_checked_on_the_direct_lane(tmp_path: Path) -> None:
    model_dir(tmp_path, "echo")
    settings = Settings(models_dir=tmp_path, torch_threads=1, auth_tokens="secret-1,secret-2")
    with in_thread(settings) as running:
        body = _echo(2.0)
        good = exchange(running.port, direct("echo", body, "Authorization: Bearer secret-2"))
        missing = exchange(running.port, direct("echo", body))
        wrong = exchange(running.port, direct("echo", body, "Authorization: Bearer secret-3"))
    assert good[0][0] == 200
    assert missing[0][0] == wrong[0][0] == 401
    assert missing[0][1]["www-authenticate"].startswith("Bearer")


def _lane(served: Running) -> DirectLane:
    """The lane over the session server's models, with limits of 1,000 bytes."""
    lane = DirectLane.for_app(served.app, Settings(max_body_bytes=1000, max_header_bytes=1000))
    assert lane is not None
    return lane


PLAIN = [(b"host", b"x"), (b"content-length", b"10")]


@pytest.mark.parametrize(
    ("method", "url", "headers", "why"),
    [
        (b"GET", b"/v2/models/digits/infer", PLAIN, "not a POST"),
        (b"POST", b"/v2/models/n/infer", PLAIN, "an unknown model: Starlette's 404"),
        (b"POST", b"/v2/models/digits/versions/1/infer", PLAIN, "a versioned path"),
        (b"POST", b"/v2/models/digits/infer?x=1", PLAIN, "a query string"),
        (b"POST", b"/v2/models/%64igits/infer", PLAIN, "an escaped path"),
        (b"POST", b"/v2/models/digits/infer", [(b"host", b"x")], "no Content-Length"),
        (
            b"POST",
            b"/v2/models/digits/infer",
            [(b"content-length", b"1001")],
            "a body over the limit",
        ),
        (
            b"POST",
            b"/v2/models/digits/infer",
            [*PLAIN, (b"expect", b"100-continue")],
            "Expect: uvicorn answers 100 Continue",
        ),
        (
            b"POST",
            b"/v2/models/digits/infer",
            [*PLAIN, (b"transfer-encoding", b"chunked")],
            "a chunked body",
        ),
        (
            b"POST",
            b"/v2/models/digits/infer",
            [*PLAIN, (b"x-big", b"v" * 1000)],
            "headers over the limit",
        ),
    ],
)
def test_what_takes_the_asgi_way(
    served: Running, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], why: str
) -> None:
    assert _lane(served).take(None, method, url, headers, True) is None, why  # type: ignore[arg-type]


def test_a_plain_infer_request_takes_the_lane(served: Running) -> None:
    taken = _lane(served).take(None, b"POST", b"/v2/models/digits/infer", PLAIN, True)  # type: ignore[arg-type]
    assert isinstance(taken, DirectRequest)
    assert taken.keep_alive
    assert not taken.started
    assert not taken.complete
