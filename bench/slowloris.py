"""Slow clients: are they cut off on time while real traffic is served? (RELIABILITY R20)

    python -m bench.slowloris           # the scenario's numbers (make slow-clients, ~2 minutes)
    python -m bench.slowloris --headers 100 --bodies 20 --deadline 2 --seconds 5

Serves the fake echo model (tests/fakes.py: y = 2x) from a child ``carpool
serve`` on 127.0.0.1 with header and body deadlines of ``deadline`` seconds,
started with a soft limit of 1024 open files (a common default, which the
server must raise itself to hold 1,200 connections). Then:

1. calibrate C: the closed-loop throughput of 16 keep-alive connections;
2. baseline: open-loop Poisson traffic at ``load`` x C for ``seconds``;
3. attack: a second process (bench/trickle.py) keeps ``headers`` connections
   sending a request head one byte a second and ``bodies`` connections
   sending a body one byte a second, each replaced when the server closes
   it, while the same traffic runs again;
4. the attackers stop replacing connections: the server must close the last
   ones itself;
5. control: the same traffic once more, not judged: how far the p99 moves on
   this machine without any attack.

It fails when real traffic has any failure, or its p99 during the attack is
over 1.2 x the baseline's; when a slow connection is closed outside the
deadline +/- 1 s or without a 408; when the server's open fds are not back
to their baseline (+/- 2) within 15 s of the attack's end; or when the
server logged an error. With two cores or more (and ``--pin``), the server
runs on CPU 0 and the traffic generator and the attackers on CPU 1.

The traffic generator sends on a 1 ms tick, not by spinning to each
request's exact time as bench/loadgen.py's ``drive`` does: on two cores a
spinning generator would take a whole core from everything else. Latency
still counts from each request's intended time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from bench.client import Connection, open_connection, request_bytes
from bench.loadgen import HttpPool, OpenLoopResult, Recorder, summarize
from bench.loopback import HOST, require_loopback
from bench.procs import cpu_seconds
from bench.schedule import poisson_schedule
from bench.stats import percentile
from bench.trickle import Closed, attacker, raise_open_files, run_loop
from bench.workloads import OK, Workload

ROOT = Path(__file__).resolve().parent.parent
P99_FACTOR = 1.2
CLOSE_TOLERANCE = 1.0  # seconds either side of the deadline
FD_SLACK = 2
SETTLE_SECONDS = 15.0  # for the server's fds to come back after the attack
SERVER_CPU, CLIENT_CPU = 0, 1
_TICK = 0.001


class Echo(Workload):
    """The fake model's traffic: one value per request, the answer is twice it."""

    name = "echo"
    model = "echo"
    input_name = "x"
    datatype = "FP32"
    output = "y"
    timeout_s = 5.0

    def lua_expectation(self, index: int) -> str:
        return f'"data":[{2 * self.items[index]}]'

    def _shape(self, item: Any) -> list[int]:
        return [1, 1]

    def _load_tail(self) -> bytes:
        return b"}"

    def _check(self, index: int, outputs: dict[str, Any], full: bool) -> str:
        data = (outputs.get("y") or {}).get("data")
        want = [2.0 * self.items[index]]
        return "" if data == want else f"y = {data}, expected {want}"


# -- the judges ----------------------------------------------------------------------


def judge_traffic(baseline: OpenLoopResult, attack: OpenLoopResult) -> list[str]:
    """Real traffic: no failure in either run, and p99 under attack within the factor."""
    failures = []
    for label, run in (("baseline", baseline), ("attack", attack)):
        lost = run.requests - run.ok
        if lost:
            failures.append(
                f"{lost} of {run.requests} real requests failed during the {label} "
                f"({run.failed} failed, {run.wrong} wrong, {run.timeouts} timed out): "
                f"{'; '.join(run.reasons[:2])}"
            )
    if not attack.latency.p99 <= P99_FACTOR * baseline.latency.p99:
        failures.append(
            f"p99 {attack.latency.p99:.2f} ms under attack, over {P99_FACTOR} x the "
            f"baseline's {baseline.latency.p99:.2f} ms"
        )
    return failures


def judge_closes(closes: Sequence[Closed], deadline: float) -> list[str]:
    """Every slow connection closed within deadline +/- CLOSE_TOLERANCE, with a 408."""
    if not closes:
        return ["no slow connection was measured"]
    failures = []
    for kind in sorted({c.kind for c in closes}):
        mine = [c for c in closes if c.kind == kind]
        early = sum(c.seconds < deadline - CLOSE_TOLERANCE for c in mine)
        late = sum(c.seconds > deadline + CLOSE_TOLERANCE for c in mine)
        if early or late:
            worst = max(mine, key=lambda c: abs(c.seconds - deadline)).seconds
            failures.append(
                f"slow {kind}: {early} closed early and {late} late of {len(mine)} "
                f"(deadline {deadline:g} s, worst {worst:.2f} s)"
            )
        not_408 = sum(c.status != 408 for c in mine)
        if not_408:
            failures.append(f"slow {kind}: {not_408} of {len(mine)} closed without a 408")
    return failures


def judge_fds(baseline: int, after: int) -> list[str]:
    if abs(after - baseline) > FD_SLACK:
        return [
            f"the server has {after} open fds {SETTLE_SECONDS:g} s after the attack, {baseline} before"
        ]
    return []


# -- the run ---------------------------------------------------------------------------


@dataclass
class Verdict:
    c_rps: float
    offered_rps: float
    baseline: dict[str, float]
    attack: dict[str, float]
    attackers_cpu_s: float  # the attackers' CPU seconds during the attack's traffic
    control: dict[str, float]  # after the attack, not judged: this machine's own drift
    p99_ratio: float
    slow_connections: dict[str, int]
    close_seconds: dict[str, dict[str, float]]
    connect_errors: list[str]
    server_open_files_limit: int
    fds_baseline: int
    fds_peak: int
    fds_after: int
    fds_back_after_s: float
    server_log_errors: int
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class _Server:
    pid: int
    port: int

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def open_files_limit(self) -> int:
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        return -1


async def run(
    headers: int,
    bodies: int,
    deadline: float,
    seconds: float,
    load: float,
    pin: bool = True,
    seed: int = 0,
) -> Verdict:
    folder = Path(tempfile.mkdtemp(prefix="carpool-slowloris-"))
    sys.path.insert(0, str(ROOT))
    from tests.fakes import model_dir

    model_dir(folder, "echo", max_batch_size=32, max_queue=1024)
    pinned = pin and (os.cpu_count() or 1) >= 2
    if pinned:
        _use_cpu(CLIENT_CPU)
    raise_open_files(4096)
    env = {
        **os.environ,
        "CARPOOL_TORCH_THREADS": "1",
        "CARPOOL_HEADER_TIMEOUT": str(deadline),
        "CARPOOL_BODY_TIMEOUT": str(deadline),
        "CARPOOL_LOG_LEVEL": "info",
    }
    log = folder / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(  # noqa: ASYNC220  (started once, before the load)
            [sys.executable, "-m", "server", "serve", "--host", require_loopback(HOST),
             "--port", "0", "--models", str(folder)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=sink,
            preexec_fn=lambda: _child_limits(pinned),
        )  # fmt: skip
    try:
        server = _Server(process.pid, await _port_of(process, log))
        verdict = await _measure(server, headers, bodies, deadline, seconds, load, seed)
    finally:
        process.terminate()
        process.wait(60)
        text = log.read_text()
        shutil.rmtree(folder, ignore_errors=True)
    verdict.server_log_errors = len(re.findall(r"Traceback|\bERROR\b", text))
    if verdict.server_log_errors:
        verdict.failures.append(f"{verdict.server_log_errors} errors in the server's log")
    return verdict


async def _measure(
    server: _Server,
    headers: int,
    bodies: int,
    deadline: float,
    seconds: float,
    load: float,
    seed: int,
) -> Verdict:
    workload = Echo([float(i) for i in range(256)], {})
    c_rps = await calibrate(server.port, workload, 16, 3.0)
    rate = load * c_rps

    async def traffic(seed: int) -> tuple[OpenLoopResult, float]:
        """One run of real traffic, and the server's CPU seconds during it."""
        cpu = cpu_seconds(server.pid)
        schedule = poisson_schedule(rate, seconds, seed)
        result = await steady_load(server.port, workload, schedule, rate)
        return result, cpu_seconds(server.pid) - cpu

    baseline, cpu_baseline = await traffic(seed)
    await asyncio.sleep(1.0)
    fds_baseline = server.fds()

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    slow = context.Process(
        target=attacker,
        args=(server.port, headers, bodies, deadline, theirs, os.sched_getaffinity(0)),
        daemon=True,
    )
    slow.start()
    try:
        _, opened, _ = await _receive(ours, 120)
        assert slow.pid is not None
        cpu = cpu_seconds(slow.pid)
        attack = asyncio.create_task(traffic(seed + 1))
        fds_peak = server.fds()
        while not attack.done():
            fds_peak = max(fds_peak, server.fds())
            await asyncio.wait({attack}, timeout=0.5)
        cpu_attackers = cpu_seconds(slow.pid) - cpu
        ours.send("stop")
        stopped = time.monotonic()
        fds_after = server.fds()
        for _ in range(int(SETTLE_SECONDS / 0.25)):
            if abs(fds_after - fds_baseline) <= FD_SLACK:
                break
            await asyncio.sleep(0.25)  # another process's fds: nothing to await
            fds_after = server.fds()
        back_after = time.monotonic() - stopped
        _, closes, connect_errors = await _receive(ours, deadline + 30)
    finally:
        if slow.is_alive():
            slow.kill()
    result, cpu_attack = attack.result()
    # the same traffic once more, after the attack: not judged, it shows how
    # far the p99 moves on this machine without any attack
    control, cpu_control = await traffic(seed + 2)

    failures = judge_traffic(baseline, result) + judge_closes(closes, deadline)
    failures += judge_fds(fds_baseline, fds_after)
    if opened != headers + bodies or connect_errors:
        failures.append(f"{opened} of {headers + bodies} slow connections opened: {connect_errors}")
    return Verdict(
        c_rps=round(c_rps, 1),
        offered_rps=round(rate, 1),
        baseline=_figures(baseline, cpu_baseline),
        attack=_figures(result, cpu_attack),
        attackers_cpu_s=round(cpu_attackers, 2),
        control=_figures(control, cpu_control),
        p99_ratio=round(result.latency.p99 / baseline.latency.p99, 3),
        slow_connections={k: sum(c.kind == k for c in closes) for k in ("headers", "body")},
        close_seconds=_close_figures(closes),
        connect_errors=connect_errors,
        server_open_files_limit=server.open_files_limit(),
        fds_baseline=fds_baseline,
        fds_peak=fds_peak,
        fds_after=fds_after,
        fds_back_after_s=round(back_after, 2),
        server_log_errors=0,
        failures=failures,
    )


async def calibrate(port: int, workload: Workload, connections: int, seconds: float) -> float:
    """C: correct answers a second from ``connections`` closed-loop keep-alive connections."""
    loop = asyncio.get_running_loop()
    requests = [
        request_bytes(HOST, port, workload.path, workload.body(i, str(i)))
        for i in range(len(workload.items))
    ]
    counted = {"ok": 0, "bad": 0}
    counting = False
    sent = 0
    lost: list[str] = []

    def on_answer(conn: Connection, status: int, body: bytes, at: float) -> None:
        nonlocal sent
        index = conn.tag
        verdict, _ = workload.judge(index, str(index), status, body)
        if counting:
            counted["ok" if verdict == OK else "bad"] += 1
        sent += 1
        conn.send(requests[sent % len(requests)], sent % len(requests))

    conns = [
        await open_connection(HOST, port, on_answer, lambda conn, why: lost.append(why))
        for _ in range(connections)
    ]
    for i, conn in enumerate(conns):
        conn.send(requests[i], i)
    await asyncio.sleep(0.5)  # warm up
    counting = True
    start = loop.time()
    await asyncio.sleep(seconds)
    counting = False
    elapsed = loop.time() - start
    for conn in conns:
        conn.abort()
    if counted["bad"] or lost or not counted["ok"]:
        raise RuntimeError(f"calibration failed: {counted}, {lost[:3]}")
    return counted["ok"] / elapsed


async def steady_load(
    port: int, workload: Workload, schedule: Sequence[float], rate: float
) -> OpenLoopResult:
    """Open-loop traffic: request ``i`` goes at ``schedule[i]``, on the first
    1 ms tick at or after it; its latency counts from ``schedule[i]``."""
    recorder = Recorder(len(schedule))
    pool = HttpPool(HOST, port, workload, recorder, 256, workload.timeout_s)
    start = time.perf_counter() + 0.02
    swept, sent = start, 0
    try:
        while sent < len(schedule):
            now = time.perf_counter()
            while sent < len(schedule) and start + schedule[sent] <= now:
                recorder.intended[sent], recorder.sent[sent] = start + schedule[sent], now
                pool.dispatch(sent)
                sent += 1
            if now - swept > 0.05:
                pool.sweep(now)
                swept = now
            await asyncio.sleep(_TICK)
        for _ in range(int((workload.timeout_s + 1) / 0.05)):
            if recorder.all_done.is_set():
                break
            await asyncio.sleep(0.05)
            pool.sweep(time.perf_counter())
    finally:
        await pool.aclose()
    return summarize(recorder, rate, len(schedule), start)


def _figures(run: OpenLoopResult, server_cpu: float) -> dict[str, float]:
    return {
        "server_cpu_us_per_request": round(server_cpu / max(run.ok, 1) * 1e6, 1),
        "requests": run.requests,
        "ok": run.ok,
        "failed": run.requests - run.ok,
        "achieved_rps": round(run.achieved_rps, 1),
        "p50_ms": round(run.latency.p50, 3),
        "p90_ms": round(run.latency.p90, 3),
        "p99_ms": round(run.latency.p99, 3),
        "max_ms": round(run.latency.max, 3),
        "send_lag_p99_ms": round(run.send_lag.p99, 3),
    }


def _close_figures(closes: Sequence[Closed]) -> dict[str, dict[str, float]]:
    figures = {}
    for kind in ("headers", "body"):
        seconds = sorted(c.seconds for c in closes if c.kind == kind)
        if seconds:
            figures[kind] = {
                "min": round(seconds[0], 3),
                "p50": round(percentile(seconds, 50), 3),
                "p99": round(percentile(seconds, 99), 3),
                "max": round(seconds[-1], 3),
            }
    return figures


# -- plumbing --------------------------------------------------------------------------


def _child_limits(pinned: bool) -> None:
    # the common default soft limit: `carpool serve` must raise its own
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    if pinned:
        _use_cpu(SERVER_CPU)


def _use_cpu(cpu: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {cpu})


async def _port_of(process: subprocess.Popen[bytes], log: Path) -> int:
    for _ in range(1200):  # two minutes
        if process.poll() is not None:
            break
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", _read(log))
        if found:
            return int(found.group(1))
        await asyncio.sleep(0.1)  # a child's log file: nothing to await
    raise RuntimeError("the server did not start:\n" + _read(log))


def _read(path: Path) -> str:
    return path.read_text()


async def _receive(pipe: Pipe, timeout: float) -> Any:
    give_up = time.monotonic() + timeout
    while not pipe.poll():
        if time.monotonic() > give_up:
            raise TimeoutError(f"the attackers did not report within {timeout:g} s")
        await asyncio.sleep(0.05)  # a pipe to another process: polled
    return pipe.recv()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.slowloris", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--headers", type=int, default=1000, help="connections with slow heads")
    parser.add_argument("--bodies", type=int, default=200, help="connections with slow bodies")
    parser.add_argument("--deadline", type=float, default=10.0, help="header and body deadline (s)")
    parser.add_argument("--seconds", type=float, default=25.0, help="length of each traffic run")
    parser.add_argument("--load", type=float, default=0.5, help="real traffic, as a fraction of C")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="server on CPU 0, traffic on CPU 1 (off on a machine others share)",
    )
    args = parser.parse_args()
    verdict = run_loop(
        run(args.headers, args.bodies, args.deadline, args.seconds, args.load, args.pin)
    )
    print(json.dumps({**asdict(verdict), "passed": verdict.passed}, indent=2))
    sys.exit(0 if verdict.passed else 1)


if __name__ == "__main__":
    main()
