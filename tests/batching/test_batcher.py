"""The batcher as a whole, specified: how it shuts down, and the promise
that every caller gets exactly one outcome.

``Batcher`` composes the queue (``test_queue.py``), the forward pass
(``test_forward.py``) and the model instances (``test_instance.py``); the
tests here are the ones about all of them at once. Each builds its own fake
model; a ``threading.Event`` gate holds a batch in the worker thread while
the test arranges the queue behind it. Nothing here sleeps to synchronise or
asserts on a duration.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

import pytest

from batching import (
    Batcher,
    BatchFailed,
    BatchPolicy,
    Cancelled,
    Closed,
    Completion,
    DeadlineExceeded,
    Overloaded,
)
from tests.batching.waiting import answered, eventually

# -- shutting down ----------------------------------------------------------


async def test_aclose_drains_queued_items_and_then_refuses_new_ones() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=2, max_wait=60.0, eager=False)
    batcher: Batcher[int, int] = Batcher([double], policy)
    batcher.start()
    try:
        first = asyncio.create_task(batcher.submit_many([0, 1]))
        await eventually(lambda: batcher.stats.in_flight == 2)
        # Five queued items: the last batch is partial and max_wait is a
        # minute, so only draining can run it promptly.
        queued = [asyncio.create_task(batcher.submit(i)) for i in range(2, 7)]
        await eventually(lambda: batcher.stats.queued == 5)
        closing = asyncio.create_task(batcher.aclose(timeout=10))
        await eventually(lambda: not batcher.accepting)
        with pytest.raises(Closed):
            await answered(batcher.submit(98))
        gate.set()
        await asyncio.wait_for(closing, timeout=20)
    finally:
        gate.set()
        await batcher.aclose(timeout=10)
    assert (await answered(first)).results == [0, 2]
    assert await answered(asyncio.gather(*queued)) == [2 * i for i in range(2, 7)]
    assert batches == [[0, 1], [2, 3], [4, 5], [6]]
    with pytest.raises(Closed):
        await answered(batcher.submit(99))
    assert batcher.stats.dropped["closed"] == 2


async def test_aclose_past_its_timeout_fails_queued_and_running_items_with_cancelled() -> None:
    gate = threading.Event()
    finished = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        finished.set()
        return [2 * x for x in items]

    loop = asyncio.get_running_loop()
    policy = BatchPolicy(max_batch_size=2, max_wait=0.001)
    batcher: Batcher[int, int] = Batcher([double], policy)
    batcher.start()
    try:
        running = asyncio.create_task(batcher.submit(0))
        await eventually(lambda: batcher.stats.in_flight == 1)
        queued = [asyncio.create_task(batcher.submit(i)) for i in range(1, 4)]
        await eventually(lambda: batcher.stats.queued == 3)
        await answered(batcher.aclose(timeout=0.1))
        for task in (running, *queued):
            with pytest.raises(Cancelled):
                await answered(task)
        assert batcher.stats.queued == 0
        assert batcher.stats.in_flight == 0
        assert batcher.stats.dropped["closed"] == 3
        assert batcher.stats.loop_restarts == 0  # a cancellation, not a crash
    finally:
        gate.set()
        await batcher.aclose(timeout=10)
        await loop.run_in_executor(None, finished.wait, 10)
    assert batches == [[0]]


async def test_aclose_cancels_again_an_instance_that_swallowed_its_cancellation() -> None:
    # The bug this guards against was ours (wait_for on Python 3.11, in the
    # gatherer): aclose must still end, and count the swallow as a loop error.
    batcher: Batcher[int, int] = Batcher([lambda items: items], BatchPolicy())
    swallowed = 0

    async def stubborn_gather() -> None:
        nonlocal swallowed
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            await never
        except asyncio.CancelledError:
            swallowed += 1
        await asyncio.get_running_loop().create_future()  # the second cancel ends it

    batcher._queue.gather = stubborn_gather  # type: ignore[method-assign]
    batcher.start()
    await asyncio.sleep(0)
    await answered(batcher.aclose(timeout=0))
    assert swallowed == 1
    assert batcher.stats.loop_errors == 1
    assert all(task.done() for task in batcher._tasks)


async def test_stop_accepting_refuses_new_items_while_queued_ones_still_run() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            queued = asyncio.create_task(batcher.submit_many([1, 2]))
            await eventually(lambda: batcher.stats.queued == 2)
            batcher.stop_accepting()
            with pytest.raises(Closed):
                batcher.admit(1)
            with pytest.raises(Closed):
                await answered(batcher.submit(3))
        finally:
            gate.set()
        assert await answered(first) == 0
        assert (await answered(queued)).results == [2, 4]
    assert batches == [[0], [1, 2]]
    assert batcher.stats.dropped["closed"] == 2


# -- the invariant ----------------------------------------------------------


@pytest.mark.parametrize("isolate_errors", [False, True], ids=["whole", "isolated"])
async def test_every_caller_gets_exactly_one_outcome_under_a_random_mix(
    isolate_errors: bool,
) -> None:
    rng = random.Random(20240611)
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        if any(x < 0 for x in items):
            raise ValueError("poisoned batch")
        return [2 * x for x in items]

    submitted = 0

    async def call(items: list[int], deadline: float | None) -> Completion[int]:
        nonlocal submitted
        submitted += len(items)
        return await batcher.submit_many(items, deadline)

    policy = BatchPolicy(
        max_batch_size=8, max_wait=0.001, max_queue=48, eager=False, isolate_errors=isolate_errors
    )
    requests: list[tuple[list[int], float | None, asyncio.Task[Completion[int]]]] = []
    cancelled: set[asyncio.Task[Completion[int]]] = set()
    cancel_at: dict[int, list[asyncio.Task[Completion[int]]]] = {}
    async with Batcher([double, double], policy) as batcher:
        next_item = 1
        for step in range(400):
            count = rng.randint(1, 12)
            items = list(range(next_item, next_item + count))
            next_item += count
            if rng.random() < 0.05:
                items[rng.randrange(count)] *= -1
            deadline = time.monotonic() + rng.uniform(-0.002, 0.01) if rng.random() < 0.2 else None
            task = asyncio.create_task(call(items, deadline))
            requests.append((items, deadline, task))
            if rng.random() < 0.15:
                cancel_at.setdefault(step + rng.randint(0, 5), []).append(task)
            for doomed in cancel_at.pop(step, []):
                doomed.cancel()
                cancelled.add(doomed)
            pace = rng.random()
            if pace < 0.4:
                await asyncio.sleep(0)
            elif pace < 0.5:
                await asyncio.sleep(0.001)
        for doomed_tasks in cancel_at.values():
            for doomed in doomed_tasks:
                doomed.cancel()
                cancelled.add(doomed)
        _, unanswered = await asyncio.wait([task for _, _, task in requests], timeout=30)
        assert not unanswered

        outcomes: Counter[str] = Counter()
        for items, deadline, task in requests:
            if task.cancelled():
                assert task in cancelled
                outcomes["cancelled"] += 1
                continue
            error = task.exception()
            if error is None:
                assert task.result().results == [2 * x for x in items]
                assert all(x > 0 for x in items)
                outcomes["ok"] += 1
            elif isinstance(error, BatchFailed):
                poisoned = [batch for batch in batches if min(batch) < 0]
                assert any(set(batch) & set(items) for batch in poisoned)
                outcomes["failed"] += 1
            elif isinstance(error, DeadlineExceeded):
                assert deadline is not None
                outcomes["deadline"] += 1
            else:
                assert isinstance(error, Overloaded)
                outcomes["overloaded"] += 1
        assert set(outcomes) == {"ok", "failed", "deadline", "cancelled", "overloaded"}, outcomes
        stats = batcher.stats
        assert stats.queued == 0
        assert stats.in_flight == 0
        assert stats.loop_errors == 0
        # Every item that reached the batcher was computed or dropped, once.
        assert submitted == stats.items + sum(stats.dropped.values())


# -- queuing without a coroutine ---------------------------------------------


async def test_enqueue_answers_on_the_future_and_withdraw_keeps_items_from_a_batch() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=2, max_wait=60.0, max_queue=8, eager=True)
    async with Batcher([double], policy) as batcher:
        held = batcher.enqueue([1, 2])  # a full batch: it runs, and holds the worker
        await eventually(lambda: batcher.stats.in_flight == 2)
        kept, left = batcher.enqueue([3]), batcher.enqueue([4])
        assert batcher.stats.queued == 2
        batcher.withdraw(left)
        assert left.future.cancelled()
        assert batcher.stats.queued == 1
        assert batcher.stats.dropped["cancelled"] == 1
        gate.set()
        assert (await answered(held.future)).results == [2, 4]
        assert (await answered(kept.future)).results == [6]
    assert batches == [[1, 2], [3]]  # the withdrawn item never reached the model
    with pytest.raises(Closed):
        batcher.enqueue([5])
