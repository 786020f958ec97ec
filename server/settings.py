"""Server settings: typed, explicit, read once.

Defaults live in the dataclass signature; ``Settings.from_env`` is the one
place that reads the environment (``CARPOOL_*``), and the CLI overrides what
it is given on top of that.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _default_torch_threads() -> int:
    # Leave one core to the event loop: on small machines torch's intra-op
    # threads and the loop otherwise compete for every core.
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server is configured by, besides each model's model.toml."""

    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: Path = Path("weights")
    torch_threads: int = _default_torch_threads()
    max_body_bytes: int = 16 * 1024 * 1024
    # WebSocket streams (server/stream.py)
    ws_max_message_bytes: int = 4 * 1024 * 1024  # one message; over it: close 1009
    ws_max_in_flight: int = 64  # unanswered messages per connection; at the cap, stop reading
    ws_ping_interval: float = 20.0  # seconds between server pings on a stream
    ws_ping_timeout: float = 20.0  # no pong within this after a ping: the stream is closed
    # uvicorn's connection+task guard (a bare 503); kept above every queue so ours trips first
    limit_concurrency: int = 4096
    drain_timeout: float = 20.0
    drain_delay: float = 0.0  # seconds of "not ready, still serving" before the drain
    log_level: str = "info"
    access_log: bool = False  # one JSON line per request on stdout (server/access.py)
    # proxies whose X-Forwarded-For/-Proto uvicorn believes (its forwarded_allow_ips);
    # empty: proxy headers are off, and no request pays for reading them
    forwarded_allow_ips: str = ""
    # hardening (server/limits.py, server/uvicorn_internals/, server/auth.py)
    max_header_bytes: int = 16 * 1024  # names + values of all request headers; over: 431
    header_timeout: float = 10.0  # seconds from a request's first byte to its last header
    body_timeout: float = 10.0  # seconds from the last header to the body's last byte
    max_items_per_request: int = 1024  # items (first-axis length) in one infer request
    auth_tokens: str = field(default="", repr=False)  # comma-separated bearer tokens
    auth_token_file: str = ""  # one bearer token per line
    metrics_token: str = field(default="", repr=False)  # /metrics' own token

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: Any) -> Settings:
        """Settings from ``CARPOOL_<FIELD>`` variables, then ``overrides``
        (``None`` values in overrides are ignored)."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = environ.get(f"CARPOOL_{spec.name.upper()}")
            if raw is not None and raw != "":
                values[spec.name] = _parse(spec.name, raw, type(getattr(cls(), spec.name)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)


def _parse(name: str, raw: str, kind: type) -> Any:
    try:
        if issubclass(kind, Path):
            return Path(raw)
        if kind is bool:
            return {"1": True, "true": True, "0": False, "false": False}[raw.lower()]
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except (ValueError, KeyError):
        raise ValueError(f"CARPOOL_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None
