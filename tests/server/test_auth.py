"""Bearer tokens (RELIABILITY R22): server/auth.py, unit and against a real uvicorn."""

from __future__ import annotations

import ast
import hmac
import logging
import re
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server import cli, uvicorn_internals
from server.app import create_app
from server.asgi import Message
from server.auth import AuthConfigError, BearerAuth, load_tokens, warn_if_exposed
from server.settings import Settings
from tests.fakes import infer_body, model_dir, recorder
from tests.servers import ROOT, STARTUP_SECONDS, Running, in_thread

NAME = "guarded"
INFER = f"/v2/models/{NAME}/infer"
TOKENS = "first-token-0123456789, second-token-9876543210"
GOOD = {"authorization": "Bearer second-token-9876543210"}
METRICS_TOKEN = "metrics-token-abcdefabcdef"
WAIT = 30.0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The echo model, with inference tokens and a metrics token."""
    root = model_dir(tmp_path_factory.mktemp("auth"), NAME)
    settings = Settings(
        models_dir=root, torch_threads=1, auth_tokens=TOKENS, metrics_token=METRICS_TOKEN
    )
    with in_thread(settings) as running:
        yield running


@pytest.fixture
async def client(guarded: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=guarded.url, timeout=WAIT) as client:
        yield client


async def still_serving(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/live")).status_code == 200
    answer = await client.post(INFER, json=infer_body([1.5]), headers=GOOD)
    assert answer.status_code == 200
    assert answer.json()["outputs"][0]["data"] == [3.0]


# -- HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer not-a-token"},
        {"authorization": "Bearer first-token-012345678"},  # a prefix of a real one
        {"authorization": "Bearer"},
        {"authorization": "Basic Zmlyc3QtdG9rZW46"},
        {"authorization": "first-token-0123456789"},
        {"authorization": f"Bearer {METRICS_TOKEN}x"},
    ],
    ids=["missing", "wrong", "prefix", "empty", "basic", "no-scheme", "near-metrics"],
)
async def test_a_request_without_a_valid_token_gets_401_and_never_reaches_the_model(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    before = len(recorder(NAME).computed)
    answer = await client.post(INFER, json=infer_body([7.0]), headers=headers)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.json()["reason"] == "unauthorized"
    assert len(recorder(NAME).computed) == before  # 0 forward calls
    await still_serving(client)


@pytest.mark.parametrize(
    "route", ["/v2", f"/v2/models/{NAME}", f"/v2/models/{NAME}/ready", "/openapi.json", "/nope"]
)
async def test_every_route_but_health_needs_a_token(client: httpx.AsyncClient, route: str) -> None:
    assert (await client.get(route)).status_code == 401
    assert (await client.get(route, headers=GOOD)).status_code in (200, 404)


@pytest.mark.parametrize(
    "token", ["first-token-0123456789", "second-token-9876543210"], ids=["first", "second"]
)
@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
async def test_each_configured_token_is_served(
    client: httpx.AsyncClient, token: str, scheme: str
) -> None:
    answer = await client.post(
        INFER, json=infer_body([2.0]), headers={"authorization": f"{scheme} {token}"}
    )
    assert answer.status_code == 200
    assert answer.json()["outputs"][0]["data"] == [4.0]


async def test_health_routes_are_open_and_reveal_only_liveness_and_readiness(
    client: httpx.AsyncClient,
) -> None:
    live = await client.get("/v2/health/live")
    ready = await client.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    for answer in (live, ready):
        assert NAME not in answer.text
        assert "version" not in answer.text


async def test_metrics_take_their_own_token_and_an_inference_token_gets_403(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers=GOOD)).status_code == 403
    own = await client.get("/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
    assert own.status_code == 200
    assert "carpool" in own.text


async def test_the_metrics_token_on_an_inference_route_gets_403_and_no_forward(
    client: httpx.AsyncClient,
) -> None:
    before = len(recorder(NAME).computed)
    answer = await client.post(
        INFER, json=infer_body([1.0]), headers={"authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert answer.status_code == 403
    assert answer.json()["reason"] == "forbidden"
    assert len(recorder(NAME).computed) == before


async def test_without_a_metrics_token_metrics_take_the_inference_tokens(tmp_path: Path) -> None:
    settings = Settings(
        models_dir=model_dir(tmp_path, "plain"), torch_threads=1, auth_tokens="t0k3n"
    )
    with in_thread(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=WAIT) as client:
            assert (await client.get("/metrics")).status_code == 401
            answer = await client.get("/metrics", headers={"authorization": "Bearer t0k3n"})
            assert answer.status_code == 200


async def test_with_only_a_metrics_token_inference_stays_open(tmp_path: Path) -> None:
    settings = Settings(models_dir=model_dir(tmp_path, "open"), torch_threads=1, metrics_token="m")
    with in_thread(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=WAIT) as client:
            assert (await client.post("/v2/models/open/infer", json=infer_body([1.0]))).is_success
            assert (await client.get("/metrics")).status_code == 401
            answer = await client.get("/metrics", headers={"authorization": "Bearer m"})
            assert answer.status_code == 200


# -- WebSocket -----------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"authorization": "Bearer nope"}], ids=["missing", "wrong"]
)
async def test_a_websocket_without_a_valid_token_is_refused_at_the_handshake(
    guarded: Running, client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    url = f"ws://127.0.0.1:{guarded.port}/v2/models/{NAME}/stream"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers=headers, proxy=None, open_timeout=WAIT):
            pass
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["www-authenticate"].startswith("Bearer")
    await still_serving(client)


Sent = list[Message]


async def call(app: BearerAuth, scope: dict[str, Any]) -> Sent:
    sent: Sent = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def guarded_app() -> tuple[BearerAuth, list[str]]:
    reached: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    return BearerAuth(inner, ("right",), ()), reached


def websocket_scope(token: str | None, extensions: dict[str, Any]) -> dict[str, Any]:
    headers = [] if token is None else [(b"authorization", b"Bearer " + token.encode())]
    return {
        "type": "websocket",
        "path": "/v2/models/m/stream",
        "headers": headers,
        "extensions": extensions,
    }


async def test_a_websocket_refusal_without_the_http_response_extension_closes_before_accept() -> (
    None
):
    app, reached = guarded_app()
    sent = await call(app, websocket_scope("wrong", {}))
    assert sent == [{"type": "websocket.close", "code": 1008}]  # uvicorn answers 403
    assert reached == []


async def test_a_websocket_refusal_with_the_http_response_extension_answers_401() -> None:
    app, reached = guarded_app()
    sent = await call(app, websocket_scope(None, {"websocket.http.response": {}}))
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert sent[0]["status"] == 401
    assert orjson.loads(sent[1]["body"])["error"]
    assert reached == []


async def test_a_websocket_with_a_valid_token_reaches_the_app() -> None:
    app, reached = guarded_app()
    assert await call(app, websocket_scope("right", {})) == []
    assert reached == ["/v2/models/m/stream"]


# -- tokens ----------------------------------------------------------------------


async def test_tokens_are_compared_with_hmac_compare_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    app, reached = guarded_app()
    scope = {"type": "http", "path": "/v2", "headers": [(b"authorization", b"Bearer right")]}
    await call(app, scope)
    assert reached == ["/v2"]
    assert calls
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: the length says nothing


# The lint rule: a token is never compared with ==, !=, in or not in, which
# stop at the first differing byte (the timing tells an attacker how much of
# a guess was right). `is None` checks are allowed: they compare no value.
SECRET_NAME = re.compile(r"token|secret", re.IGNORECASE)
VALUE_COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def token_comparisons(source: str) -> list[int]:
    """Lines of ``source`` comparing a token or secret by value."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, VALUE_COMPARISONS) for op in node.ops):
            continue
        for operand in (node.left, *node.comparators):
            for part in ast.walk(operand):
                name = part.id if isinstance(part, ast.Name) else getattr(part, "attr", "")
                if SECRET_NAME.search(name):
                    found.append(node.lineno)
    return sorted(set(found))


@pytest.mark.parametrize(
    "source",
    [
        "ok = token == expected",
        "ok = presented != settings.metrics_token",
        "ok = token in self._tokens",
        "ok = b'x' not in secret",
        "ok = digest(token) == wanted",
    ],
)
def test_the_lint_flags_a_value_comparison_of_a_token(source: str) -> None:
    assert token_comparisons(source) == [1]


@pytest.mark.parametrize(
    "source",
    ["ok = hmac.compare_digest(token, expected)", "ok = token is None", "ok = name == b'host'"],
)
def test_the_lint_lets_constant_time_and_identity_checks_pass(source: str) -> None:
    assert token_comparisons(source) == []


def test_no_server_module_compares_a_token_with_eq_ne_or_in() -> None:
    sources = sorted((ROOT / "server").rglob("*.py"))
    assert ROOT / "server" / "auth.py" in sources
    found = {str(path.relative_to(ROOT)): token_comparisons(path.read_text()) for path in sources}
    assert {path: lines for path, lines in found.items() if lines} == {}


def test_tokens_come_from_the_environment_and_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# operators\nfrom-file-1\n\n  from-file-2  \n")
    settings = Settings.from_env(
        {
            "CARPOOL_AUTH_TOKENS": "env-1, env-2,",
            "CARPOOL_AUTH_TOKEN_FILE": str(path),
            "CARPOOL_METRICS_TOKEN": "scrape",
        }
    )
    inference, metrics = load_tokens(settings)
    assert inference == ("env-1", "env-2", "from-file-1", "from-file-2")
    assert metrics == ("scrape",)


def test_an_unreadable_token_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(AuthConfigError, match="CARPOOL_AUTH_TOKEN_FILE"):
        load_tokens(Settings(auth_token_file=str(missing)))


def test_the_settings_repr_hides_the_tokens() -> None:
    text = repr(Settings(auth_tokens="very-secret", metrics_token="also-secret"))
    assert "very-secret" not in text
    assert "also-secret" not in text


# -- the exposure warning -------------------------------------------------------------


def test_the_server_binds_loopback_unless_told_otherwise() -> None:
    assert Settings().host == "127.0.0.1"
    assert Settings.from_env({}).host == "127.0.0.1"


def test_carpool_serve_without_host_asks_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Settings] = []
    monkeypatch.setattr(cli, "serve_forever", started.append)
    monkeypatch.delenv("CARPOOL_HOST", raising=False)
    cli.main(["serve", "--port", "0"])
    assert [settings.host for settings in started] == ["127.0.0.1"]


async def test_the_default_configuration_listens_on_127_0_0_1_only_metrics_included(
    tmp_path: Path,
) -> None:
    settings = Settings(models_dir=model_dir(tmp_path, "bound"), port=0, torch_threads=1)
    # carpool serve's own uvicorn configuration, the host left to the default
    server = uvicorn.Server(cli.uvicorn_config(create_app(settings), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-default", daemon=True)
    thread.start()
    try:
        for _ in range(int(STARTUP_SECONDS / 0.05)):
            if server.started or not thread.is_alive():
                break
            thread.join(0.05)
        assert server.started
        addresses = [sock.getsockname() for s in server.servers for sock in s.sockets]
        assert addresses
        assert {address[0] for address in addresses} == {"127.0.0.1"}
        url = f"http://127.0.0.1:{addresses[0][1]}"
        async with httpx.AsyncClient(base_url=url, timeout=WAIT) as client:
            # /metrics has no listener of its own: it is on this loopback socket
            assert (await client.get("/metrics")).status_code == 200
    finally:
        server.should_exit = True
        thread.join(STARTUP_SECONDS)


def test_there_are_no_admin_endpoints_to_guard_only_reads_inference_and_metrics(
    guarded: Running,
) -> None:
    # R22's "inference token on admin endpoints -> 403" has nothing to apply to:
    # no route loads, unloads or configures a model. A new route that writes
    # anything must fail here, and get its own token area in server/auth.py.
    routes = {
        (path, method)
        for route in guarded.app.starlette.routes
        for path in [getattr(route, "path", "")]
        for method in sorted(getattr(route, "methods", None) or {"WEBSOCKET"})
    }
    writes = {(path, method) for path, method in routes if method not in {"GET", "HEAD"}}
    assert writes == {
        ("/v2/models/{name}/infer", "POST"),
        ("/v2/models/{name}/versions/{version}/infer", "POST"),
        ("/v2/models/{name}/stream", "WEBSOCKET"),
        ("/v2/models/{name}/versions/{version}/stream", "WEBSOCKET"),
    }


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.internal"])
def test_serving_beyond_loopback_without_tokens_logs_a_warning(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="carpool.auth"):
        assert warn_if_exposed(Settings(host=host))
    assert "without auth tokens" in caplog.text
    assert "CARPOOL_AUTH_TOKENS" in caplog.text


@pytest.mark.parametrize(
    "settings",
    [
        Settings(host="127.0.0.1"),
        Settings(host="::1"),
        Settings(host="localhost"),
        Settings(host="0.0.0.0", auth_tokens="t"),
    ],
    ids=["ipv4-loopback", "ipv6-loopback", "localhost", "with-tokens"],
)
def test_loopback_or_tokens_log_no_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="carpool.auth"):
        assert not warn_if_exposed(settings)
    assert caplog.text == ""


def test_carpool_serve_warns_at_start_when_exposed_without_tokens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def not_serving(self: object, sockets: object = None) -> None:
        pass  # nothing binds: the test only runs the CLI's setup

    # on the base class, so that any subclass the CLI runs is covered too
    monkeypatch.setattr(uvicorn_internals.Server, "run", not_serving)
    with caplog.at_level(logging.WARNING, logger="carpool.auth"):
        cli.serve_forever(Settings(host="0.0.0.0", models_dir=model_dir(tmp_path, "cli")))
    assert "serving on 0.0.0.0 without auth tokens" in caplog.text
