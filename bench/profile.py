"""Flame graphs of carpool under load: where its CPU goes (carpool issue 11).

    python -m bench.profile                                     # the checkout it runs from
    python -m bench.profile --root /tmp/before --label before   # another checkout

Starts carpool as the suite does (pinned to the server core, on a loopback
port the OS picks, from ``--root``'s tree) and warms it up. Then for each
scenario (wrk in closed loop at 128 connections over HTTP; the WebSocket
stream with 128 requests in flight) it measures the load alone for a few
seconds, then records it twice with py-spy for ``--seconds`` each, the suite's
own load generators driving it: once as collapsed stacks, ``.folded``, whose
exact counts the ``.txt`` summary reads, and once as py-spy's flame graph,
``.svg``, which leaves out boxes under 0.1 % of the samples. The files are
``<date>[-label]-<scenario>.*``; every rate in them is correct answers a second
(py-spy pauses carpool at every sample, so the rates under it run lower).

The samples are those in which a carpool thread held the GIL (``--gil``):
Python's work, the thing one core runs out of. Without it, py-spy's idle
detection counts the model thread's wait for its next batch
(``concurrent/futures/thread.py`` ``_worker``) as running, half of all samples;
with it, native code that lets the GIL go (torch's kernels) is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import uvloop

from bench import offline, procs, servers, workloads
from bench.loopback import HOST, require_loopback
from bench.plan import Plan
from bench.servers import ROOT, Running
from bench.workloads import Workload
from bench.wrk import Wrk, WrkResult
from bench.wsload import WsResult, closed_loop

T = TypeVar("T")

OUT = ROOT / "bench" / "results" / "profiles"
RATE = 250  # samples a second
TOP = 25
CONCURRENCY = 128
_CARPOOL = next(spec for spec in servers.SERVERS if spec.name == "carpool")
_WARMUP_SECONDS = 2
_BASELINE_SECONDS = 5
_SPY_START_SECONDS = 15.0
_SAMPLES = re.compile(r"Samples: (\d+) Errors: (\d+)")
_LINE = re.compile(r":\d+\)$")


@dataclass(frozen=True, slots=True)
class Scenario:
    """One recording: a transport and how many requests it keeps in flight."""

    name: str
    transport: str
    concurrency: int

    def stem(self, date: str, label: str) -> str:
        return "-".join(part for part in (date, label, self.name) if part)

    def describe(self) -> str:
        if self.transport == "http":
            return f"tiny over HTTP, wrk in closed loop at {self.concurrency} connections"
        return f"tiny over the WebSocket stream, {self.concurrency} requests in flight"


SCENARIOS = (
    Scenario(f"tiny-http-c{CONCURRENCY}", "http", CONCURRENCY),
    Scenario(f"tiny-ws-{CONCURRENCY}", "ws", CONCURRENCY),
)


def record_command(spy: str, pid: int, seconds: int, output: Path) -> list[str]:
    """py-spy's command line: ``pid``'s GIL holders for ``seconds``, as collapsed
    stacks (raw) or a flame graph, by ``output``'s suffix."""
    form = "raw" if output.suffix == ".folded" else "flamegraph"
    return [
        *[spy, "record", "--pid", str(pid), "--rate", str(RATE), "--duration", str(seconds)],
        *["--gil", "--format", form, "--output", str(output)],
    ]


def sample_counts(output: str) -> tuple[int, int]:
    """(samples, errors) from what py-spy printed when it finished."""
    found = _SAMPLES.findall(output)
    if not found:
        raise RuntimeError(f"py-spy printed no sample count:\n{output[-2000:]}")
    samples, errors = found[-1]
    return int(samples), int(errors)


def function_of(frame: str) -> str:
    """``name (file:line)`` -> ``name (file)``: py-spy names a frame by its current line."""
    return _LINE.sub(")", frame)


@dataclass(frozen=True, slots=True)
class Profile:
    """Samples by function, read from collapsed stacks (``frame;frame;... count``)."""

    samples: int
    own: Counter[str]  # samples with the function at the top of the stack
    total: Counter[str]  # samples with the function anywhere on it, counted once

    @classmethod
    def of(cls, folded: str) -> Profile:
        samples, own, total = 0, Counter[str](), Counter[str]()
        for line in folded.splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            functions = [function_of(frame) for frame in stack.split(";")]
            samples += int(count)
            own[functions[-1]] += int(count)
            total.update(dict.fromkeys(functions, int(count)))
        return cls(samples, own, total)

    def table(self, top: int = TOP) -> list[str]:
        """The ``top`` functions by own samples, with their shares of all samples."""
        share = 100 / (self.samples or 1)
        lines = [f"{'own':>7}  {'own %':>6}  {'total %':>7}  function"]
        for function, count in self.own.most_common(top):
            lines.append(
                f"{count:>7,}  {count * share:>5.1f}%  {self.total[function] * share:>6.1f}%"
                f"  {function}"
            )
        return lines


def py_spy() -> str:
    """The py-spy beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("py-spy is missing; install it: .venv/bin/pip install -e '.[bench]'")
    return found


def start(
    root: Path, workload: Workload, core: int, logs: Path, env: dict[str, str] | None = None
) -> Running:
    """``servers.start`` for carpool, but from ``root``'s tree (cwd and PYTHONPATH),
    with ``env`` on top of the suite's environment."""
    require_loopback(HOST)
    port = servers.free_port()
    workdir = tempfile.TemporaryDirectory(prefix="bench-profile-")
    repository = Path(workdir.name) / "models"
    repository.mkdir()
    (repository / workload.model).symlink_to(root / "weights" / workload.model)
    log_path = logs / f"carpool-{workload.name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["taskset", "-c", str(core), *_CARPOOL.command(workload.model, port, repository)],
            cwd=root,
            env={**servers.server_env(workload.model), "PYTHONPATH": str(root), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Running(_CARPOOL, workload, port, process, log_path, workdir)


async def under_py_spy(
    command: list[str], seconds: int, load: Callable[[], Awaitable[T]]
) -> tuple[T, str]:
    """Start py-spy, start ``load`` once it samples; (the load's result, py-spy's output)."""
    spy = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert spy.stdout is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(_SPY_START_SECONDS):
            while not any("Sampling process" in line for line in said):
                line = (await spy.stdout.readline()).decode(errors="replace")
                if not line:
                    await spy.wait()
                    raise RuntimeError(f"py-spy exited with {spy.returncode}:\n{''.join(said)}")
                said.append(line)
        result = await load()
        async with asyncio.timeout(seconds + 30):
            said.append((await spy.stdout.read()).decode(errors="replace"))
            await spy.wait()
    finally:
        if spy.returncode is None:
            spy.kill()
            await spy.wait()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy exited with {spy.returncode}:\n{''.join(said)[-2000:]}")
    return result, "".join(said)


def describe_tree(root: Path) -> str:
    """``root`` and the commit it is at, marked when tracked files differ from it."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(root), *args]
        try:
            return subprocess.run(
                command, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "an unknown commit"
    dirty = " with uncommitted changes" if git("status", "--porcelain", "-uno") else ""
    return f"{root} at {commit}{dirty}"


def figures(result: WrkResult | WsResult) -> tuple[float, int, float]:
    """(correct answers a second, answers that were not correct, seconds) of one load run."""
    if isinstance(result, WrkResult):
        bad = result.wrong + result.non200 + result.socket_errors + result.timeouts
        return result.rps, bad, result.duration_s
    return result.rps, result.wrong + result.failed + result.timeouts, result.duration_s


@dataclass(frozen=True, slots=True)
class Options:
    root: Path
    out: Path
    seconds: int
    label: str


def server_env(options: Options) -> dict[str, str]:
    """What carpool runs with here on top of the suite's settings."""
    # carpool before the fix of that bug closed every stream header_timeout
    # (10 s) after its upgrade; the deadline is put past the recording so that
    # an older tree (--root) can be profiled too
    return {"CARPOOL_HEADER_TIMEOUT": str(options.seconds + 60)}


@dataclass(frozen=True, slots=True)
class Recording:
    """One py-spy recording and the load it saw."""

    path: Path
    rps: float
    bad: int  # answers that were not correct
    load_seconds: float
    samples: int
    errors: int

    def line(self) -> str:
        return (
            f"{self.path.name}: {self.rps:,.0f}/s over {self.load_seconds:.1f} s while py-spy"
            f" recorded ({self.bad} not correct), {self.samples:,} samples ({self.errors} errors)"
        )


class Profiler:
    """One carpool, started and warmed up, and the recordings made of it."""

    def __init__(self, options: Options, running: Running, wrk: Wrk, spy: str) -> None:
        self.options = options
        self.running = running
        self.wrk = wrk
        self.spy = spy
        self.version = subprocess.run([spy, "--version"], capture_output=True, text=True).stdout
        self.date = datetime.now(UTC).strftime("%Y-%m-%d")

    def load(self, scenario: Scenario, seconds: int) -> Awaitable[WrkResult | WsResult]:
        running, workload = self.running, self.running.workload
        if scenario.transport == "http":
            return self.wrk.run(
                HOST, running.port, scenario.concurrency, seconds, workload.timeout_s
            )
        url = f"ws://{HOST}:{running.port}{workload.stream_path}"
        return closed_loop(url, workload, scenario.concurrency, seconds, workload.timeout_s)

    async def warm_up(self) -> None:
        await self.running.ready(time.monotonic() + servers.STARTUP_SECONDS)
        for scenario in SCENARIOS:
            await self.load(scenario, _WARMUP_SECONDS)

    async def record(self, scenario: Scenario, path: Path) -> Recording:
        """Record ``scenario`` into ``path`` (``.folded`` or ``.svg``)."""
        running, seconds = self.running, self.options.seconds
        await running.wait_idle()
        command = record_command(self.spy, running.process.pid, seconds, path)
        result, said = await under_py_spy(command, seconds, lambda: self.load(scenario, seconds))
        if not running.alive():
            raise RuntimeError(f"carpool exited under load:\n{running.log_tail()}")
        recording = Recording(path, *figures(result), *sample_counts(said))
        print(f"{scenario.name}: {recording.line()}", flush=True)
        return recording

    async def scenario(self, scenario: Scenario) -> None:
        """Measure ``scenario`` alone, record it twice, and write the summary."""
        options = self.options
        stem = options.out / scenario.stem(self.date, options.label)
        await self.running.wait_idle()
        alone, _, _ = figures(await self.load(scenario, _BASELINE_SECONDS))
        print(f"{scenario.name}: {alone:,.0f}/s without py-spy", flush=True)
        folded = await self.record(scenario, stem.with_suffix(".folded"))
        svg = await self.record(scenario, stem.with_suffix(".svg"))
        heading = [
            f"carpool, {scenario.name}: samples by function, counted from {folded.path.name}",
            f"tree: {describe_tree(options.root)}",
            "environment: "
            + " ".join(f"{name}={value}" for name, value in server_env(options).items()),
            f"load: {scenario.describe()}; correct answers a second:",
            f"  without py-spy: {alone:,.0f}/s ({_BASELINE_SECONDS} s, just before)",
            f"  {folded.line()}",
            f"  {svg.line()}",
            f"{self.version.strip()} --gil, {RATE} Hz, {options.seconds} s each: the samples"
            " in which a carpool thread held the GIL",
            "own: at the top of the stack; total: anywhere on it",
        ]
        profile = Profile.of(folded.path.read_text())
        stem.with_suffix(".txt").write_text("\n".join([*heading, "", *profile.table()]) + "\n")


async def profile(options: Options) -> None:
    """Record every scenario against one carpool; write the SVGs and summaries."""
    server_core, client_core = servers.cores()
    servers.pin_self(client_core)  # wrk and py-spy run on the client core too
    spy = py_spy()
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="carpool-profile-") as tmp:
        workdir = Path(tmp)
        plan = Plan(quick=True, workloads=("tiny",), offline_seconds=0.1)
        reference = (await offline.run_child(plan, server_core, workdir))["reference"]["tiny"]
        workload = workloads.make("tiny", True, reference)
        wrk = Wrk(workload, tmp)
        running = start(options.root, workload, server_core, workdir, server_env(options))
        try:
            profiler = Profiler(options, running, wrk, spy)
            await profiler.warm_up()
            for scenario in SCENARIOS:
                await profiler.scenario(scenario)
        except Exception:
            print(f"carpool's log:\n{running.log_tail()}", file=sys.stderr)
            raise
        finally:
            running.stop()


def stop_strays() -> None:
    """SIGKILL anything this process started that still runs (wrk or py-spy after a failure)."""
    me = os.getpid()
    for pid in procs.tree(me):
        if pid != me:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=int, default=20, help="of each recording (20)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder ({OUT})")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to serve from")
    parser.add_argument("--label", default="", help="goes into the file names, e.g. before")
    args = parser.parse_args(argv)
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    if not (args.root / "server").is_dir() or not (args.root / "weights" / "digits").is_dir():
        parser.error(f"--root {args.root} is no carpool checkout (server/, weights/digits/)")
    options = Options(args.root.resolve(), args.out, args.seconds, args.label)
    try:
        # uvloop, as the suite's runner: the Python WebSocket client needs the cheaper loop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(profile(options))
    finally:
        stop_strays()
    return 0


if __name__ == "__main__":
    sys.exit(main())
