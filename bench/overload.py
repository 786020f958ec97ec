"""Overload: ten times the sustainable rate, then recovery, with health probed
all along (RELIABILITY R3, R4, R5).

    python -m bench.overload                      # the full run (make overload, ~10 min)
    python -m bench.overload --phase-seconds 4    # the shortened run (tests/scenarios/test_overload_run.py)

One child ``carpool serve`` on 127.0.0.1, pinned to core 0 (``taskset``); the
open-loop generator (bench/loadgen.py) runs here, on core 1. First it measures
C, the highest rate the server sustains at its latency SLO: the capacity M
with the queue kept full, then open-loop steps at 0.5-1.0 x M; C is the last
step where (almost) nothing was rejected and p99 stayed within the SLO. Then
one continuous Poisson schedule: 1x, 2x and 10x C, then 0.5x C (R4), each
``--phase-seconds``. ``/v2/health/live`` and ``/ready`` are probed every second
on connections of their own (R5); ``/metrics`` and the server's RSS are
sampled every second. Recovery (R4) is judged on the 0.5x phase after a
window of min(5 s, 2 x the queue timeout). The probes share the generator's
event loop, so their latency includes its lateness (``lag p99`` in the table).

The model is the "slow model" of RELIABILITY's test doubles (tests/fakes.py,
y = 2x, a fixed 40 ms sleep per batch of at most 8), not a real one. digits
cannot be overloaded from here: C is ~9k req/s, so 10x C is 90k req/s against
a Python generator on one core. minilm can (10x C is ~1,000 req/s; ``--model
minilm`` runs it), but its forward pass then shares the server's one core with
the event loop, so its 10x phase measures how the tokenizer and torch share a
core with ~900 rejections a second on a shared 2-core machine, not the
shedding. The slow model's batch costs no CPU: its capacity is fixed, so
goodput can only fall at 10x if refusing requests keeps the event loop from
feeding the worker, which is what R3 asks about.

The model gets a model.toml of its own with a bounded queue (two batches) and
a ``queue_timeout_ms``, so an accepted request waits at most that long: p99 at
10x <= max queue wait + one batch time.

The verdict separates behaviour (``failures``: lost or 500 answers, rejections
other than carpool's JSON 503 + Retry-After, live/ready failing, rejections
after the recovery window, queue depth or batch cap wrong, RSS growth, the
process gone) from speed figures (``speed_failures``: goodput, p99 ratios and
bounds, rejection and probe p99). The full run fails on either; the shortened
run in ``make test`` asserts the behaviour only, since a shared 2-core CI
machine cannot promise milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import corpus, procs
from bench.client import Connection, fetch
from bench.loadgen import PENDING, HttpPool, Recorder, run_pool
from bench.loopback import HOST, require_loopback
from bench.metrics import parse
from bench.schedule import poisson_schedule
from bench.servers import free_port
from bench.stats import Latency, fmt_ms
from bench.workloads import FAILED, OK, WRONG, Embed, Workload

ROOT = Path(__file__).resolve().parent.parent
SERVER_CORE, CLIENT_CORE = 0, 1

# What an answer was. Rejections are the three kinds of 503.
OURS, BARE, OTHER_503 = "overloaded", "bare 503", "other 503"
REJECTIONS = frozenset({OURS, BARE, OTHER_503})
GOOD, WRONG_ANSWER, LOST = "ok", "wrong", "lost"
# Accepted, but its queue deadline (queue_timeout_ms) passed first: answered
# 504 and never computed. This is what bounds an accepted request's wait.
DEADLINE = "status 504"

GOODPUT_RATIO = 0.9  # goodput at 10x >= this x goodput at 1x
P99_RATIO = 2.0  # p99 of accepted requests at 10x <= this x p99 at 1x
OURS_SHARE = 0.999  # of all 503s, at least this share is carpool's own
REJECTION_P99_MS = 10.0
RSS_GROWTH = 1.1  # RSS at the end of 10x <= this x RSS after 1x
RECOVERY_P99_RATIO = 1.1
RECOVERY_LIMIT_S = 5.0
LIVE_P99_MS = 100.0
HTTP_SLACK_MS = 5.0  # a loopback round trip on top of queue wait + batch time
STEPS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # calibration: fractions of the capacity M
STEP_REJECTIONS = 0.001  # a step with more rejected than this is not sustainable


@dataclass(frozen=True, slots=True)
class Served:
    """The served model and its batching bounds (its model.toml)."""

    model: str
    max_batch_size: int
    max_queue: int
    queue_timeout_ms: float
    slo_ms: float  # calibration: p99 at C must stay within this
    sleep_ms: float = 0.0  # the slow model's time per batch


MODELS = {
    "slow": Served("slow", max_batch_size=8, max_queue=16, queue_timeout_ms=150, slo_ms=200,
                   sleep_ms=40),
    "minilm": Served("minilm", max_batch_size=32, max_queue=64, queue_timeout_ms=1000,
                     slo_ms=1500),
}  # fmt: skip


class Echo(Workload):
    """The slow model's requests: one value x each; the answer must be 2x."""

    name = "echo"
    model = "slow"
    input_name = "x"
    datatype = "FP32"
    output = "y"
    timeout_s = 10.0

    def lua_expectation(self, index: int) -> str:
        return '"name":"y"'

    def _shape(self, item: Any) -> list[int]:
        return [1, 1]

    def _load_tail(self) -> bytes:
        return b"}"

    def _check(self, index: int, outputs: dict[str, Any], full: bool) -> str:
        y = outputs.get("y")
        want = [2.0 * self.items[index]]
        got = y.get("data") if isinstance(y, dict) else None
        return "" if got == want else f"y = {got}, expected {want}"


def workload(served: Served) -> Workload:
    if served.model == "slow":
        return Echo([float(i) for i in range(256)], {})
    return Embed(corpus.sentences(256), {})


# -- what each answer was ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One request: when it was meant to leave (seconds from the schedule's
    start), what came back, and how long it took."""

    at: float
    kind: str  # GOOD, WRONG_ANSWER, LOST, one of REJECTIONS, or "status N" (DEADLINE)
    latency: float  # seconds from the intended send time; inf when lost
    server: float  # seconds from the write to the answer (a rejection's own time)
    lag: float  # seconds the generator sent it late


def classify_503(head: bytes, body: bytes) -> str:
    """OURS for carpool's shedding answer (JSON, reason ``overloaded``, a
    ``Retry-After`` of at least 1 s), BARE for uvicorn's plain-text guard,
    OTHER_503 for anything else."""
    if body.strip() == b"Service Unavailable":
        return BARE
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return OTHER_503
    retry = re.search(rb"\r\nretry-after: *(\d+)", head)
    json_type = b"\r\ncontent-type: application/json" in head
    if isinstance(doc, dict) and doc.get("reason") == OURS and retry and json_type:
        return OURS if int(retry.group(1)) >= 1 else OTHER_503
    return OTHER_503


def kind_of(outcome: int, status: int, rejection: str) -> str:
    if outcome == OK:
        return GOOD
    if outcome == WRONG:
        return WRONG_ANSWER
    if outcome != FAILED or status == 0:
        return LOST  # reset, EOF, no answer in time, or never sent
    if status == 503:
        return rejection
    return f"status {status}"


class RecordingPool(HttpPool):
    """An ``HttpPool`` that also keeps each request's status, when it was
    written, and which kind of 503 it got."""

    def __init__(self, port: int, work: Workload, count: int, connections: int) -> None:
        super().__init__(HOST, port, work, Recorder(count), connections, work.timeout_s)
        self.written = [math.nan] * count
        self.status = [0] * count
        self.rejection = [""] * count

    def _send(self, conn: Connection, index: int) -> None:
        self.written[index] = time.perf_counter()
        super()._send(conn, index)

    def _on_answer(self, conn: Connection, status: int, body: bytes, at: float) -> None:
        index = conn.tag
        if index >= 0 and self.recorder.outcome[index] == PENDING:
            self.status[index] = status
            if status == 503:
                self.rejection[index] = classify_503(conn.head, body)
        super()._on_answer(conn, status, body, at)

    def answers(self, schedule: Sequence[float]) -> list[Answer]:
        record = self.recorder
        result = []
        for i, at in enumerate(schedule):
            kind = kind_of(record.outcome[i], self.status[i], self.rejection[i])
            latency = math.inf if kind == LOST else record.done[i] - record.intended[i]
            result.append(
                Answer(
                    at, kind, latency, record.done[i] - self.written[i],
                    record.sent[i] - record.intended[i],
                )
            )  # fmt: skip
        return result


# -- figures and the judge (pure) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """One window of the run (a phase, or the end of the recovery phase)."""

    name: str
    offered_rps: float
    seconds: float
    requests: int
    counts: dict[str, int]
    goodput_rps: float  # 200s per second
    accepted_p50_ms: float  # requests not rejected (lost ones count as infinitely slow)
    accepted_p99_ms: float
    rejection_p99_ms: float  # from the write to the 503
    send_lag_p99_ms: float  # the generator's own lateness
    rss_mb: float = math.nan
    server_cores: float = math.nan  # the server's CPU use over the window (1.0 = one core)


def figures(
    answers: Sequence[Answer], name: str, start: float, end: float, offered: float
) -> Figures:
    window = [a for a in answers if start <= a.at < end]
    counts = Counter(a.kind for a in window)
    accepted = Latency.of(a.latency for a in window if a.kind not in REJECTIONS)
    rejected = Latency.of(a.server for a in window if a.kind in REJECTIONS)
    lag = Latency.of(a.lag for a in window)
    return Figures(
        name, offered, end - start, len(window), dict(counts), counts[GOOD] / (end - start),
        accepted.p50, accepted.p99, rejected.p99, lag.p99,
    )  # fmt: skip


def rejected(f: Figures) -> int:
    return sum(f.counts.get(kind, 0) for kind in REJECTIONS)


def judge_answers(windows: Sequence[Figures]) -> list[str]:
    """Behaviour in every phase: nothing accepted is lost, no 500, no wrong
    answer, and the 503s are carpool's own."""
    failures = []
    for f in windows:
        for kind, what in ((LOST, "accepted requests lost (reset, EOF or no answer)"),
                           ("status 500", "answers 500"), (WRONG_ANSWER, "wrong answers")):  # fmt: skip
            if f.counts.get(kind):
                failures.append(f"{f.name}: {f.counts[kind]} {what}")
        expected = ("status 500", DEADLINE)
        odd = {k: v for k, v in f.counts.items() if k.startswith("status ") and k not in expected}
        if odd:
            failures.append(f"{f.name}: unexpected answers {odd}")
    total = sum(rejected(f) for f in windows)
    ours = sum(f.counts.get(OURS, 0) for f in windows)
    if total and ours < OURS_SHARE * total:
        bare = sum(f.counts.get(BARE, 0) for f in windows)
        failures.append(
            f"only {ours} of {total} rejections were carpool's JSON 503 + Retry-After "
            f"({bare} uvicorn bare 503s)"
        )
    return failures


def judge_overload(base: Figures, ten: Figures, bound_ms: float) -> tuple[list[str], list[str]]:
    """R3: (behaviour failures, speed failures) of the 10x phase against 1x."""
    failures, speed = [], []
    if not ten.counts.get(OURS):
        failures.append("nothing was rejected at 10x: the server was not overloaded")
    if ten.rss_mb > RSS_GROWTH * base.rss_mb:
        failures.append(f"RSS {ten.rss_mb:.0f} MB at the end of 10x, {base.rss_mb:.0f} after 1x")
    if ten.goodput_rps < GOODPUT_RATIO * base.goodput_rps:
        speed.append(
            f"goodput at 10x {ten.goodput_rps:.0f}/s < {GOODPUT_RATIO} x {base.goodput_rps:.0f}/s"
        )
    if not ten.accepted_p99_ms <= P99_RATIO * base.accepted_p99_ms:
        speed.append(
            f"p99 at 10x {ten.accepted_p99_ms:.1f} ms > {P99_RATIO} x "
            f"{base.accepted_p99_ms:.1f} ms at 1x"
        )
    if not ten.accepted_p99_ms <= bound_ms:
        speed.append(
            f"p99 at 10x {ten.accepted_p99_ms:.1f} ms > {bound_ms:.1f} ms "
            "(max queue wait + one batch)"
        )
    if not ten.rejection_p99_ms <= REJECTION_P99_MS:
        speed.append(f"rejection p99 {ten.rejection_p99_ms:.1f} ms > {REJECTION_P99_MS:g} ms")
    return failures, speed


def judge_recovery(
    base: Figures, after: Figures, depths: Sequence[float], caps: Sequence[float], max_batch: int
) -> tuple[list[str], list[str]]:
    """R4: (behaviour, speed) failures of the recovery phase after its window."""
    failures, speed = [], []
    if not after.requests or not depths:
        failures.append("nothing measured after the recovery window (run longer phases)")
    if any(math.isnan(value) for value in (*depths, *caps)):
        failures.append("/metrics gave no queue depth or batch cap after the recovery window")
    if rejected(after):
        failures.append(f"{rejected(after)} rejections after the recovery window")
    # The queue has drained: by the end it holds no more than a batch. That
    # every sample does is a speed figure: a stall of the server's core for a
    # few batch times (a shared machine) leaves a deeper queue for a moment.
    if depths and depths[-1] > max_batch:
        failures.append(f"queue depth {depths[-1]:g} > max_batch_size {max_batch} at the end")
    if any(depth > max_batch for depth in depths):
        speed.append(f"queue depth {max(depths):g} > max_batch_size {max_batch} after recovery")
    if any(cap < max_batch for cap in caps):
        failures.append(f"batch cap stuck at {min(caps):g} < max_batch_size {max_batch}")
    if not after.accepted_p99_ms <= RECOVERY_P99_RATIO * base.accepted_p99_ms:
        speed.append(
            f"p99 after recovery {after.accepted_p99_ms:.1f} ms > {RECOVERY_P99_RATIO} x "
            f"{base.accepted_p99_ms:.1f} ms at 1x"
        )
    return failures, speed


@dataclass(frozen=True, slots=True)
class Probe:
    at: float
    path: str
    status: int  # 0: no answer
    ms: float


def judge_health(probes: Sequence[Probe]) -> tuple[list[str], list[str]]:
    """R5: live answers 200 to every probe, fast; ready never fails."""
    failures, speed = [], []
    live = [p for p in probes if p.path.endswith("live")]
    ready = [p for p in probes if p.path.endswith("ready")]
    if not live or not ready:
        failures.append("no health probes were made")
    bad_live = [p for p in live if p.status != 200]
    bad_ready = [p for p in ready if p.status != 200]
    if bad_live:
        failures.append(f"live failed {len(bad_live)} of {len(live)} probes: {bad_live[:3]}")
    if bad_ready:
        failures.append(f"ready failed {len(bad_ready)} of {len(ready)} probes: {bad_ready[:3]}")
    p99 = Latency.of(p.ms / 1000 for p in live).p99
    if not p99 < LIVE_P99_MS:
        speed.append(f"live probe p99 {p99:.1f} ms >= {LIVE_P99_MS:g} ms")
    return failures, speed


@dataclass
class Verdict:
    model: str
    capacity_rps: float  # M: the queue kept full
    c_rps: float  # C: sustainable at the SLO
    calibration: list[Figures]
    phases: list[Figures]
    recovery: Figures
    recovery_window_s: float
    p99_bound_ms: float
    recovery_depths: list[tuple[float, float]]  # (seconds into the run, queue depth)
    live_p99_ms: float
    probes: int
    failures: list[str] = field(default_factory=list)
    speed_failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures and not self.speed_failures


# -- running it -------------------------------------------------------------------


def repository(served: Served) -> Path:
    """A temporary model repository holding the one model, with our bounds."""
    folder = Path(tempfile.mkdtemp(prefix="carpool-overload-"))
    bounds = {
        "max_batch_size": served.max_batch_size,
        "max_queue": served.max_queue,
        "queue_timeout_ms": served.queue_timeout_ms,
        "max_wait_ms": 2.0,
    }
    if served.model == "slow":
        sys.path.insert(0, str(ROOT))
        from tests.fakes import model_dir

        model_dir(folder, "slow", **bounds, options={"sleep_ms": served.sleep_ms})
        return folder
    text = (ROOT / "weights" / served.model / "model.toml").read_text()
    text = re.sub(rf"(?m)^({'|'.join(bounds)})\s*=.*\n", "", text)
    lines = "".join(f"{key} = {value!r}\n" for key, value in bounds.items())
    text = re.sub(r"(?m)^(kind = .*\n)", lambda m: m.group(1) + lines, text, count=1)
    (folder / served.model).mkdir()
    (folder / served.model / "model.toml").write_text(text)
    return folder


def _two_cores() -> bool:
    return (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")


@contextlib.contextmanager
def pinned(core: int) -> Iterator[None]:
    """Run this thread (the generator's event loop) on ``core`` for a while."""
    if not _two_cores():
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def start_server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "server", "serve", "--host", require_loopback(HOST),
        "--port", str(port), "--models", str(folder), "--torch-threads", "1",
    ]  # fmt: skip
    if _two_cores() and shutil.which("taskset"):
        command = ["taskset", "-c", str(SERVER_CORE), *command]  # taskset execs: same PID
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    # The log goes to a file: a pipe nobody reads fills up and blocks the server.
    with (folder / "server.log").open("w") as sink:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=sink)


async def wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    give_up = time.monotonic() + 180
    while time.monotonic() < give_up and process.poll() is None:
        with contextlib.suppress(OSError, TimeoutError):
            if (await fetch(HOST, port, "GET", "/v2/health/ready", timeout=2))[0] == 200:
                return
        await asyncio.sleep(0.2)
    tail = log.read_text()[-3000:]  # noqa: ASYNC240  (once, on the way out)
    raise RuntimeError("the server did not become ready:\n" + tail)


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    return math.nan


@dataclass(frozen=True, slots=True)
class Sample:
    """/metrics and RSS at one moment."""

    at: float
    rss_mb: float
    cpu_s: float
    depth: float
    cap: float
    compute_sum: float
    compute_count: float


async def sample(port: int, pid: int, model: str, at: float) -> Sample:
    def value(samples: dict[Any, float], name: str) -> float:
        return samples.get((name, frozenset({("model", model)})), math.nan)

    try:
        _, text = await fetch(HOST, port, "GET", "/metrics", timeout=5)
        samples = parse(text.decode())
    except (OSError, TimeoutError):
        samples = {}
    return Sample(
        at, rss_mb(pid), procs.cpu_seconds(pid), value(samples, "carpool_queue_depth"),
        value(samples, "carpool_batch_cap"), value(samples, "carpool_compute_seconds_sum"),
        value(samples, "carpool_compute_seconds_count"),
    )  # fmt: skip


async def watch(
    port: int, pid: int, model: str, probes: list[Probe], samples: list[Sample]
) -> None:
    """Every second: probe live and ready (a fresh connection each, as an
    orchestrator's probe), then sample /metrics and RSS. Runs until cancelled."""
    while True:
        tick = time.perf_counter()
        for path in ("/v2/health/live", "/v2/health/ready"):
            began = time.perf_counter()
            try:
                status, _ = await fetch(HOST, port, "GET", path, timeout=2)
            except (OSError, TimeoutError):
                status = 0
            probes.append(Probe(began, path, status, (time.perf_counter() - began) * 1000))
        samples.append(await sample(port, pid, model, time.perf_counter()))
        await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - tick)))


async def capacity(port: int, work: Workload, served: Served) -> float:
    """M: items/s with two batches' worth of requests always outstanding."""
    count = 20 * served.max_batch_size
    pool = RecordingPool(port, work, count, 2 * served.max_batch_size)
    start = await run_pool(pool, [0.0] * count)
    record = pool.recorder
    done = [d for d, o in zip(record.done, record.outcome, strict=True) if o == OK]
    if len(done) < count // 2:
        raise RuntimeError(f"calibration failed: {len(done)} of {count} answered: {record.reasons}")
    return len(done) / (max(done) - start)


async def run_schedule(
    port: int, work: Workload, schedule: list[float]
) -> tuple[RecordingPool, float]:
    pool = RecordingPool(port, work, len(schedule), 1024)
    return pool, await run_pool(pool, schedule)


async def calibrate(
    port: int, work: Workload, served: Served, step_seconds: float, seed: int
) -> tuple[float, float, list[Figures]]:
    """(M, C, the steps): C is the last step that rejected at most 0.1 %,
    lost nothing and kept p99 within the SLO."""
    top = await capacity(port, work, served)
    steps, c = [], 0.0
    for i, fraction in enumerate(STEPS):
        rate = fraction * top
        schedule = poisson_schedule(rate, step_seconds, seed + 100 + i)
        pool, _ = await run_schedule(port, work, schedule)
        step = figures(pool.answers(schedule), f"{fraction:.1f} M", 0, step_seconds, rate)
        steps.append(step)
        clean = not judge_answers([step]) and rejected(step) <= STEP_REJECTIONS * step.requests
        if not (clean and step.accepted_p99_ms <= served.slo_ms):
            break
        c = rate
        await asyncio.sleep(0.5)  # let the queue empty between steps
    if not c:
        raise RuntimeError(f"no calibration step met the SLO: {[asdict(s) for s in steps]}")
    return top, c, steps


def _at(samples: Sequence[Sample], t: float) -> Sample:
    """The last sample taken by ``t`` (the first one if none was)."""
    before = [s for s in samples if s.at <= t]
    return before[-1] if before else samples[0]


async def overload(
    model: str = "slow", phase_seconds: float = 120.0, step_seconds: float = 10.0, seed: int = 0
) -> Verdict:
    served = MODELS[model]
    work = workload(served)
    folder = repository(served)
    port = free_port()
    process = start_server(folder, port)
    try:
        with pinned(CLIENT_CORE):
            await wait_ready(process, port, folder / "server.log")
            top, c, steps = await calibrate(port, work, served, step_seconds, seed)
            await asyncio.sleep(1.0)
            plan = [("1x", 1.0), ("2x", 2.0), ("10x", 10.0), ("0.5x", 0.5)]
            schedule: list[float] = []
            for i, (_, multiple) in enumerate(plan):
                times = poisson_schedule(multiple * c, phase_seconds, seed + i)
                schedule += [i * phase_seconds + t for t in times]
            probes: list[Probe] = []
            samples: list[Sample] = []
            watching = asyncio.create_task(watch(port, process.pid, served.model, probes, samples))
            try:
                pool, start = await run_schedule(port, work, schedule)
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
            samples.append(await sample(port, process.pid, served.model, time.perf_counter()))
            alive = process.poll() is None
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    samples = [
        Sample(s.at - start, s.rss_mb, s.cpu_s, s.depth, s.cap, s.compute_sum, s.compute_count)
        for s in samples
    ]
    probes = [Probe(p.at - start, p.path, p.status, p.ms) for p in probes]
    answers = pool.answers(schedule)
    phases = []
    for i, (name, multiple) in enumerate(plan):
        begin, end = i * phase_seconds, (i + 1) * phase_seconds
        f = figures(answers, name, begin, end, multiple * c)
        first, last = _at(samples, begin), _at(samples, end)
        cores = (last.cpu_s - first.cpu_s) / max(last.at - first.at, 1e-9)
        phases.append(Figures(**{**asdict(f), "rss_mb": last.rss_mb, "server_cores": cores}))
    base, ten = phases[0], phases[2]
    recovery_start = 3 * phase_seconds
    window = min(RECOVERY_LIMIT_S, 2 * served.queue_timeout_ms / 1000)
    after = figures(
        answers, "0.5x after window", recovery_start + window, 4 * phase_seconds, 0.5 * c
    )
    late = [s for s in samples if s.at >= recovery_start + window]
    first, last = _at(samples, 2 * phase_seconds), _at(samples, 3 * phase_seconds)
    batches = last.compute_count - first.compute_count
    batch_ms = (last.compute_sum - first.compute_sum) / batches * 1000 if batches else math.nan
    bound = served.queue_timeout_ms + batch_ms + HTTP_SLACK_MS
    failures = judge_answers(phases)
    speed: list[str] = []
    for judged in (
        judge_overload(base, ten, bound),
        judge_recovery(base, after, [s.depth for s in late], [s.cap for s in late],
                       served.max_batch_size),
        judge_health(probes),
    ):  # fmt: skip
        failures += judged[0]
        speed += judged[1]
    if not alive:
        failures.append(f"the server (PID {process.pid}) died: {process.returncode}")
    live = Latency.of(p.ms / 1000 for p in probes if p.path.endswith("live"))
    return Verdict(
        served.model, top, c, steps, phases, after, window, bound,
        [(round(s.at, 1), s.depth) for s in late], live.p99, len(probes),
        failures, speed,
    )  # fmt: skip


def table(verdict: Verdict) -> str:
    """The human summary: one row per calibration step, phase and the recovery."""
    columns = ("offered/s", "sent", "200", "ours 503", "bare", "504", "lost", "500",
               "goodput/s", "p99 acc", "p99 rej", "lag p99", "cores", "RSS MB")  # fmt: skip
    rows = [f"{'phase':<18}" + "".join(f"{name:>10}" for name in columns)]
    for f in [*verdict.calibration, *verdict.phases, verdict.recovery]:
        c = f.counts
        cells = (
            f"{f.offered_rps:.0f}", f.requests, c.get(GOOD, 0), c.get(OURS, 0), c.get(BARE, 0),
            c.get(DEADLINE, 0), c.get(LOST, 0), c.get("status 500", 0), f"{f.goodput_rps:.0f}",
            fmt_ms(f.accepted_p99_ms), fmt_ms(f.rejection_p99_ms), fmt_ms(f.send_lag_p99_ms),
            "-" if math.isnan(f.server_cores) else f"{f.server_cores:.2f}",
            "-" if math.isnan(f.rss_mb) else f"{f.rss_mb:.0f}",
        )  # fmt: skip
        rows.append(f"{f.name:<18}" + "".join(f"{cell:>10}" for cell in cells))
    rows.append(
        f"M {verdict.capacity_rps:.0f}/s, C {verdict.c_rps:.0f}/s; p99 bound at 10x "
        f"{verdict.p99_bound_ms:.0f} ms; live p99 {verdict.live_p99_ms:.1f} ms over "
        f"{verdict.probes} probes; recovery window {verdict.recovery_window_s:g} s"
    )
    for failure in verdict.failures + verdict.speed_failures:
        rows.append(f"FAIL: {failure}")
    rows.append("PASS" if verdict.passed else "FAILED")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overload", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="slow")
    parser.add_argument("--phase-seconds", type=float, default=120.0)
    parser.add_argument("--step-seconds", type=float, default=10.0, help="per calibration step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        verdict = runner.run(overload(args.model, args.phase_seconds, args.step_seconds, args.seed))
    print(json.dumps(_finite({**asdict(verdict), "passed": verdict.passed}), indent=2))
    print(table(verdict))
    sys.exit(0 if verdict.passed else 1)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null: strict JSON (RFC 8259)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: a cheaper event loop for the generator."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


if __name__ == "__main__":
    main()
