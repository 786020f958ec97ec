"""Soak: does a long run leak memory or file descriptors? (RELIABILITY R24)

    python -m bench.soak --requests 100000            # the full soak (minutes)
    python -m bench.soak --requests 3000 --leak-kib 10  # the positive control

Serves a fake model (tests/fakes.py: y = 2x) and the real digits model from a
child ``carpool serve`` on 127.0.0.1, drives a bounded mix of traffic at it
(valid requests of 1-8 items, a quarter of them over WebSocket streams that
are reopened every 200 messages, 1 % invalid bodies, 1 % clients that hang up
while queued) and samples the server's RSS and open file descriptors every
``interval`` seconds.

It fails when, over the second half of the run, the RSS peak stands more than
min(5 % of the mean, 100 MB) above the 5 %-trimmed mean, or the fitted RSS
slope times the duration exceeds 5 % of the mean; or when the open fds or the
event loop's tasks (``carpool_event_loop_tasks``) have not come back to their
baseline (+/- 2) within ``idle`` seconds after the load. ``--leak-kib`` makes
the fake model keep that much memory per item for ever: a detector that
passes that run is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import orjson
from websockets.asyncio.client import connect

from bench.loopback import HOST, require_loopback

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Verdict:
    requests: int
    ok: int
    websocket: int
    invalid: int
    hung_up: int
    errors: int
    samples: int
    rss_mean_mb: float
    rss_peak_over_trimmed_mb: float
    rss_slope_growth_mb: float
    fds_baseline: int
    fds_after: int
    tasks_baseline: int
    tasks_after: int
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def judge_rss(samples: list[float]) -> tuple[float, float, float, list[str]]:
    """(mean, peak over trimmed mean, slope x duration, failures) for the
    second half of RSS samples in bytes, taken at equal intervals."""
    half = samples[len(samples) // 2 :]
    if len(half) < 4:
        return 0.0, 0.0, 0.0, ["too few samples to judge (run longer)"]
    mean = sum(half) / len(half)
    ordered = sorted(half)
    cut = max(1, len(ordered) // 20)
    trimmed = ordered[cut:-cut] or ordered
    trimmed_mean = sum(trimmed) / len(trimmed)
    peak = max(half) - trimmed_mean
    xs = range(len(half))
    x_mean = (len(half) - 1) / 2
    slope = sum((x - x_mean) * (y - mean) for x, y in zip(xs, half, strict=True)) / sum(
        (x - x_mean) ** 2 for x in xs
    )
    growth = slope * (len(half) - 1)
    failures = []
    if peak > min(0.05 * mean, 100e6):
        failures.append(f"RSS peak {peak / 1e6:.1f} MB above the trimmed mean")
    if growth > 0.05 * mean:
        failures.append(f"RSS grew {growth / 1e6:.1f} MB over the second half (> 5 % of the mean)")
    return mean, peak, growth, failures


def _rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) * 1024
    return 0.0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _tasks(url: str) -> int:
    found = re.search(r"^carpool_event_loop_tasks (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return int(float(found.group(1))) if found else -1


def _settled(baseline: int, now: int) -> bool:
    return abs(now - baseline) <= 2


def _repository(leak_kib: float) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="carpool-soak-"))
    sys.path.insert(0, str(ROOT))
    from tests.fakes import model_dir

    model_dir(folder, "echo", max_batch_size=32, max_queue=1024, options={"leak_kib": leak_kib})
    shutil.copytree(ROOT / "weights" / "digits", folder / "digits")
    return folder


async def _drive(url: str, requests: int, concurrency: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    counts = {"ok": 0, "websocket": 0, "invalid": 0, "hung_up": 0, "errors": 0}
    remaining = iter(range(requests))
    port = int(url.rsplit(":", 1)[1])

    async def streamer() -> None:
        """Echo requests over a stream, one in flight, reconnecting every 200."""
        while True:
            async with connect(f"ws://{HOST}:{port}/v2/models/echo/stream") as stream:
                for _ in range(200):
                    i = next(remaining, None)
                    if i is None:
                        return
                    xs = [float(i + k) for k in range(rng.randint(1, 8))]
                    await stream.send(orjson.dumps({"id": str(i), **_echo(xs)}).decode())
                    answer = orjson.loads(await stream.recv())
                    good = answer.get("id") == str(i) and answer["outputs"][0]["data"] == [
                        2 * x for x in xs
                    ]
                    counts["ok" if good else "errors"] += 1
                    counts["websocket"] += 1

    async def worker(client: httpx.AsyncClient) -> None:
        for i in remaining:
            roll = rng.random()
            if roll < 0.01:
                response = await client.post("/v2/models/echo/infer", content=b"{not json")
                counts["invalid" if response.status_code == 400 else "errors"] += 1
            elif roll < 0.02:
                _, writer = await asyncio.open_connection(HOST, port)
                raw = orjson.dumps(_echo([float(i)]))
                writer.write(
                    b"POST /v2/models/echo/infer HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(raw), raw)
                )
                await writer.drain()
                writer.close()
                counts["hung_up"] += 1
            else:
                n = rng.randint(1, 8)
                if rng.random() < 0.5:
                    response = await client.post(
                        "/v2/models/echo/infer", json=_echo([float(i + k) for k in range(n)])
                    )
                    good = response.status_code == 200 and response.json()["outputs"][0][
                        "data"
                    ] == [2.0 * (i + k) for k in range(n)]
                else:
                    pixels = [float(rng.randint(0, 16)) for _ in range(64 * n)]
                    body = {
                        "inputs": [
                            {"name": "pixels", "datatype": "FP32", "shape": [n, 64], "data": pixels}
                        ]
                    }
                    response = await client.post("/v2/models/digits/infer", json=body)
                    good = (
                        response.status_code == 200
                        and len(response.json()["outputs"][1]["data"]) == n
                    )
                counts["ok" if good else "errors"] += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        streams = concurrency // 4
        await asyncio.gather(
            *(worker(client) for _ in range(concurrency - streams)),
            *(streamer() for _ in range(streams)),
        )
    return counts


def _echo(xs: list[float]) -> dict[str, object]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(xs), 1], "data": xs}]}


async def soak(
    requests: int, leak_kib: float, interval: float, idle: float, seed: int = 0
) -> Verdict:
    folder = _repository(leak_kib)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CARPOOL_TORCH_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--host",
        require_loopback(HOST),
        "--port",
        "0",
    ]
    # The server's log goes to a file: a pipe nobody reads fills up and
    # blocks the server.
    log = folder / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(  # noqa: ASYNC220  (started once, before the load)
            [*command, "--models", str(folder)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    try:
        port = 0
        give_up = time.monotonic() + 120
        while not port and process.poll() is None and time.monotonic() < give_up:
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else 0
            await asyncio.sleep(0.1)  # a child's log file: nothing to await
        if not port:
            raise RuntimeError("the server did not start:\n" + log.read_text())
        url = f"http://{HOST}:{port}"
        fds_baseline, tasks_baseline = _fds(process.pid), _tasks(url)
        rss: list[float] = []
        load = asyncio.create_task(_drive(url, requests, 32, seed))
        while not load.done():
            rss.append(_rss(process.pid))
            await asyncio.wait({load}, timeout=interval)
        counts = load.result()
        deadline = time.monotonic() + idle
        fds_after, tasks_after = _fds(process.pid), _tasks(url)
        while time.monotonic() < deadline:
            fds_after, tasks_after = _fds(process.pid), _tasks(url)
            if _settled(fds_baseline, fds_after) and _settled(tasks_baseline, tasks_after):
                break
            await asyncio.sleep(0.5)  # another process's fds and tasks: nothing to await
    finally:
        process.terminate()
        process.wait(60)
        shutil.rmtree(folder, ignore_errors=True)
    mean, peak, growth, failures = judge_rss(rss)
    if not _settled(fds_baseline, fds_after):
        failures.append(f"open fds {fds_after} after the load, {fds_baseline} before")
    if not _settled(tasks_baseline, tasks_after):
        failures.append(f"event loop tasks {tasks_after} after the load, {tasks_baseline} before")
    if counts["errors"]:
        failures.append(f"{counts['errors']} wrong or failed answers")
    return Verdict(
        requests, counts["ok"], counts["websocket"], counts["invalid"], counts["hung_up"],
        counts["errors"], len(rss), mean / 1e6, peak / 1e6, growth / 1e6, fds_baseline, fds_after,
        tasks_baseline, tasks_after, failures,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument(
        "--leak-kib", type=float, default=0.0, help="positive control: leak per item"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument(
        "--idle", type=float, default=60.0, help="seconds allowed for fds and tasks to settle"
    )
    args = parser.parse_args()
    verdict = asyncio.run(soak(args.requests, args.leak_kib, args.interval, args.idle))
    print(json.dumps({**asdict(verdict), "passed": verdict.passed}, indent=2))
    sys.exit(0 if verdict.passed else 1)


if __name__ == "__main__":
    main()
