"""SIGTERM drains: readiness fails, new requests get 503, every accepted
request is answered, then the process exits 0 (RELIABILITY R8)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx

from tests.fakes import infer_body, model_dir, wait_until
from tests.servers import scrape, subprocess_server


async def test_sigterm_answers_every_accepted_request_and_refuses_new_ones(tmp_path: Path) -> None:
    model_dir(tmp_path, "slow", max_batch_size=8, max_queue=256, options={"sleep_ms": 100})
    env = {
        "CARPOOL_DRAIN_DELAY": "0.5",
        "CARPOOL_DRAIN_TIMEOUT": "60",
        "CARPOOL_TORCH_THREADS": "1",
    }
    with subprocess_server(["--models", str(tmp_path)], env=env) as child:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=child.url, timeout=120, limits=limits) as client:

            def accepted() -> bool:
                m = scrape(httpx.get(child.url + "/metrics").text)
                waiting = (
                    m['carpool_queue_depth{model="slow"}'] + m['carpool_in_flight{model="slow"}']
                )
                return waiting + m['carpool_items_total{model="slow"}'] >= 200

            requests = [
                asyncio.create_task(client.post("/v2/models/slow/infer", json=infer_body([i])))
                for i in range(200)
            ]
            await wait_until(accepted)
            child.signal(signal.SIGTERM)

            await wait_until(lambda: httpx.get(child.url + "/v2/health/ready").status_code == 503)
            # After the drain delay, new requests are refused with 503 (or the
            # listener is gone): never a hang.
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
        assert [r.status_code for r in answers] == [200] * 200
        assert [r.json()["outputs"][0]["data"] for r in answers] == [[2 * i] for i in range(200)]
        assert await asyncio.to_thread(child.process.wait, 60) == 0
