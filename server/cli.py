"""``carpool serve``: run the server with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from client import cli as client_cli
from server.app import create_app
from server.auth import warn_if_exposed
from server.lifecycle import Server
from server.protocol import http_protocol
from server.settings import Settings


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
    app = create_app(settings)
    warn_if_exposed(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=http_protocol(settings),  # httptools, with header/body deadlines
        ws="websockets-sansio",
        ws_max_size=settings.ws_max_message_bytes,  # over it: close 1009
        lifespan="on",
        access_log=False,
        log_level=settings.log_level,
        # the drain (server/lifecycle.py) has finished the accepted work before
        # uvicorn's own wait starts; this only bounds stragglers
        timeout_graceful_shutdown=int(settings.drain_timeout) + 5,
    )
    Server(config, app.state, settings.drain_delay, settings.drain_timeout).run()
