"""Optional bearer tokens: ``Authorization: Bearer <token>``.

Two areas, each with its own tokens:

- inference (every route but health and /metrics, WebSocket handshakes too):
  ``CARPOOL_AUTH_TOKENS`` (comma-separated) and ``CARPOOL_AUTH_TOKEN_FILE``
  (one token per line);
- ``/metrics``: ``CARPOOL_METRICS_TOKEN`` when set, else the inference tokens.

``/v2/health/live`` and ``/v2/health/ready`` stay open (probes carry no
secrets). An area without tokens is open; with none at all the middleware is
not installed. A request without a valid token gets 401 with
``WWW-Authenticate: Bearer``; a valid token of the other area gets 403. A
WebSocket is refused at the handshake, before it is accepted.

Tokens are compared as SHA-256 digests with ``hmac.compare_digest``, against
every token of the area, so neither a token's length nor which token matched
shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from server.asgi import refuse
from server.errors import Forbidden, Unauthorized
from server.settings import Settings

logger = logging.getLogger("carpool.auth")

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
METRICS_PATH = "/metrics"

_CHALLENGE = (b"www-authenticate", b'Bearer realm="carpool"')
_INVALID = (b"www-authenticate", b'Bearer realm="carpool", error="invalid_token"')
_MISSING = "this route needs an 'Authorization: Bearer <token>' header"


class AuthConfigError(ValueError):
    """The token settings cannot be used; the message says which and why."""


class BearerAuth:
    """Raw ASGI middleware checking bearer tokens per area."""

    def __init__(self, app: ASGIApp, inference: tuple[str, ...], metrics: tuple[str, ...]) -> None:
        self.app = app
        self._inference = tuple(map(_digest, inference))
        self._metrics = tuple(map(_digest, metrics)) if metrics else self._inference
        self._all = self._inference + self._metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" and scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        wanted = self._metrics if path == METRICS_PATH else self._inference
        if not wanted:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope["headers"])
        if token is None:
            await refuse(scope, send, Unauthorized(_MISSING, [_CHALLENGE]))
            return
        digest = _digest_bytes(token)
        if _matches(digest, wanted):
            await self.app(scope, receive, send)
        elif _matches(digest, self._all):
            await refuse(scope, send, Forbidden("this token is not valid for this route"))
        else:
            await refuse(scope, send, Unauthorized("the bearer token is not valid", [_INVALID]))


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            token = token.strip()
            if scheme.lower() != b"bearer" or not token:
                return None
            return token
    return None


def _digest(token: str) -> bytes:
    return _digest_bytes(token.encode())


def _digest_bytes(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _matches(digest: bytes, tokens: tuple[bytes, ...]) -> bool:
    found = False
    for token in tokens:  # no early exit: the time does not say which token matched
        found |= hmac.compare_digest(digest, token)
    return found


def load_tokens(settings: Settings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (inference, metrics) tokens of ``settings``, file included."""
    inference = [t.strip() for t in settings.auth_tokens.split(",")]
    if settings.auth_token_file:
        path = Path(settings.auth_token_file)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(
                f"CARPOOL_AUTH_TOKEN_FILE={path} cannot be read: {exc.__class__.__name__}"
            ) from None
        inference += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    metrics = [settings.metrics_token.strip()]
    for token in [*inference, *metrics]:
        # (no `in`/`==` on a token, even here: tests/server/test_auth.py lints for it)
        if token and (
            not token.isprintable() or not token.isascii() or any(map(str.isspace, token))
        ):
            raise AuthConfigError("tokens must be printable ASCII without spaces")
    return tuple(t for t in inference if t), tuple(t for t in metrics if t)


def middleware(settings: Settings) -> list[Middleware]:
    """The auth middleware, or nothing when no token is configured."""
    inference, metrics = load_tokens(settings)
    if not inference and not metrics:
        return []
    return [Middleware(BearerAuth, inference=inference, metrics=metrics)]


def inference_gate(settings: Settings) -> Callable[[list[tuple[bytes, bytes]]], bool] | None:
    """For the direct lane (``server/direct.py``): None when inference is
    open, else a check of whether request headers carry a valid inference
    token. A request it says no to takes the ASGI way, where ``BearerAuth``
    answers 401 or 403."""
    inference, _ = load_tokens(settings)
    if not inference:
        return None
    digests = tuple(map(_digest, inference))

    def admits(headers: list[tuple[bytes, bytes]]) -> bool:
        token = _bearer(headers)
        return token is not None and _matches(_digest_bytes(token), digests)

    return admits


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def warn_if_exposed(settings: Settings) -> bool:
    """Log a warning when serving beyond loopback without tokens; True if it did."""
    if is_loopback(settings.host) or load_tokens(settings)[0]:
        return False
    logger.warning(
        "serving on %s without auth tokens: anyone who reaches this address can run the "
        "models. Set CARPOOL_AUTH_TOKENS or CARPOOL_AUTH_TOKEN_FILE, or bind 127.0.0.1 "
        "behind a gateway that authenticates.",
        settings.host,
    )
    return True
