"""A benchmark run stopped with SIGTERM takes what it started with it: the
server it runs (in a session of its own) and wrk.

It runs the suite itself, so it needs the bench extra (``make bench``
installs it; ``make test`` does not, and skips it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import procs

ROOT = Path(__file__).resolve().parents[2]
# the offline run, a server's start and its warm-up on a busy machine, and
# installing wrk first where it is missing (the suite does, with apt-get)
WAIT = 300.0


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_the_run_and_the_server_and_wrk_it_started(tmp_path: Path) -> None:
    for module in ("matplotlib", "sklearn"):
        pytest.importorskip(module, reason="the bench extra is not installed (make bench)")
    log = tmp_path / "bench.log"
    with log.open("wb") as errors:  # the child has its own copy
        run = subprocess.Popen(
            [
                *[sys.executable, "-m", "bench", "--quick", "--workloads", "tiny"],
                *["--servers", "floor", "--out", str(tmp_path)],
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    server = load = None
    try:
        deadline = time.monotonic() + WAIT
        while (server is None or load is None) and time.monotonic() < deadline:
            assert run.poll() is None, log.read_text()[-2000:]
            for pid in procs.tree(run.pid):
                command = _command(pid)
                if "bench.peers.floor_app" in command:
                    server = pid
                elif Path(command.split(" ", 1)[0]).name == "wrk":
                    load = pid
            # between looks at its tree, wait on the run itself: an early exit ends the wait
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(0.05)
        assert server is not None, "the floor never started"
        assert load is not None, "wrk never ran"
        run.send_signal(signal.SIGTERM)
        run.wait(60)
        assert not _alive(server), "the server outlived the run"
        assert not _alive(load), "wrk outlived the run"
        assert run.returncode != 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if server is not None and _alive(server):  # the failure above: stop what it left
            os.killpg(server, signal.SIGKILL)  # the suite starts a server as a session leader
