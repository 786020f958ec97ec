"""A failing input is isolated, not its whole batch (RELIABILITY R12-R14):
the batch is split until the failing items run alone."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import pytest

from server.settings import Settings
from tests.fakes import infer_body, model_dir, recorder, wait_until
from tests.servers import Running, in_thread, scrape

POISON = 13.0


async def one_batch(running: Running, name: str, xs: list[float]) -> list[httpx.Response]:
    """Send each x as its own request so that all of them ride in one batch:
    a held request keeps the worker busy while they queue."""
    record = recorder(name)
    record.entered.clear()
    record.gate.clear()
    async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
        held = asyncio.create_task(client.post(f"/v2/models/{name}/infer", json=infer_body([0.5])))
        await wait_until(record.entered.is_set)
        tasks = [
            asyncio.create_task(client.post(f"/v2/models/{name}/infer", json=infer_body([x])))
            for x in xs
        ]
        depth = f'carpool_queue_depth{{model="{name}"}}'
        await wait_until(lambda: scrape(httpx.get(running.url + "/metrics").text)[depth] >= len(xs))
        record.gate.set()
        assert (await held).status_code == 200
        return [await task for task in tasks]


def figures(running: Running, name: str) -> dict[str, float]:
    text = httpx.get(running.url + "/metrics").text
    return {k.split("{")[0]: v for k, v in scrape(text).items() if f'model="{name}"' in k}


@pytest.mark.parametrize("poisoned", [1, 2, 32])
async def test_poison_items_get_422_and_every_other_item_its_answer(
    tmp_path: Path, poisoned: int
) -> None:
    model_dir(tmp_path, "poison", max_batch_size=32, max_queue=64, options={"poison": POISON})
    xs = [100.0 + i for i in range(32)]
    bad = set(range(0, 32, 32 // poisoned)) if poisoned < 32 else set(range(32))
    for i in bad:
        xs[i] = POISON
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        before = figures(running, "poison")
        responses = await one_batch(running, "poison", xs)
        after = figures(running, "poison")
        for i, response in enumerate(responses):
            if i in bad:
                assert response.status_code == 422
                body = response.json()
                assert "poison value" in body["error"]
                assert "Traceback" not in body["error"]
                assert body["reason"] == "model_error"
            else:
                assert response.status_code == 200
                assert response.json()["outputs"][0]["data"] == [2 * xs[i]]
        assert after["carpool_isolated_items_total"] - before[
            "carpool_isolated_items_total"
        ] == len(bad)
        extra = after["carpool_forward_calls_total"] - before["carpool_forward_calls_total"] - 2
        assert extra <= 2 * len(bad) * math.ceil(math.log2(32))
        # the loop keeps serving normally afterwards
        async with httpx.AsyncClient(base_url=running.url) as client:
            ok = await client.post("/v2/models/poison/infer", json=infer_body([1.0, 2.0]))
        assert ok.json()["outputs"][0]["data"] == [2.0, 4.0]


async def test_a_batch_that_fails_once_is_retried_in_halves_and_everyone_is_answered(
    tmp_path: Path,
) -> None:
    model_dir(
        tmp_path,
        "flaky",
        max_batch_size=8,
        max_queue=16,
        options={"oom_above": 100, "fail_once": True},
    )
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        responses = await one_batch(running, "flaky", [float(i) for i in range(8)])
        assert [r.status_code for r in responses] == [200] * 8
        assert figures(running, "flaky")["carpool_transient_errors_total"] == 1


async def test_out_of_memory_splits_the_batch_and_then_caps_its_size(tmp_path: Path) -> None:
    model_dir(tmp_path, "oom", max_batch_size=32, max_queue=64, options={"oom_above": 8})
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        before = figures(running, "oom")
        responses = await one_batch(running, "oom", [float(i) for i in range(32)])
        assert [r.status_code for r in responses] == [200] * 32
        assert [r.json()["outputs"][0]["data"] for r in responses] == [[2.0 * i] for i in range(32)]
        after = figures(running, "oom")
        # the held batch of 1, then 32 x, 16 x (twice), 8 ok (four times)
        assert after["carpool_forward_calls_total"] - before["carpool_forward_calls_total"] == 1 + 7
        assert max(len(batch) for batch in recorder("oom").batches) == 32
        recorder("oom").batches.clear()
        again = await one_batch(running, "oom", [float(i) for i in range(32)])
        assert [r.status_code for r in again] == [200] * 32
        assert max(len(batch) for batch in recorder("oom").batches) <= 8  # capped: no new OOM


def test_an_item_that_does_not_fit_even_alone_gets_507(tmp_path: Path) -> None:
    model_dir(tmp_path, "tiny", max_batch_size=4, options={"oom_above": 0})
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        response = httpx.post(running.url + "/v2/models/tiny/infer", json=infer_body([1.0]))
        assert response.status_code == 507
        assert response.json()["reason"] == "insufficient_resources"
        assert httpx.get(running.url + "/v2/health/live").status_code == 200


async def test_a_model_returning_too_few_results_fails_its_batch_and_the_loop_keeps_serving(
    tmp_path: Path,
) -> None:
    model_dir(tmp_path, "short", max_batch_size=8, options={"drop_one_at": 7.0})
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            bad = await client.post("/v2/models/short/infer", json=infer_body([7.0, 1.0]))
            assert bad.status_code == 500
            assert "returned 1 results for a batch of 2" in bad.json()["error"]
            follow = await asyncio.gather(
                *(
                    client.post("/v2/models/short/infer", json=infer_body([1000.0 + i]))
                    for i in range(200)
                )
            )
        assert [r.status_code for r in follow] == [200] * 200
        assert figures(running, "short")["carpool_batcher_loop_errors_total"] == 0
