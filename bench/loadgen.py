"""The open-loop load generator: requests leave on a Poisson schedule,
whatever the server does.

A closed loop (wrk) waits for an answer before it sends again, so a slow
server slows the load down and its queueing never shows ("coordinated
omission"). Here every request has an intended send time from the schedule
and its latency counts from that time: a request that waits for a free
connection, or behind a server that fell behind, carries all of that wait.

Requests leave on a ``timerfd`` alarm (``Alarm``): sub-millisecond, and
asleep in between, so one core holds tens of thousands of requests a
second. The generator also reports its own send lag, the time between a request's
intended time and the moment the generator got to it: a large lag means the
generator, not the server, could not keep up, and the point is suspect.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from bench.client import Connection, open_connection, request_bytes
from bench.loopback import require_loopback
from bench.stats import Latency
from bench.workloads import FAILED, OK, WRONG, Workload

PENDING, TIMEOUT = -1, 3
_SWEEP_SECONDS = 0.05
_START_DELAY = 0.02
_KEEP_REASONS = 5


class Recorder:
    """Per request: its intended time, when the generator sent it, when its
    answer came, and the verdict."""

    def __init__(self, count: int) -> None:
        self.intended = [math.nan] * count
        self.sent = [math.nan] * count
        self.done = [math.nan] * count
        self.outcome = [PENDING] * count
        self.pending = count
        self.reasons: list[str] = []
        self.all_done = asyncio.Event()
        if not count:
            self.all_done.set()

    def finish(self, index: int, outcome: int, at: float, reason: str = "") -> None:
        if self.outcome[index] != PENDING:
            return
        self.outcome[index] = outcome
        self.done[index] = at
        self.pending -= 1
        if not self.pending:
            self.all_done.set()
        if reason and len(self.reasons) < _KEEP_REASONS:
            self.reasons.append(reason)

    def latencies(self) -> list[float]:
        """Seconds from intended time to a correct answer; ``inf`` for anything else."""
        return [
            done - intended if outcome == OK else math.inf
            for intended, done, outcome in zip(self.intended, self.done, self.outcome, strict=True)
        ]

    def send_lags(self) -> list[float]:
        return [s - i for s, i in zip(self.sent, self.intended, strict=True) if not math.isnan(s)]

    def count(self, outcome: int) -> int:
        return self.outcome.count(outcome)


Dispatch = Callable[[int], None]


class Alarm:
    """A one-shot timer with nanosecond resolution on the event loop: a Linux
    ``timerfd`` (through libc; ``os.timerfd_create`` is Python 3.13's) that
    the loop watches like a socket. The loop's own timers round to whole
    milliseconds, so at 40,000 requests a second they could only send in
    bursts of 40 or spin; this one wakes the loop when the next request is
    due and not before, and the generator sleeps in between."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd: int = fd
        self._callback = callback
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._fired)

    def at(self, when: float) -> None:
        """Fire once at ``when`` (``time.perf_counter()``: CLOCK_MONOTONIC on
        Linux); a time already past fires at once."""
        seconds = max(when, 1e-9)  # an all-zero value would disarm the timer
        whole = int(seconds)
        spec = _ITimerSpec(_TimeSpec(0, 0), _TimeSpec(whole, int((seconds - whole) * 1e9)))
        if self._libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _fired(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)  # the expiration count; reading re-arms the fd's readiness
        self._callback()

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1
_BURST = 64  # overdue requests sent per wake-up before answers get a turn


async def drive(
    schedule: Sequence[float],
    dispatch: Dispatch,
    recorder: Recorder,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Hand request ``i`` to ``dispatch`` at ``start + schedule[i]``; return ``start``.

    An ``Alarm`` wakes the loop when the next request is due; every request
    due by then leaves (at most ``_BURST`` before the loop reads answers
    again), and the alarm is set for the next. No spinning: between requests
    the generator sleeps, so its CPU use is its real cost, and a generator
    that cannot keep up shows as send lag, never as a lower offered rate.
    """
    start = clock() + _START_DELAY
    finished = asyncio.get_running_loop().create_future()
    count = len(schedule)
    cursor = 0

    def wake() -> None:
        nonlocal cursor
        now = clock()
        sent = 0
        while cursor < count and sent < _BURST:
            due = start + schedule[cursor]
            if due > now:
                break
            recorder.intended[cursor] = due
            recorder.sent[cursor] = clock()
            dispatch(cursor)
            cursor += 1
            sent += 1
        if cursor == count:
            if not finished.done():
                finished.set_result(None)
        elif sent == _BURST:
            alarm.at(now)  # behind: go on after the loop has read what came in
        else:
            alarm.at(start + schedule[cursor])

    alarm = Alarm(wake)
    try:
        if count:
            alarm.at(start + schedule[0])
            await finished
    finally:
        alarm.close()
    return start


class HttpPool:
    """Keep-alive connections, opened on demand up to ``max_connections``;
    past that, requests wait in a FIFO (and their wait counts)."""

    def __init__(
        self,
        host: str,
        port: int,
        workload: Workload,
        recorder: Recorder,
        max_connections: int,
        timeout: float,
    ) -> None:
        self.host = require_loopback(host)
        self.port = port
        self.workload = workload
        self.recorder = recorder
        self.max_connections = max_connections
        self.timeout = timeout
        items = len(workload.items)
        self._requests = [
            request_bytes(host, port, workload.path, workload.body(i, str(i))) for i in range(items)
        ]
        self._items = items
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._opening = 0
        self._backlog: deque[int] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.live = 0  # connections open now
        self.peak = 0  # the most open at once: how big the crowd grew

    def dispatch(self, index: int) -> None:
        if self._idle:
            # the most recently used connection: never one the server is about to close
            self._send(self._idle.pop(), index)
        elif self._room():
            self._open(index)
        else:
            self._backlog.append(index)

    def _room(self) -> bool:
        return len(self._busy) + self._opening < self.max_connections

    def _open(self, index: int) -> None:
        if self._closed:
            return
        self._opening += 1
        task = asyncio.get_running_loop().create_task(self._open_and_send(index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def sweep(self, now: float) -> None:
        """Time out whatever has waited longer than ``timeout`` since its intended time."""
        recorder, limit = self.recorder, now - self.timeout
        while self._backlog and recorder.intended[self._backlog[0]] < limit:
            recorder.finish(self._backlog.popleft(), TIMEOUT, now, "timed out before it was sent")
        for conn in [c for c in self._busy if recorder.intended[c.tag] < limit]:
            recorder.finish(conn.tag, TIMEOUT, now, f"no answer within {self.timeout:g} s")
            conn.abort()

    async def aclose(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        now = time.perf_counter()
        for conn in self._busy:
            self.recorder.finish(conn.tag, TIMEOUT, now, "no answer by the end of the point")
        for conn in [*self._idle, *self._busy]:
            conn.abort()
        while self._backlog:
            self.recorder.finish(self._backlog.popleft(), TIMEOUT, now, "never sent")

    def _send(self, conn: Connection, index: int) -> None:
        self._busy.add(conn)
        conn.send(self._requests[index % self._items], index)

    async def _open_and_send(self, index: int) -> None:
        try:
            conn = await open_connection(self.host, self.port, self._on_answer, self._on_lost)
        except OSError as exc:
            self.recorder.finish(index, FAILED, time.perf_counter(), f"connect: {exc}")
            return
        finally:
            self._opening -= 1
        self.live += 1
        self.peak = max(self.peak, self.live)
        self._send(conn, index)

    def _on_answer(self, conn: Connection, status: int, body: bytes, at: float) -> None:
        index = conn.tag
        self._busy.discard(conn)
        conn.tag = -1
        verdict, why = self.workload.judge(
            index % self._items, str(index % self._items), status, body
        )
        self.recorder.finish(index, verdict, at, why)
        if conn.closing:
            conn.abort()
            return
        self._next(conn)

    def _next(self, conn: Connection) -> None:
        recorder = self.recorder
        while self._backlog:
            index = self._backlog.popleft()
            if recorder.outcome[index] == PENDING:
                self._send(conn, index)
                return
        self._idle.append(conn)

    def _on_lost(self, conn: Connection, why: str) -> None:
        self.live -= 1
        if conn in self._busy:
            self._busy.discard(conn)
            self.recorder.finish(conn.tag, FAILED, time.perf_counter(), f"connection lost: {why}")
        elif conn in self._idle:
            self._idle.remove(conn)
        # a connection closed (often one timed out): open another for whatever waits
        while self._backlog and self._room():
            index = self._backlog.popleft()
            if self.recorder.outcome[index] == PENDING:
                self._open(index)


async def run_pool(pool: HttpPool, schedule: Sequence[float]) -> float:
    """Send ``schedule`` through ``pool``, wait for the answers (at most the
    pool's timeout past the last send), close the pool; return the start time.

    ``open_loop`` in the bare; a caller that wants every request's record
    (``pool.recorder``) or its own pool subclass calls this directly.
    """
    recorder = pool.recorder

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            pool.sweep(time.perf_counter())

    sweeping = asyncio.get_running_loop().create_task(sweeper())
    try:
        start = await drive(schedule, pool.dispatch, recorder)
        deadline = start + (schedule[-1] if schedule else 0) + pool.timeout + 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                recorder.all_done.wait(), max(0.0, deadline - time.perf_counter())
            )
    finally:
        sweeping.cancel()
        await asyncio.gather(sweeping, return_exceptions=True)
        await pool.aclose()
    return start


@dataclass(frozen=True, slots=True)
class OpenLoopResult:
    offered_rps: float
    requests: int
    ok: int
    failed: int
    wrong: int
    timeouts: int
    achieved_rps: float
    latency: Latency
    send_lag: Latency
    reasons: tuple[str, ...]
    connections: int = 0  # the most the generator had open at once


async def open_loop(
    host: str,
    port: int,
    workload: Workload,
    schedule: Sequence[float],
    rate: float,
    max_connections: int = 1024,
    timeout: float | None = None,
) -> OpenLoopResult:
    """Send one request per ``schedule`` entry to ``host:port`` and judge every answer.

    Bounded in time: the schedule's span, then at most ``timeout`` (default:
    the workload's) for the last answers; whatever has no answer by then, or
    waited longer than that, is a timeout.
    """
    timeout = workload.timeout_s if timeout is None else timeout
    recorder = Recorder(len(schedule))
    pool = HttpPool(host, port, workload, recorder, max_connections, timeout)
    start = await run_pool(pool, schedule)
    return replace(summarize(recorder, rate, len(schedule), start), connections=pool.peak)


def summarize(recorder: Recorder, rate: float, requests: int, start: float) -> OpenLoopResult:
    """The figures of a finished open-loop run whose schedule began at ``start``."""
    ok = recorder.count(OK)
    ended = max(
        (d for d, o in zip(recorder.done, recorder.outcome, strict=True) if o == OK), default=start
    )
    return OpenLoopResult(
        offered_rps=rate,
        requests=requests,
        ok=ok,
        failed=recorder.count(FAILED),
        wrong=recorder.count(WRONG),
        timeouts=recorder.count(TIMEOUT) + recorder.count(PENDING),
        achieved_rps=ok / max(ended - start, 1e-9),
        latency=Latency.of(recorder.latencies()),
        send_lag=Latency.of(recorder.send_lags()),
        reasons=tuple(recorder.reasons),
    )
