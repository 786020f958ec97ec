"""Overload: a bounded queue that rejects an exact count, fast and in JSON,
while health keeps answering (RELIABILITY R1, R3-R5, shortened)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.settings import Settings
from tests.fakes import infer_body, model_dir, recorder, wait_until
from tests.servers import Running, in_thread, scrape


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Running]:
    model_dir(tmp_path, "gated", max_batch_size=4, max_queue=8, max_wait_ms=1)
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        yield running
    recorder("gated").gate.set()


async def test_a_full_queue_rejects_exactly_the_requests_beyond_it(gated: Running) -> None:
    record = recorder("gated")
    record.gate.clear()
    async with httpx.AsyncClient(base_url=gated.url, timeout=30) as client:
        before = scrape((await client.get("/metrics")).text)
        held = asyncio.create_task(client.post("/v2/models/gated/infer", json=infer_body([100])))
        await wait_until(record.entered.is_set)
        burst = [
            asyncio.create_task(client.post("/v2/models/gated/infer", json=infer_body([i])))
            for i in range(20)
        ]
        # Rejections come back while the gate is still closed: they do not wait.
        await wait_until(lambda: sum(task.done() for task in burst) >= 12)
        rejected = [task.result() for task in burst if task.done()]
        assert len(rejected) == 12
        for response in rejected:
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["reason"] == "overloaded"
        during = scrape((await client.get("/metrics")).text)
        assert during['carpool_queue_depth{model="gated"}'] == 8
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (
            await client.get("/v2/health/ready")
        ).status_code == 200  # load alone never fails readiness
        record.gate.set()
        answers = {i: await task for i, task in enumerate(burst)}
        answers[100] = await held
        after = scrape((await client.get("/metrics")).text)
    accepted = {x: r for x, r in answers.items() if r.status_code != 503}
    assert len(accepted) == 9  # the held one and the 8 queued
    for x, response in accepted.items():
        assert response.status_code == 200
        assert response.json()["outputs"][0]["data"] == [2 * x]
    assert sorted(record.computed) == sorted(accepted)  # the rejected were never computed
    key = 'carpool_requests_total{model="gated",outcome="overloaded"}'
    assert after[key] - before.get(key, 0.0) == 12


async def test_a_burst_far_over_capacity_gets_one_answer_per_request_and_then_recovers(
    tmp_path: Path,
) -> None:
    model_dir(tmp_path, "slow", max_batch_size=8, max_queue=16, options={"sleep_ms": 20})
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=running.url, timeout=60, limits=limits) as client:
            responses = await asyncio.gather(
                *(client.post("/v2/models/slow/infer", json=infer_body([i])) for i in range(300))
            )
            codes = sorted({r.status_code for r in responses})
            assert set(codes) <= {200, 503}, codes
            assert 0 < sum(r.status_code == 200 for r in responses) < 300
            for x, response in enumerate(responses):
                body = response.json()
                if response.status_code == 503:
                    assert body["reason"] == "overloaded"
                    assert "retry-after" in response.headers
                else:
                    assert body["outputs"][0]["data"] == [2 * x]
            # After the burst: the queue is empty and a normal request is served at once.
            metrics = scrape((await client.get("/metrics")).text)
            assert metrics['carpool_queue_depth{model="slow"}'] == 0
            again = await asyncio.gather(
                *(client.post("/v2/models/slow/infer", json=infer_body([i])) for i in range(8))
            )
            assert [r.status_code for r in again] == [200] * 8
