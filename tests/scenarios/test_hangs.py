"""A forward pass that hangs is given up on (RELIABILITY R15's watchdog,
tier I): its callers get 504 model_hung, the model reports not ready while
the hung thread is still running, and a fresh thread serves everyone else."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from server.settings import Settings
from tests.fakes import infer_body, model_dir, recorder, wait_until
from tests.servers import in_thread, scrape

HANG = 13.0


async def test_a_hung_forward_gets_504_marks_the_model_unready_and_the_rest_is_served(
    tmp_path: Path,
) -> None:
    model_dir(tmp_path, "stuck", max_batch_size=4, hang_timeout_ms=300, options={"hang_at": HANG})
    record = recorder("stuck")
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                hung = await client.post("/v2/models/stuck/infer", json=infer_body([HANG]))
                assert hung.status_code == 504
                assert hung.json()["reason"] == "model_hung"
                # the hung thread still runs: not ready, but live, and served
                assert (await client.get("/v2/health/ready")).status_code == 503
                assert (await client.get("/v2/models/stuck/ready")).status_code == 503
                assert (await client.get("/v2/health/live")).status_code == 200
                answers = await asyncio.gather(
                    *(
                        client.post("/v2/models/stuck/infer", json=infer_body([i]))
                        for i in range(20, 70)
                    )
                )
                assert [a.json()["outputs"][0]["data"] for a in answers] == [
                    [2 * i] for i in range(20, 70)
                ]
                metrics = scrape((await client.get("/metrics")).text)
                assert metrics['carpool_hung_forwards_total{model="stuck"}'] == 1
                assert metrics['carpool_hung_forwards_running{model="stuck"}'] == 1
                assert metrics['carpool_batcher_loop_restarts_total{model="stuck"}'] == 1

                record.release.set()  # the hung forward returns after all: ready again

                async def ready() -> bool:
                    return (await client.get("/v2/health/ready")).status_code == 200

                for _ in range(100):
                    if await ready():
                        break
                    await asyncio.sleep(0.05)
                assert await ready()
                metrics = scrape((await client.get("/metrics")).text)
                assert metrics['carpool_hung_forwards_running{model="stuck"}'] == 0
        finally:
            record.release.set()
    assert HANG in record.computed  # it did start: the watchdog gave up on a real run


async def test_no_hang_limit_waits_as_long_as_the_forward_takes(tmp_path: Path) -> None:
    model_dir(tmp_path, "patient", hang_timeout_ms=0, options={"hang_at": HANG})
    record = recorder("patient")
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                slow = asyncio.create_task(
                    client.post("/v2/models/patient/infer", json=infer_body([HANG]))
                )
                await wait_until(lambda: HANG in record.computed)
                await asyncio.sleep(0.5)
                assert not slow.done()
                record.release.set()
                assert (await slow).json()["outputs"][0]["data"] == [2 * HANG]
        finally:
            record.release.set()
