"""Deadlines are honoured before compute; a caller that leaves is never
computed (RELIABILITY R2, R7)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path

import httpx
import orjson
import pytest

from server.errors import BadRequest
from server.repository import ModelConfig, TensorSpec
from server.request import queue_timeout
from server.settings import Settings
from tests.fakes import infer_body, model_dir, recorder, wait_until
from tests.servers import in_thread, scrape

CONFIG = ModelConfig(
    name="m",
    kind="custom",
    folder=Path("."),
    inputs=(TensorSpec("x", "FP32", (-1, 1)),),
    outputs=(TensorSpec("y", "FP32", (-1, 1)),),
    queue_timeout_ms=100.0,
)


def test_a_request_may_shorten_the_queue_timeout_but_never_lengthen_it() -> None:
    assert queue_timeout(CONFIG, {}, None) == pytest.approx(0.1)
    assert queue_timeout(CONFIG, {}, 50) == pytest.approx(0.05)
    assert queue_timeout(CONFIG, {}, 60_000) == pytest.approx(0.1)
    assert queue_timeout(CONFIG, {"timeout": 20_000}, None) == pytest.approx(0.02)
    assert queue_timeout(CONFIG, {"timeout": 10**9}, 80) == pytest.approx(0.08)


@pytest.mark.parametrize(
    ("parameters", "header"), [({"timeout": 0}, None), ({"timeout": "1"}, None), ({}, -5)]
)
def test_a_bad_timeout_is_a_400(parameters: dict[str, object], header: int | None) -> None:
    with pytest.raises(BadRequest):
        queue_timeout(CONFIG, parameters, header)


async def test_requests_whose_deadline_passes_in_the_queue_get_504_and_are_never_computed(
    tmp_path: Path,
) -> None:
    model_dir(tmp_path, "gated", max_batch_size=4, max_queue=16, queue_timeout_ms=100)
    record = recorder("gated")
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        record.gate.clear()
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
                held = asyncio.create_task(
                    client.post("/v2/models/gated/infer", json=infer_body([1]))
                )
                await wait_until(record.entered.is_set)

                async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
                    sent = time.monotonic()
                    response = await request
                    return response, time.monotonic() - sent

                posts = [
                    client.post("/v2/models/gated/infer", json=infer_body([2])),
                    # a header may shorten the model's 100 ms to 50 ms
                    client.post(
                        "/v2/models/gated/infer",
                        json=infer_body([5]),
                        headers={"x-carpool-timeout-ms": "50"},
                    ),
                    # a header asking for a minute is clamped to the model's 100 ms
                    client.post(
                        "/v2/models/gated/infer",
                        json=infer_body([3]),
                        headers={"x-carpool-timeout-ms": "60000"},
                    ),
                    # the v2 parameter, in microseconds (Triton's unit): 30 ms
                    client.post(
                        "/v2/models/gated/infer",
                        content=orjson.dumps(
                            {**infer_body([4]), "parameters": {"timeout": 30_000}}
                        ),
                    ),
                ]
                # All three are answered while the gate is still closed.
                timings = await asyncio.wait_for(asyncio.gather(*map(timed, posts)), 30)
                expired = [response for response, _ in timings]
                assert [r.status_code for r in expired] == [504] * 4
                assert {r.json()["reason"] for r in expired} == {"deadline_exceeded"}
                # Each is answered at its own deadline: not before it, and not
                # later than a generous margin after it (R2: deadline + 20 ms
                # on a quiet machine; CI machines are not quiet).
                for (_, seconds), deadline in zip(timings, [0.1, 0.05, 0.1, 0.03], strict=True):
                    assert deadline <= seconds < deadline + 0.5
                metrics = scrape((await client.get("/metrics")).text)
                assert metrics['carpool_dropped_items_total{model="gated",reason="deadline"}'] == 4
                record.gate.set()
                assert (await held).status_code == 200
        finally:
            record.gate.set()
    assert record.computed == [1]


async def test_http_clients_that_disconnect_while_queued_are_never_computed(tmp_path: Path) -> None:
    model_dir(tmp_path, "gated", max_batch_size=4, max_queue=128)
    record = recorder("gated")
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        record.gate.clear()
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
                held = asyncio.create_task(
                    client.post("/v2/models/gated/infer", json=infer_body([0]))
                )
                await wait_until(record.entered.is_set)
                keep = [
                    asyncio.create_task(client.post("/v2/models/gated/infer", json=infer_body([i])))
                    for i in range(1, 51)
                ]
                leavers = []
                for i in range(100, 150):
                    _, writer = await asyncio.open_connection("127.0.0.1", running.port)
                    body = orjson.dumps(infer_body([i]))
                    writer.write(
                        b"POST /v2/models/gated/infer HTTP/1.1\r\nhost: x\r\n"
                        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(body), body)
                    )
                    await writer.drain()
                    leavers.append(writer)

                def depth() -> float:
                    return scrape(httpx.get(running.url + "/metrics").text)[
                        'carpool_queue_depth{model="gated"}'
                    ]

                await wait_until(lambda: depth() == 100)
                for writer in leavers:
                    writer.close()
                await wait_until(lambda: depth() == 50)
                metrics = scrape((await client.get("/metrics")).text)
                assert (
                    metrics['carpool_dropped_items_total{model="gated",reason="cancelled"}'] == 50
                )
                assert metrics['carpool_requests_total{model="gated",outcome="cancelled"}'] == 50
                record.gate.set()
                answers = await asyncio.gather(held, *keep)
        finally:
            record.gate.set()
    assert [r.status_code for r in answers] == [200] * 51
    assert sorted(record.computed) == list(range(51))  # none of the 100..149
