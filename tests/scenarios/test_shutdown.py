"""SIGTERM drains: readiness fails, new requests get 503, every accepted
request is answered, then the process exits 0 (RELIABILITY R8)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from tests.fakes import infer_body, model_dir, wait_until
from tests.servers import Child, scrape, subprocess_server

REQUESTS = 200
BATCH, BATCH_SECONDS = 8, 0.2  # the scenario's slow model: 200 ms a batch of 8


def _slow_server(tmp_path: Path, drain_delay: float, drain_timeout: float) -> dict[str, str]:
    model_dir(
        tmp_path,
        "slow",
        max_batch_size=BATCH,
        max_queue=256,
        max_wait_ms=5,
        queue_timeout_ms=60_000,  # the last of 200 waits ~5 s: over the default on a busy machine
        options={"sleep_ms": BATCH_SECONDS * 1000},
    )
    return {
        "CARPOOL_DRAIN_DELAY": str(drain_delay),
        "CARPOOL_DRAIN_TIMEOUT": str(drain_timeout),
        "CARPOOL_TORCH_THREADS": "1",
    }


async def _accept_all(
    child: Child, client: httpx.AsyncClient
) -> list[asyncio.Task[httpx.Response]]:
    """REQUESTS requests sent and every one of them accepted (queued, running or done)."""

    def accepted() -> bool:
        m = scrape(httpx.get(child.url + "/metrics").text)
        waiting = m['carpool_queue_depth{model="slow"}'] + m['carpool_in_flight{model="slow"}']
        return waiting + m['carpool_items_total{model="slow"}'] >= REQUESTS

    requests = [
        asyncio.create_task(client.post("/v2/models/slow/infer", json=infer_body([i])))
        for i in range(REQUESTS)
    ]
    await wait_until(accepted)
    return requests


async def test_sigterm_answers_every_accepted_request_and_refuses_new_ones(tmp_path: Path) -> None:
    env = _slow_server(tmp_path, drain_delay=0.5, drain_timeout=60)
    with subprocess_server(["--models", str(tmp_path)], env=env) as child:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=child.url, timeout=120, limits=limits) as client:
            requests = await _accept_all(child, client)
            child.signal(signal.SIGTERM)
            signalled = time.monotonic()

            await wait_until(lambda: httpx.get(child.url + "/v2/health/ready").status_code == 503)
            assert time.monotonic() - signalled <= 1.0  # readiness fails within 1 s
            # During the drain delay requests are still served; after it new
            # requests are refused with 503 (or the listener is gone): never a hang.
            while True:
                try:
                    late = await client.post("/v2/models/slow/infer", json=infer_body([-5]))
                except httpx.TransportError:
                    break
                if late.status_code == 503:
                    assert late.json()["reason"] == "shutting_down"
                    assert "retry-after" in late.headers
                    break
                assert late.status_code == 200
            answers = await asyncio.gather(*requests)
        assert [r.status_code for r in answers] == [200] * REQUESTS
        assert [r.json()["outputs"][0]["data"] for r in answers] == [
            [2 * i] for i in range(REQUESTS)
        ]
        assert await asyncio.to_thread(child.process.wait, 60) == 0
        # R8: exit within queue_len x batch_time + 2 s (+ the drain delay)
        bound = REQUESTS / BATCH * BATCH_SECONDS + 2 + 0.5
        assert time.monotonic() - signalled <= bound


async def test_a_drain_deadline_shorter_than_the_queue_answers_the_rest_503(tmp_path: Path) -> None:
    """A forced drain deadline D: what has not run by D gets 503 shutting_down,
    with no reset and no client timeout, and the process still exits 0."""
    env = _slow_server(tmp_path, drain_delay=0, drain_timeout=1)
    with subprocess_server(["--models", str(tmp_path)], env=env) as child:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=child.url, timeout=60, limits=limits) as client:
            requests = await _accept_all(child, client)
            child.signal(signal.SIGTERM)
            answers = await asyncio.gather(*requests, return_exceptions=True)
        assert [a for a in answers if not isinstance(a, httpx.Response)] == []  # 0 resets/timeouts
        done = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 200]
        refused = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 503]
        assert len(done) + len(refused) == REQUESTS
        assert done
        assert refused  # 1 s of 200 ms batches cannot finish 25 batches
        assert {r.json()["reason"] for r in refused} == {"shutting_down"}
        assert all("retry-after" in r.headers for r in refused)
        for i, answer in enumerate(answers):
            assert isinstance(answer, httpx.Response)
            if answer.status_code == 200:
                assert answer.json()["outputs"][0]["data"] == [2 * i]
        assert await asyncio.to_thread(child.process.wait, 60) == 0
