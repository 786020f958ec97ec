"""One benchmark run: the offline limit, then every server, point by point.

For each workload, each server is started on its own (pinned to the server
core), checked in full on a sample of requests, warmed up, then driven in
closed loop at each concurrency (wrk, and carpool's WebSocket stream), then
in open loop at fractions of carpool's measured capacity: the same offered
rates for every server, so their latencies compare at equal load.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import metrics, offline, servers, workloads
from bench.client import fetch
from bench.loadgen import open_loop
from bench.plan import STARTUP_ESTIMATE, Plan
from bench.progress import Progress
from bench.results import Check, Point
from bench.schedule import poisson_schedule
from bench.servers import Running, ServerSpec
from bench.workloads import OK, Workload
from bench.wrk import Wrk
from bench.wsload import Unavailable, closed_loop

T = TypeVar("T")
SAMPLE = {"tiny": 64, "embed": 32}
_OVERLOAD = 0.95  # offered above this share of a server's own capacity: overloaded


def client_cpu() -> float:
    """CPU seconds of this process and its reaped children (wrk)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@dataclass
class Outcome:
    """Everything a run produced, before it is written."""

    offline: dict[str, Any] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    capacity: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class Runner:
    def __init__(self, plan: Plan, progress: Progress, workdir: Path) -> None:
        self.plan = plan
        self.progress = progress
        self.workdir = workdir
        self.server_core, self.client_core = servers.cores()
        self.outcome = Outcome()

    async def run(self) -> Outcome:
        # SIGTERM (or SIGHUP) stops the run as Ctrl-C does: cancelled, each
        # server, wrk and child it started is stopped on the way out
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        for stop in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(stop, task.cancel)
        servers.pin_self(self.client_core)
        self.outcome.offline = await self.offline()
        for name in self.plan.workloads:
            reference = self.outcome.offline["reference"][name]
            workload = workloads.make(name, self.plan.quick, reference)
            wrk = Wrk(workload, str(self.workdir))
            for spec in servers.SERVERS:
                if spec.name in self.plan.servers and name in spec.workloads:
                    await self.serve(spec, workload, wrk)
        return self.outcome

    async def offline(self) -> dict[str, Any]:
        self.progress.show("offline limit and reference answers")
        result = await offline.run_child(self.plan, self.server_core, self.workdir)
        self.progress.advance(self.plan.offline_estimate(), "offline limit measured")
        return result

    async def serve(self, spec: ServerSpec, workload: Workload, wrk: Wrk) -> None:
        plan = self.plan
        what = f"{spec.name} {workload.name}"
        self.progress.show(f"{what}: starting")
        running = servers.start(spec, workload, self.server_core, self.workdir)
        try:
            await running.ready(time.monotonic() + servers.STARTUP_SECONDS)
            self.progress.advance(STARTUP_ESTIMATE[workload.name], f"{what}: checking answers")
            self.outcome.checks.append(await self.check(running))
            await wrk.run(running.host, running.port, 32, plan.warmup_seconds, workload.timeout_s)
            self.progress.advance(plan.warmup_seconds + 2, f"{what}: warmed up")
            best = 0.0
            for concurrency in plan.concurrencies_for(workload.name):
                point = await self.closed_http(running, wrk, concurrency)
                best = max(best, point.rps)
            if "ws" in spec.transports:
                await self.closed_ws_series(running)
            if spec.name == "carpool":
                self.outcome.capacity[workload.name] = best
            reference = self.outcome.capacity.get(workload.name, best)
            for fraction in plan.load_fractions:
                await self.open_point(running, fraction, reference, best)
        except Exception as exc:  # one server's failure is reported; the run goes on
            message = f"{what}: {type(exc).__name__}: {exc}"
            self.outcome.errors.append(message)
            self.outcome.points.append(
                Point(workload.name, spec.name, "http", "closed", status="error", reasons=[message])
            )
            self.progress.note(f"error: {message}")
        finally:
            running.stop()

    async def check(self, running: Running) -> Check:
        """Send each sample request alone and compare every output with the offline model's."""
        workload = running.workload
        check = Check(workload.name, running.spec.name)
        sample = round(SAMPLE[workload.name] * self.plan.sample_scale)
        for index in range(min(sample, len(workload.items))):
            request_id = f"check-{index}"
            status, body = await fetch(
                running.host,
                running.port,
                "POST",
                workload.path,
                workload.body(index, request_id, full=True),
            )
            verdict, why = workload.judge(index, request_id, status, body, full=True)
            check.checked += 1
            if verdict != OK:
                check.wrong += 1
                if len(check.reasons) < 5:
                    check.reasons.append(f"item {index}: {why}")
        if check.wrong:
            self.progress.note(
                f"{running.spec.name} {workload.name}: {check.wrong} wrong answers: {check.reasons[0]}"
            )
        return check

    async def measure(self, running: Running, point: Point, load: Awaitable[T]) -> T:
        """Run ``load`` (a coroutine) once the server is idle; fill in CPU and batches."""
        point.idle_wait_s = await running.wait_idle()
        before = await self.scrape(running)
        server_before, client_before, began = running.cpu(), client_cpu(), time.perf_counter()
        result = await load
        wall = time.perf_counter() - began
        point.server_cpu_s = running.cpu() - server_before
        point.server_cpu = point.server_cpu_s / wall
        point.client_cpu = (client_cpu() - client_before) / wall
        after = await self.scrape(running)
        if before is not None and after is not None:
            batches = metrics.difference(before, after)
            point.batch_histogram = batches.histogram
            point.mean_batch = batches.mean_batch
            if batches.padded_tokens:
                point.tokens, point.padded_tokens = batches.tokens, batches.padded_tokens
                point.padding_waste = batches.padding_waste
        self.outcome.points.append(point)
        return result

    async def scrape(self, running: Running) -> metrics.ModelFigures | None:
        if running.spec.name != "carpool":
            return None
        status, body = await fetch(running.host, running.port, "GET", "/metrics")
        if status != 200:
            return None
        return metrics.ModelFigures.of(metrics.parse(body.decode()), running.workload.model)

    async def closed_http(self, running: Running, wrk: Wrk, concurrency: int) -> Point:
        plan, workload = self.plan, running.workload
        self.progress.show(
            f"{running.spec.name} {workload.name}: closed loop, {concurrency} connections"
        )
        point = Point(workload.name, running.spec.name, "http", "closed", concurrency=concurrency)
        result = await self.measure(
            running,
            point,
            wrk.run(
                running.host, running.port, concurrency, plan.closed_seconds, workload.timeout_s
            ),
        )
        point.duration_s, point.requests = result.duration_s, result.requests
        point.rps = result.rps
        point.ok, point.wrong = result.ok, result.wrong
        point.failed = result.non200 + result.socket_errors
        point.timeouts = result.timeouts
        point.set_latency(result.latency)
        if result.first_wrong:
            point.reasons.append(f"wrong answer: {result.first_wrong[:300]}")
        self._warn(point)
        self.progress.advance(
            plan.seconds_per_point("closed"),
            f"{running.spec.name} {workload.name} c={concurrency}: {point.rps:,.0f}/s",
        )
        return point

    async def closed_ws_series(self, running: Running) -> None:
        plan, workload = self.plan, running.workload
        url = f"ws://{running.host}:{running.port}{workload.stream_path}"
        windows = plan.concurrencies_for(workload.name)
        for index, window in enumerate(windows):
            self.progress.show(
                f"{running.spec.name} {workload.name}: WebSocket, {window} in flight"
            )
            point = Point(workload.name, running.spec.name, "ws", "closed", concurrency=window)
            timeout = workload.timeout_s * plan.timeout_scale
            try:
                result = await self.measure(
                    running, point, closed_loop(url, workload, window, plan.closed_seconds, timeout)
                )
            except Unavailable as exc:
                point.status = "unavailable"
                point.reasons.append(str(exc))
                self.outcome.points.append(point)
                self.progress.note(f"WebSocket unavailable: {exc}")
                left = len(windows) - index
                self.progress.advance(left * plan.seconds_per_point("closed"))
                return
            point.duration_s, point.requests = result.duration_s, result.requests
            point.rps = result.rps
            point.ok, point.failed, point.wrong = result.ok, result.failed, result.wrong
            point.timeouts = result.timeouts
            point.set_latency(result.latency)
            point.reasons.extend(result.reasons)
            self._warn(point)
            self.progress.advance(
                plan.seconds_per_point("closed"), f"carpool WS c={window}: {point.rps:,.0f}/s"
            )

    async def open_point(
        self, running: Running, fraction: float, reference: float, own_capacity: float
    ) -> None:
        plan, workload = self.plan, running.workload
        rate = max(fraction * reference, 1.0)
        self.progress.show(f"{running.spec.name} {workload.name}: open loop at {rate:,.0f}/s")
        seed = zlib.crc32(f"{workload.name}-{fraction}".encode())
        schedule = poisson_schedule(rate, plan.open_seconds, seed)
        point = Point(
            workload.name,
            running.spec.name,
            "http",
            "open",
            offered_rps=rate,
            load_fraction=fraction,
            overloaded=rate > _OVERLOAD * own_capacity,
        )
        timeout = workload.timeout_s * plan.timeout_scale
        result = await self.measure(
            running,
            point,
            open_loop(
                running.host, running.port, workload, schedule, rate, plan.max_connections, timeout
            ),
        )
        point.duration_s, point.requests = plan.open_seconds, result.requests
        point.rps = result.achieved_rps
        point.ok, point.failed, point.wrong = result.ok, result.failed, result.wrong
        point.timeouts = result.timeouts
        point.set_latency(result.latency)
        point.send_lag_p50_ms, point.send_lag_p99_ms = result.send_lag.p50, result.send_lag.p99
        point.connections = result.connections
        point.reasons.extend(result.reasons)
        self._warn(point)
        self.progress.advance(
            plan.seconds_per_point("open"),
            f"{running.spec.name} {workload.name} {rate:,.0f}/s: p99 {point.p99_ms:.1f} ms",
        )

    def _warn(self, point: Point) -> None:
        if point.bad:
            self.progress.note(
                f"{point.label} {point.workload} {point.mode} "
                f"(c={point.concurrency}, rate={point.offered_rps}): {point.wrong} wrong, "
                f"{point.failed} failed, {point.timeouts} timed out: {point.reasons[:1]}"
            )


def run(plan: Plan) -> Outcome:
    """Run ``plan`` to the end (bounded: every point and startup has a time limit)."""
    progress = Progress(plan.planned_seconds())
    _raise_open_files_limit()  # 1,000 connections, in the generators and (inherited) the servers
    with tempfile.TemporaryDirectory(prefix="carpool-bench-") as workdir:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as loop:
                return loop.run(Runner(plan, progress, Path(workdir)).run())
        finally:
            progress.close()


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: a cheaper event loop for the load generators."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
