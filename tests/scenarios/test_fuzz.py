"""Protocol fuzzing over raw sockets (RELIABILITY R19) and what error bodies
may reveal (R22).

Valid requests to every route are mutated (request line, headers, framing,
body) by a seeded generator and sent, each on its own loopback connection,
to a real server with short header and body deadlines. Every case must get
an answer or a close (never a hang), no answer may be a 5xx, and the server
serves normally afterwards. ``CARPOOL_FUZZ_CASES`` sets the number of cases:
300 here, more under ``make fuzz``.

Coverage-guided fuzzing (R19's atheris half): each target of
tests/fuzz/targets.py runs for ``CARPOOL_ATHERIS_SECONDS`` (100 here, so
5 minutes for the three; ``make atheris`` runs them for a CPU-hour), and a
planted bug of each kind (exception, slow input, memory) must fail its run.
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import orjson
import pytest
import torch

from server.kinds import BatchFn, ModelKind, Result
from server.request import InferRequest
from server.settings import Settings
from tests.fakes import infer_body, model_dir
from tests.servers import ROOT, Running, in_thread

CASES = int(os.environ.get("CARPOOL_FUZZ_CASES", "300"))
ATHERIS_SECONDS = int(os.environ.get("CARPOOL_ATHERIS_SECONDS", "100"))
SEED = int(os.environ.get("CARPOOL_FUZZ_SEED", "20261123"))
DEADLINE = 0.5  # header and body deadlines of the fuzzed server, seconds
WAIT = 10.0  # an answer or a close must come within this
SECRET_PATH = "/srv/carpool/private/weights.bin"
ECHO = "/v2/models/echo/infer"


class LeakyKind(ModelKind[float]):
    """A model whose forward fails with an error naming a file on the server."""

    def split(self, request: InferRequest) -> list[float]:
        return list(request.columns["x"])

    def example(self) -> float:
        return -1.0

    def load(self, device: torch.device) -> BatchFn[float]:
        def run(xs: list[float]) -> Sequence[Result]:
            if xs == [-1.0]:
                return [{"y": [0.0]}]
            raise FileNotFoundError(2, "No such file or directory", SECRET_PATH)

        return run


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = model_dir(tmp_path_factory.mktemp("fuzz"), "echo")
    leaky = root / "leaky"
    leaky.mkdir()
    (leaky / "model.toml").write_text(
        (root / "echo" / "model.toml").read_text().replace('"echo"', '"leaky"')
    )
    (leaky / "model.toml").write_text(
        (leaky / "model.toml").read_text().replace('"EchoKind"', '"LeakyKind"')
    )
    (leaky / "handler.py").write_text("from tests.scenarios.test_fuzz import LeakyKind\n")
    settings = Settings(
        models_dir=root,
        torch_threads=1,
        max_body_bytes=64 * 1024,
        header_timeout=DEADLINE,
        body_timeout=DEADLINE,
    )
    with in_thread(settings) as running:
        yield running


# -- raw HTTP ------------------------------------------------------------------------


def request(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    if body:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def seeds() -> list[bytes]:
    infer = orjson.dumps(infer_body([1.0, 2.0]))
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    )
    json = [("content-type", "application/json")]
    gets = [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/echo",
        "/v2/models/echo/ready",
        "/v2/models/echo/versions/1",
        "/metrics",
        "/openapi.json",
        "/nowhere",
    ]
    return [
        *(request("GET", target, []) for target in gets),
        request("POST", ECHO, json, infer),
        request("POST", "/v2/models/echo/versions/1/infer", json, infer),
        request("POST", ECHO, [("x-carpool-timeout-ms", "5000"), *json], infer),
        request(
            "POST",
            ECHO,
            [("inference-header-content-length", str(len(header)))],
            header + b"\x00\x00\x80\x3f",
        ),
        b"POST "
        + ECHO.encode()
        + b" HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(infer), infer),
    ]


INSERTS = [
    b"\x00",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b"\xff\xfe",
    b"%",
    b"%00",
    b"%zz",
    b"%c0%af",
    b"../",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"\\",
    b"\x7f",
    b"A" * 300,
    b"9" * 30,
    b"-1",
    b"{",
    b"[" * 50,
    b"\xe2\x80\x8b",
]
HEADERS = [
    b"content-length: -1",
    b"content-length: 99999999999999999999999",
    b"content-length: abc",
    b"content-length: 5\r\ncontent-length: 7",
    b"transfer-encoding: chunked",
    b"transfer-encoding: gzip, chunked",
    b"transfer-encoding: identity",
    b"inference-header-content-length: -5",
    b"inference-header-content-length: 99999999999",
    b"inference-header-content-length: x",
    b"x-carpool-timeout-ms: 0",
    b"x-carpool-timeout-ms: -3",
    b"x-carpool-timeout-ms: 1e400",
    b"x-carpool-timeout-ms: 99999999999999999999999999",
    b"expect: 100-continue",
    b"connection: upgrade\r\nupgrade: websocket",
    b"connection: upgrade\r\nupgrade: h2c",
    b"authorization: Bearer \xff",
    b"bad header: value",
    b"no-colon-here",
    b" folded: continuation",
    b"x-long: " + b"v" * 20_000,
    b"host: a\r\nhost: b",
    b"content-type: application/json; charset=\xff",
]
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"TRACE", b"CONNECT", b"PRI"]
METHODS += [b"G\x00T", b"", b"get", b"POST POST", b"X" * 100]
TARGETS = [
    b"*",
    b"http://127.0.0.1/v2",
    b"/v2/models/%ff%fe/infer",
    b"/v2/models/" + b"e" * 8000,
    b"/v2/%2e%2e/%2e%2e/etc/passwd",
    b"/v2/models/echo/infer?x=" + b"%" * 100,
    b"//v2//models//echo",
    b"/v2/models/\xc3\xa9cho",
    b"",
    b"v2",
]
VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1x", b"HTTP/1", b"", b"http/1.1"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three mutations of a request's bytes."""
    for _ in range(rng.randint(1, 3)):
        head, sep, body = data.partition(b"\r\n\r\n")
        line, _, headers = head.partition(b"\r\n")
        parts = line.split(b" ")
        choice = rng.randrange(9)
        if choice == 0 and data:  # flip a byte
            i = rng.randrange(len(data))
            data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
        elif choice == 1:  # insert something awkward
            i = rng.randrange(len(data) + 1)
            data = data[:i] + rng.choice(INSERTS) + data[i:]
        elif choice == 2 and data:  # cut a slice out
            i = rng.randrange(len(data))
            data = data[:i] + data[i + rng.randint(1, 40) :]
        elif choice == 3 and len(parts) == 3:
            parts[0] = rng.choice(METHODS)
            data = b" ".join(parts) + b"\r\n" + headers + sep + body
        elif choice == 4 and len(parts) == 3:
            parts[1] = rng.choice(TARGETS)
            data = b" ".join(parts) + b"\r\n" + headers + sep + body
        elif choice == 5 and len(parts) == 3:
            parts[2] = rng.choice(VERSIONS)
            data = b" ".join(parts) + b"\r\n" + headers + sep + body
        elif choice == 6:  # add a hostile header
            data = line + b"\r\n" + rng.choice(HEADERS) + b"\r\n" + headers + sep + body
        elif choice == 7 and body:  # truncate or grow the body
            body = body[: rng.randrange(len(body))] if rng.random() < 0.5 else body * 3
            data = head + sep + body
        elif choice == 8:  # drop the final blank line: headers never end
            data = head + b"\r\n"
    return data


Answer = tuple[int, bytes] | str  # (status, body), or "closed" / "hung"


async def send_raw(port: int, data: bytes) -> Answer:
    """Send ``data`` and read the first answer: (status, body), "closed" or "hung"."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            writer.write(data)
            await writer.drain()
        except ConnectionError:
            pass
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        except TimeoutError:
            return "hung"
        except (asyncio.IncompleteReadError, ConnectionError):
            return "closed"
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        length = int(match.group(1)) if match else 0
        try:
            body = await asyncio.wait_for(reader.readexactly(length), WAIT)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            body = b""
        return int(head.split(b" ", 2)[1]), body
    finally:
        writer.close()


async def still_serving(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        answer = await client.post(ECHO, json=infer_body([2.5]))
        assert answer.status_code == 200
        assert answer.json()["outputs"][0]["data"] == [5.0]


def revealing(body: bytes) -> list[str]:
    """What a client must never see in an error body: tracebacks and server paths."""
    text = body.decode("utf-8", "replace")
    found = [word for word in ("Traceback", "site-packages", 'File "') if word in text]
    found += [p for p in (str(ROOT), sys.prefix, sys.base_prefix, SECRET_PATH) if p in text]
    return found


# -- the fuzz --------------------------------------------------------------------------


async def test_mutated_requests_get_no_5xx_and_no_hang_and_the_server_serves_on(
    fuzzed: Running,
) -> None:
    rng = random.Random(SEED)
    bases = seeds()
    cases = [mutate(rng.choice(bases), rng) for _ in range(CASES)]
    limit = asyncio.Semaphore(16)

    async def one(data: bytes) -> Answer:
        async with limit:
            return await send_raw(fuzzed.port, data)

    answers = await asyncio.wait_for(asyncio.gather(*map(one, cases)), WAIT * CASES)
    statuses = [a[0] for a in answers if isinstance(a, tuple)]
    hung = [case for case, a in zip(cases, answers, strict=True) if a == "hung"]
    server_errors = [
        (case[:200], a)
        for case, a in zip(cases, answers, strict=True)
        if isinstance(a, tuple) and a[0] >= 500
    ]
    assert hung == []
    assert server_errors == []
    assert len(statuses) >= CASES // 2  # most cases are answered, not just dropped
    assert 200 in statuses
    assert any(400 <= s < 500 for s in statuses)
    leaks = [(a[0], a[1][:200]) for a in answers if isinstance(a, tuple) and revealing(a[1])]
    assert leaks == []
    await still_serving(fuzzed.url)


async def test_every_kind_of_error_body_reveals_no_traceback_or_path(fuzzed: Running) -> None:
    bad = [
        request("GET", "/v2/models/nope", []),
        request("GET", "/nowhere/at/all", []),
        request("DELETE", "/v2", []),
        request("POST", ECHO, [], b"{not json"),
        request("POST", ECHO, [], b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        request("POST", ECHO, [], orjson.dumps({"inputs": [{"name": "x"}]})),
        request("POST", ECHO, [("inference-header-content-length", "x")], b"{}"),
        request("POST", ECHO, [("content-length", str(10**9))]),
        request("GET", "/v2", [("x-big", "b" * 40_000)]),
        request("POST", "/v2/models/echo/versions/9/infer", [], b"{}"),
        request("POST", ECHO, [], b"\xff\xfe" * 100),
    ]
    answers = [await send_raw(fuzzed.port, data) for data in bad]
    assert all(isinstance(a, tuple) and 400 <= a[0] < 500 for a in answers), answers
    for answer in answers:
        assert isinstance(answer, tuple)
        assert revealing(answer[1]) == [], answer
        assert "error" in orjson.loads(answer[1])
    await still_serving(fuzzed.url)


async def test_a_model_error_naming_a_server_file_does_not_reveal_the_path(
    fuzzed: Running,
) -> None:
    async with httpx.AsyncClient(base_url=fuzzed.url, timeout=WAIT) as client:
        answer = await client.post("/v2/models/leaky/infer", json=infer_body([1.0]))
    assert answer.status_code in (422, 500)
    assert "error" in answer.json()
    assert revealing(answer.content) == []


# -- coverage-guided: atheris ----------------------------------------------------------

linux_only = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="atheris has a wheel for x86-64 Linux only (pyproject.toml's dev extra)",
)


def atheris(target: str, seconds: int, workdir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m tests.fuzz TARGET``, run to its end (libFuzzer reports on stderr)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz",
            target,
            f"--seconds={seconds}",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )


@linux_only
@pytest.mark.timeout(ATHERIS_SECONDS + 180)
@pytest.mark.parametrize("target", ["json", "binary", "stream"])
def test_atheris_finds_no_unexpected_exception_slow_input_or_memory_growth(
    tmp_path: Path, target: str
) -> None:
    run = atheris(target, ATHERIS_SECONDS, tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", run.stderr)
    assert done is not None, run.stderr[-4000:]
    assert int(done.group(1)) >= 1000  # it fuzzed, it did not just start
    assert 0 < int((tmp_path / "peak_rss_mib").read_text()) < 512
    # no crash-*, timeout-* or oom-* input kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "peak_rss_mib"]


@linux_only
@pytest.mark.parametrize(
    ("target", "finding"),
    [
        ("control-exception", "Uncaught Python exception"),
        ("control-slow", "libFuzzer: timeout"),
        ("control-memory", "ERROR: out-of-memory"),
    ],
)
def test_atheris_fails_the_run_on_each_kind_of_finding(
    tmp_path: Path, target: str, finding: str
) -> None:
    run = atheris(target, 60, tmp_path)
    assert run.returncode != 0
    assert finding in run.stdout + run.stderr
    kept = [p.name for p in tmp_path.iterdir() if p.name not in {"corpus", "peak_rss_mib"}]
    assert kept  # the input that did it
