"""Real servers for integration tests, on loopback ports picked by the OS.

``in_thread(settings)`` runs create_app() under uvicorn in a background
thread of the test process (so tests can reach the app's models and streams
and the fake models' logs); ``subprocess_server(args)`` runs ``python -m server serve`` as
a child process, for tests that signal or kill it. Both bind 127.0.0.1 only
and stop what they started.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from server.app import Carpool, create_app
from server.cli import uvicorn_config
from server.settings import Settings
from server.uvicorn_internals import Server

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 120


class _Server(Server):
    def __init__(self, config: uvicorn.Config, app: Carpool) -> None:
        super().__init__(config, app.lifecycle)
        self.up = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.up.set()


@dataclass
class Running:
    url: str
    port: int
    app: Carpool
    server: uvicorn.Server


@contextmanager
def in_thread(settings: Settings, **uvicorn_options: object) -> Iterator[Running]:
    """create_app(settings) served by uvicorn (uvloop, httptools) on 127.0.0.1."""
    app = create_app(settings)
    config = uvicorn_config(
        app,
        settings,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.drain_timeout),
        **uvicorn_options,
    )
    server = _Server(config, app)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        while not server.up.wait(0.05):
            if not thread.is_alive():
                raise RuntimeError("the server failed to start; see the log above")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Running(f"http://127.0.0.1:{port}", port, app, server)
    finally:
        server.should_exit = True
        thread.join(STARTUP_SECONDS)


@dataclass
class Child:
    url: str
    port: int
    process: subprocess.Popen[str]
    log: list[str]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)


@contextmanager
def subprocess_server(
    args: Sequence[str] = (), env: dict[str, str] | None = None
) -> Iterator[Child]:
    """``python -m server serve --port 0 ARGS`` as a child; yields once it listens."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    lines = _Lines(process, log)
    try:
        port = lines.wait_for(re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)"))
        yield Child(f"http://127.0.0.1:{port}", port, process, log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        lines.thread.join(5)
        if process.stderr is not None:
            process.stderr.close()


class _Lines:
    """Collects a child's stderr lines in a thread; waits for a pattern."""

    def __init__(self, process: subprocess.Popen[str], log: list[str]) -> None:
        self.log = log
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            with self.changed:
                self.log.append(line)
                self.changed.notify_all()
        with self.changed:
            self.log.append("")  # EOF marker
            self.changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str]) -> int:
        seen = 0
        with self.changed:
            while True:
                for line in self.log[seen:]:
                    if line == "":
                        raise RuntimeError(
                            "the server exited before it listened:\n" + "".join(self.log)
                        )
                    match = pattern.search(line)
                    if match:
                        return int(match.group(1))
                seen = len(self.log)
                if not self.changed.wait(STARTUP_SECONDS):
                    raise TimeoutError("the server did not start:\n" + "".join(self.log))


def scrape(text: str) -> dict[str, float]:
    """Samples of a /metrics page, keyed like ``name{label="v",...}``."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples
