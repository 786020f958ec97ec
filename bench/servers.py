"""Starting, pinning, probing and stopping the servers under test.

Every server is started by the suite, bound to 127.0.0.1 on a port the OS
picked, pinned with ``taskset`` to the server core (its whole process tree
inherits the mask), and given the same thread settings: one torch intra-op
thread, OMP and MKL at one. ``floor`` is no peer but the yardstick: a bare
ASGI app on carpool's uvicorn configuration (``bench/peers/floor_app.py``),
serving only the tiny workload. Between points the suite waits until the tree's
CPU use falls to nothing, so one point's backlog never lands on the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.client import fetch
from bench.loopback import HOST, require_loopback
from bench.workloads import NAMES, Workload

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE = 0
CLIENT_CORE = 1
STARTUP_SECONDS = 180
_IDLE_CORES = 0.05  # a server using less than this much CPU is idle
_IDLE_WINDOW = 0.25
_IDLE_LIMIT = 30.0


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to run one server; ``name`` is also its label in the report."""

    name: str
    transports: tuple[str, ...] = ("http",)
    batching: bool = False
    workloads: tuple[str, ...] = NAMES  # the others it cannot answer: skipped

    def command(self, model: str, port: int, repository: Path) -> list[str]:
        python = sys.executable
        if self.name == "carpool":
            return [
                *[python, "-m", "server", "serve"],
                *["--host", HOST, "--port", str(port), "--models", str(repository)],
                *["--torch-threads", "1", "--log-level", "warning"],
            ]
        if self.name == "mosec":
            return [
                *[python, "-m", "bench.peers.mosec_app", "--address", HOST, "--port", str(port)],
                *["--timeout", "60000", "--capacity", "4096", "--log-level", "warning"],
            ]
        if self.name == "fastapi":
            return [
                *[python, "-m", "uvicorn", "bench.peers.fastapi_app:app"],
                *["--host", HOST, "--port", str(port), "--loop", "uvloop", "--http", "httptools"],
                *["--no-access-log", "--log-level", "warning"],
            ]
        if self.name == "flask":
            return [
                *[python, "-m", "gunicorn", "bench.peers.flask_app:app"],
                *["--bind", f"{HOST}:{port}", "--workers", "1", "--worker-class", "gthread"],
                *["--threads", "8", "--backlog", "2048", "--log-level", "warning"],
            ]
        if self.name == "floor":
            return [
                *[python, "-m", "bench.peers.floor_app", "--host", HOST, "--port", str(port)],
                *["--log-level", "warning"],
            ]
        raise ValueError(f"unknown server {self.name!r}")


SERVERS = (
    ServerSpec("carpool", ("http", "ws"), batching=True),
    ServerSpec("mosec", batching=True),
    ServerSpec("fastapi"),
    ServerSpec("flask"),
    ServerSpec("floor", ("http", "ws"), workloads=("tiny",)),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def pin_self(core: int) -> None:
    """Keep this process (and what it starts, such as wrk) on ``core``."""
    if core < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {core})


def cores() -> tuple[int, int]:
    """(server core, client core); one shared core on a one-core machine."""
    if (os.cpu_count() or 1) < 2:
        return 0, 0
    return SERVER_CORE, CLIENT_CORE


def server_env(model: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "BENCH_TORCH_THREADS": "1",
        "BENCH_MODEL": model,
        "CARPOOL_DRAIN_TIMEOUT": "2",
        "PYTHONPATH": str(ROOT),
    }


@dataclass
class Running:
    """A started server: its process group is the suite's to stop."""

    spec: ServerSpec
    workload: Workload
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    workdir: tempfile.TemporaryDirectory[str]

    @property
    def host(self) -> str:
        return HOST

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu(self) -> float:
        return procs.cpu_seconds(self.process.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def ready(self, deadline: float) -> None:
        """Wait until a real infer request gets 200 (the model is loaded)."""
        body = self.workload.body(0, "0")
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.spec.name} exited at startup:\n{self.log_tail()}")
            try:
                status, answer = await fetch(self.host, self.port, "POST", self.workload.path, body)
                if status == 200:
                    return
                last = f"status {status}: {answer[:200]!r}"
            except (OSError, TimeoutError) as exc:
                last = str(exc)
            await asyncio.sleep(0.25)
        raise RuntimeError(f"{self.spec.name} was not ready in time ({last}):\n{self.log_tail()}")

    async def wait_idle(self) -> float:
        """Wait until the tree uses (almost) no CPU; return the seconds waited."""
        began = time.monotonic()
        quiet = 0
        before = self.cpu()
        while time.monotonic() - began < _IDLE_LIMIT and quiet < 2:
            await asyncio.sleep(_IDLE_WINDOW)
            now = self.cpu()
            quiet = quiet + 1 if (now - before) / _IDLE_WINDOW < _IDLE_CORES else 0
            before = now
        return time.monotonic() - began

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left of it.

        Only processes of the tree this suite started are signalled: the group
        is the one ``start_new_session`` made for it, and the final SIGKILL goes
        to the members seen while the leader still lived, if still in that group.
        """
        pgid = self.process.pid
        members = procs.tree(pgid) if self.alive() else []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        for pid in members:
            if pid == pgid and self.process.poll() is not None:
                continue  # reaped: its number may belong to someone else now
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pgid:
                    os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(10)
        self.workdir.cleanup()


def start(spec: ServerSpec, workload: Workload, core: int, logs: Path) -> Running:
    """Start ``spec`` serving ``workload``'s model, pinned to ``core``."""
    require_loopback(HOST)
    port = free_port()
    workdir = tempfile.TemporaryDirectory(prefix=f"bench-{spec.name}-")
    repository = Path(workdir.name) / "models"
    repository.mkdir()
    # a repository holding only this workload's model, so nothing else loads
    (repository / workload.model).symlink_to(ROOT / "weights" / workload.model)
    log_path = logs / f"{spec.name}-{workload.name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["taskset", "-c", str(core), *spec.command(workload.model, port, repository)],
            cwd=ROOT,
            env=server_env(workload.model),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Running(spec, workload, port, process, log_path, workdir)
