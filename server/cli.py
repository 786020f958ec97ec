"""``carpool serve``: run the server with uvicorn (uvloop, httptools)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from server.app import create_app
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
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    settings = Settings.from_env(**overrides)
    serve_forever(settings)


def serve_forever(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        lifespan="on",
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout),
    )
    uvicorn.Server(config).run()
