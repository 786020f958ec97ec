"""``carpool serve``: run the server with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from client import cli as client_cli
from server.app import Carpool, create_app
from server.auth import warn_if_exposed
from server.direct import DirectLane
from server.settings import Settings
from server.stream_protocol import StreamProtocol
from server.uvicorn_internals import HEAD_SLACK, DeadlineProtocol, Server


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="carpool", description="Batched PyTorch inference over HTTP."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the models of a model repository")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; env CARPOOL_HOST)")
    serve.add_argument("--port", type=int, help="port (default 8000; env CARPOOL_PORT)")
    serve.add_argument(
        "--models", type=Path, dest="models_dir", help="model repository (default weights)"
    )
    serve.add_argument(
        "--torch-threads", type=int, help="torch intra-op threads (default: cores - 1)"
    )
    serve.add_argument("--log-level", help="debug, info, warning, error")
    client_cli.add_parser(commands)  # carpool predict
    args = parser.parse_args(argv)
    if args.command == "predict":
        raise SystemExit(client_cli.predict(args))
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    settings = Settings.from_env(**overrides)
    serve_forever(settings)


def serve_forever(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    raise_open_files_limit()
    app = create_app(settings)
    warn_if_exposed(settings)
    config = uvicorn_config(app, settings)
    # the heap is frozen after start-up only here, where the process is ours
    # (a test server in a thread would freeze the test process's heap)
    Server(config, app.lifecycle, freeze_heap=True).run()


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the new soft limit.

    Every connection is a file descriptor, and a soft limit of 1024 (a common
    default) is used up by a thousand idle or slow clients; past it, accept()
    fails and real clients cannot connect. The hard limit is the operator's.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def uvicorn_config(app: Carpool, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The one uvicorn configuration carpool runs under (the tests use it too).

    Everything the hardening depends on is pinned here rather than left to
    uvicorn's defaults: the parser (httptools, with our header/body deadlines),
    the WebSocket implementation (wsproto would ignore the size limit and the
    pings), the ping keep-alive, the concurrency guard and the shutdown bound.
    """
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        # httptools, with header/body deadlines and the direct infer lane
        "http": http_protocol(settings, DirectLane.for_app(app, settings)),
        "ws": StreamProtocol,  # websockets-sansio, with read-ahead and batched writes
        "ws_max_size": settings.ws_max_message_bytes,  # over it: close 1009
        # a client that stops answering pings (half-open) is closed after
        # interval + timeout
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        # uvicorn's own guard answers a bare 503 without Retry-After; it sits
        # far above our queues so that our shedding trips first
        "limit_concurrency": settings.limit_concurrency,
        # nothing in carpool reads the client's address: X-Forwarded-* are only
        # parsed (a middleware layer on every request) when proxies are named
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": settings.forwarded_allow_ips or None,
        "lifespan": "on",
        "access_log": False,
        "log_level": settings.log_level,
        # the drain (server/lifecycle.py) has finished the accepted work before
        # uvicorn's own wait starts; this only bounds stragglers
        "timeout_graceful_shutdown": int(settings.drain_timeout) + 5,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def http_protocol(settings: Settings, lane: DirectLane | None = None) -> type[DeadlineProtocol]:
    """The protocol class for uvicorn's ``http=``, with ``settings``' limits
    and, for a carpool app, the direct infer lane (``server/direct.py``)."""
    return type(
        "CarpoolHttpProtocol",
        (DeadlineProtocol,),
        {
            "header_timeout": settings.header_timeout,
            "body_timeout": settings.body_timeout,
            "max_head_bytes": 2 * settings.max_header_bytes + HEAD_SLACK,
            "lane": lane,
        },
    )
