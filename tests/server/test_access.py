"""Structured access logs and X-Request-ID (server/access.py)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from server.access import ACCESS_LOGGER, AccessLog
from server.app import Carpool, create_app
from server.asgi import Receive, Scope, Send, respond
from server.settings import Settings
from tests.servers import ROOT, in_thread

DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4]
DIGIT_ZERO += [12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5]
DIGIT_ZERO += [10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


class Lines(logging.Handler):
    """Keeps each access-log record as the JSON object it is."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(orjson.loads(record.getMessage()))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def infer_like(scope: Scope, receive: Receive, send: Send) -> None:
    """A tiny app that answers as the infer route does, timing headers included."""
    headers = [
        (b"x-carpool-queue-ms", b"1.250"),
        (b"x-carpool-compute-ms", b"0.500"),
        (b"x-carpool-batch-size", b"7"),
    ]
    await respond(send, 200, b"{}", headers)


async def fails(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("boom")


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://carpool")


async def test_a_request_without_an_id_gets_a_new_one_in_its_answer_and_its_log_line(
    lines: Lines,
) -> None:
    async with client(AccessLog(infer_like)) as http:
        response = await http.post("/v2/models/digits/infer", content=b"{}")
    rid = response.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(rid)
    assert [line["request_id"] for line in lines.records] == [rid]


async def test_a_client_request_id_is_echoed_and_logged(lines: Lines) -> None:
    async with client(AccessLog(infer_like)) as http:
        response = await http.get("/v2", headers={"x-request-id": "nginx-4f2a:7.b_c"})
    assert response.headers["x-request-id"] == "nginx-4f2a:7.b_c"
    assert lines.records[0]["request_id"] == "nginx-4f2a:7.b_c"


@pytest.mark.parametrize("sent", [b'a"b', b"x" * 129, b"a b", "é".encode(), b"a\x00"])
async def test_a_request_id_that_could_forge_a_log_line_is_replaced(
    lines: Lines, sent: bytes
) -> None:
    async with client(AccessLog(infer_like)) as http:
        response = await http.get("/v2", headers={b"x-request-id": sent})
    rid = response.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(rid)
    assert lines.records[0]["request_id"] == rid


async def test_the_log_line_holds_model_status_duration_and_the_infer_timings(
    lines: Lines,
) -> None:
    async with client(AccessLog(infer_like)) as http:
        await http.post("/v2/models/digits/versions/1/infer", content=b"{}")
    (line,) = lines.records
    assert line["method"] == "POST"
    assert line["path"] == "/v2/models/digits/versions/1/infer"
    assert line["model"] == "digits"
    assert line["status"] == 200
    assert line["queue_ms"] == 1.25
    assert line["compute_ms"] == 0.5
    assert line["batch_size"] == 7
    assert line["duration_ms"] >= 0
    assert isinstance(line["time"], float)


async def test_a_request_outside_a_model_is_logged_with_no_model_and_no_timings(
    lines: Lines,
) -> None:
    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, b"ok")

    async with client(AccessLog(plain)) as http:
        await http.get("/metrics")
    (line,) = lines.records
    assert line["model"] is None
    assert line.keys().isdisjoint({"queue_ms", "compute_ms", "batch_size"})


async def test_an_app_that_raises_is_logged_as_500_and_its_error_propagates(
    lines: Lines,
) -> None:
    async with client(AccessLog(fails)) as http:
        with pytest.raises(RuntimeError, match="boom"):
            await http.get("/v2/models/digits")
    assert lines.records[0]["status"] == 500
    assert lines.records[0]["model"] == "digits"


async def test_a_lifespan_scope_passes_through_unlogged(lines: Lines) -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        pass

    await AccessLog(app)({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]
    assert lines.records == []


def installed(app: Carpool) -> list[object]:
    """The classes of an app's middleware, outermost first."""
    return [middleware.cls for middleware in app.starlette.user_middleware]


def test_the_access_log_is_off_by_default_and_then_not_installed() -> None:
    assert Settings().access_log is False
    assert AccessLog not in installed(create_app(Settings()))


def test_carpool_access_log_turns_it_on_and_installs_the_middleware() -> None:
    settings = Settings.from_env({"CARPOOL_ACCESS_LOG": "1"})
    assert settings.access_log is True
    assert installed(create_app(settings))[0] is AccessLog  # outermost: it logs every answer


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("0", False), ("FALSE", False)])
def test_carpool_access_log_reads_booleans(raw: str, value: bool) -> None:
    assert Settings.from_env({"CARPOOL_ACCESS_LOG": raw}).access_log is value


def test_carpool_access_log_refuses_a_value_that_is_not_a_boolean() -> None:
    with pytest.raises(ValueError, match="CARPOOL_ACCESS_LOG"):
        Settings.from_env({"CARPOOL_ACCESS_LOG": "maybe"})


@pytest.fixture
def digits_only(tmp_path: Path) -> Path:
    (tmp_path / "digits").symlink_to(ROOT / "weights" / "digits")
    return tmp_path


async def test_a_real_infer_request_is_logged_with_its_batch_size_and_timings(
    lines: Lines, digits_only: Path
) -> None:
    settings = Settings(models_dir=digits_only, torch_threads=1, access_log=True)
    body = {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": DIGIT_ZERO}]
    }
    with in_thread(settings) as running:
        async with httpx.AsyncClient(base_url=running.url) as http:
            response = await http.post(
                "/v2/models/digits/infer", json=body, headers={"x-request-id": "r-1"}
            )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "r-1"
    (line,) = [line for line in lines.records if line["request_id"] == "r-1"]
    assert line["model"] == "digits"
    assert line["status"] == 200
    assert line["batch_size"] == 1
    assert line["queue_ms"] == float(response.headers["x-carpool-queue-ms"])
    assert line["compute_ms"] == float(response.headers["x-carpool-compute-ms"])
