"""The micro-batcher, specified: how items are grouped, answered and dropped.

Every test builds its own fake model: a batch function that records the
batches it ran and, where the queue's state matters, waits on a
``threading.Event`` gate so that one batch stays in the worker thread while
the test arranges the queue behind it. Nothing here sleeps to synchronise or
asserts on a duration; tests wait for conditions, and timings belong in
``bench/``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from batching import (
    Batcher,
    BatchFailed,
    BatchPolicy,
    Cancelled,
    Closed,
    Completion,
    DeadlineExceeded,
    OutOfResources,
    Overloaded,
)

T = TypeVar("T")


async def eventually(condition: Callable[[], bool]) -> None:
    """Let the event loop run until ``condition()`` holds; fail after ~10 s."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def answered(call: Awaitable[T]) -> T:
    """Await ``call``, failing rather than hanging if it is never answered."""
    return await asyncio.wait_for(call, timeout=10)


# -- grouping ---------------------------------------------------------------


async def test_a_full_queue_flushes_in_batches_of_exactly_max_batch_size() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    # Neither eager dispatch nor max_wait can flush a batch here: only size.
    policy = BatchPolicy(max_batch_size=4, max_wait=60.0, max_queue=64, eager=False)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit_many([100, 101, 102, 103]))
            await eventually(lambda: batcher.stats.in_flight == 4)
            queued = [asyncio.create_task(batcher.submit(i)) for i in range(12)]
            await eventually(lambda: batcher.stats.queued == 12)
        finally:
            gate.set()
        results = await answered(asyncio.gather(*queued))
        assert (await answered(first)).results == [200, 202, 204, 206]
    assert results == [2 * i for i in range(12)]
    assert batches == [[100, 101, 102, 103], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


async def test_a_partial_batch_flushes_once_max_wait_has_passed() -> None:
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=8, max_wait=0.02, eager=False)
    async with Batcher([double], policy) as batcher:
        results = await answered(asyncio.gather(*(batcher.submit(i) for i in range(3))))
    assert results == [0, 2, 4]
    assert batches == [[0, 1, 2]]


async def test_eager_dispatch_runs_a_lone_item_without_waiting_for_max_wait() -> None:
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=8, max_wait=60.0, eager=True)
    async with Batcher([double], policy) as batcher:
        assert await answered(batcher.submit(21)) == 42
    assert batches == [[21]]


# -- ordering ---------------------------------------------------------------


async def test_each_concurrent_caller_gets_the_results_of_its_own_items() -> None:
    rng = random.Random(7)

    def label(items: list[int]) -> list[str]:
        return [f"r{x}" for x in items]

    requests = [[rng.randrange(1000) for _ in range(rng.randint(1, 5))] for _ in range(200)]
    policy = BatchPolicy(max_batch_size=7, max_wait=0.001, max_queue=1000)
    async with Batcher([label], policy) as batcher:
        calls = asyncio.gather(*(batcher.submit_many(items) for items in requests))
        completions = await answered(calls)
    assert [c.results for c in completions] == [[f"r{x}" for x in items] for items in requests]


async def test_items_run_in_the_order_they_were_submitted() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=5, max_wait=0.001, max_queue=64)
    async with Batcher([double], policy) as batcher:
        try:
            calls = [asyncio.create_task(batcher.submit(i)) for i in range(23)]
            await eventually(lambda: batcher.stats.queued + batcher.stats.in_flight == 23)
        finally:
            gate.set()
        results = await answered(asyncio.gather(*calls))
    assert results == [2 * i for i in range(23)]
    assert [x for batch in batches for x in batch] == list(range(23))
    assert all(len(batch) <= 5 for batch in batches)


async def test_submit_many_splits_a_large_request_across_batches_and_joins_it_in_order() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=4, max_wait=60.0, max_queue=64, eager=True)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(100))
            await eventually(lambda: batcher.stats.in_flight == 1)
            large = asyncio.create_task(batcher.submit_many(list(range(10))))
            small = asyncio.create_task(batcher.submit_many([50]))
            await eventually(lambda: batcher.stats.queued == 11)
        finally:
            gate.set()
        large_done, small_done = await answered(asyncio.gather(large, small))
        assert await answered(first) == 200
    assert batches == [[100], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 50]]
    assert large_done.results == [2 * i for i in range(10)]
    assert large_done.batch_size == 4  # the largest batch it rode in
    assert small_done.results == [100]
    assert small_done.batch_size == 3
    assert large_done.queue_seconds > 0  # it waited behind the held batch
    for done in (large_done, small_done):
        assert done.queue_seconds >= 0
        assert done.compute_seconds >= 0


async def test_an_empty_request_completes_without_running_a_batch() -> None:
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [2 * x for x in items]

    async with Batcher([double]) as batcher:
        done = await answered(batcher.submit_many([]))
    assert done == Completion([], 0.0, 0.0, 0)
    assert batches == []


# -- failures ---------------------------------------------------------------


async def test_a_raising_batch_fails_all_its_callers_and_the_loop_keeps_serving() -> None:
    class ModelError(Exception):
        pass

    gate = threading.Event()
    batches: list[list[int]] = []
    raised: list[ModelError] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        if any(x < 0 for x in items):
            raised.append(ModelError("negative input"))
            raise raised[-1]
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            doomed = [asyncio.create_task(batcher.submit(x)) for x in (1, -2, 3)]
            await eventually(lambda: batcher.stats.queued == 3)
        finally:
            gate.set()
        outcomes = await answered(asyncio.gather(*doomed, return_exceptions=True))
        assert await answered(first) == 0
        assert await answered(batcher.submit(4)) == 8
        assert (await answered(batcher.submit_many([5, 6]))).results == [10, 12]
    assert batches == [[0], [1, -2, 3], [4], [5, 6]]
    assert len(raised) == 1
    for outcome in outcomes:
        assert isinstance(outcome, BatchFailed)
        assert "ModelError" in str(outcome)
        assert "negative input" in str(outcome)
        assert outcome.__cause__ is raised[0]
        assert not outcome.item_error
    assert batcher.stats.failed_batches == 1
    assert batcher.stats.batches == 4
    assert batcher.stats.loop_errors == 0


async def test_a_wrong_number_of_results_fails_every_caller_of_that_batch() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def short_once(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        results = [2 * x for x in items]
        return results[:-1] if len(batches) == 2 else results

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001)
    async with Batcher([short_once], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            doomed = [
                asyncio.create_task(batcher.submit(1)),
                asyncio.create_task(batcher.submit_many([2, 3])),
            ]
            await eventually(lambda: batcher.stats.queued == 3)
        finally:
            gate.set()
        outcomes = await answered(asyncio.gather(*doomed, return_exceptions=True))
        assert await answered(first) == 0
        assert await answered(batcher.submit(4)) == 8
    assert batches == [[0], [1, 2, 3], [4]]
    for outcome in outcomes:
        assert isinstance(outcome, BatchFailed)
        assert "2 results" in str(outcome)
        assert "3 items" in str(outcome)
    assert batcher.stats.failed_batches == 1
    assert batcher.stats.loop_errors == 0


async def test_a_batch_function_raising_a_base_exception_does_not_stop_the_loop() -> None:
    class Abort(BaseException):
        pass

    def double(items: list[int]) -> list[int]:
        if 13 in items:
            raise Abort("the model gave up")
        return [2 * x for x in items]

    async with Batcher([double], BatchPolicy(max_batch_size=4)) as batcher:
        with pytest.raises(BatchFailed) as caught:
            await answered(batcher.submit(13))
        assert isinstance(caught.value.__cause__, Abort)
        assert await answered(batcher.submit(1)) == 2
    assert batcher.stats.failed_batches == 1
    assert batcher.stats.loop_errors == 0
    assert batcher.stats.loop_restarts == 1  # the watchdog's doing (tests/test_batcher_faults.py)


# -- isolating failures -----------------------------------------------------


async def test_isolate_errors_fails_only_the_poisoned_caller_and_answers_the_rest() -> None:
    gate = threading.Event()
    calls: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        gate.wait()
        if 13 in items:
            raise ValueError("cannot digest 13")
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001, isolate_errors=True)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            tasks = [asyncio.create_task(batcher.submit(x)) for x in (1, 13, 3, 4)]
            await eventually(lambda: batcher.stats.queued == 4)
        finally:
            gate.set()
        outcomes = await answered(asyncio.gather(*tasks, return_exceptions=True))
        assert await answered(first) == 0
    assert outcomes[0] == 2
    assert outcomes[2:] == [6, 8]
    poisoned = outcomes[1]
    assert isinstance(poisoned, BatchFailed)
    assert poisoned.item_error
    assert isinstance(poisoned.__cause__, ValueError)
    # Halved until the failing item ran alone.
    assert calls == [[0], [1, 13, 3, 4], [1, 13], [1], [13], [3, 4]]
    assert batcher.stats.isolated_items == 1
    assert batcher.stats.failed_batches == 0
    assert batcher.stats.forward_calls == 6


async def test_isolate_errors_answers_everyone_when_a_failure_does_not_recur() -> None:
    gate = threading.Event()
    calls: list[list[int]] = []

    def flaky(items: list[int]) -> list[int]:
        calls.append(list(items))
        gate.wait()
        if len(calls) == 2:
            raise RuntimeError("a passing glitch")
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001, isolate_errors=True)
    async with Batcher([flaky], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            tasks = [asyncio.create_task(batcher.submit(x)) for x in (1, 2, 3, 4)]
            await eventually(lambda: batcher.stats.queued == 4)
        finally:
            gate.set()
        assert await answered(asyncio.gather(first, *tasks)) == [0, 2, 4, 6, 8]
    assert calls == [[0], [1, 2, 3, 4], [1, 2], [3, 4]]
    assert batcher.stats.transient_errors == 1


async def test_running_out_of_memory_splits_the_batch_and_caps_later_batches() -> None:
    gate = threading.Event()
    calls: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        gate.wait()
        if len(items) > 2:
            raise MemoryError("batch too large")
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001, isolate_errors=True)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            split = [asyncio.create_task(batcher.submit(x)) for x in (1, 2, 3, 4)]
            await eventually(lambda: batcher.stats.queued == 4)
        finally:
            gate.set()
        assert await answered(asyncio.gather(first, *split)) == [0, 2, 4, 6, 8]
        capped = asyncio.gather(*(batcher.submit(x) for x in (5, 6, 7, 8)))
        assert await answered(capped) == [10, 12, 14, 16]
    assert calls == [[0], [1, 2, 3, 4], [1, 2], [3, 4], [5, 6], [7, 8]]


async def test_the_cap_after_running_out_of_memory_lifts_after_shrink_seconds() -> None:
    """R4: no adaptive limit stays below its configured value once its time is up."""
    roomy = threading.Event()  # set: the model has memory for whole batches again
    calls: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(items) > 2 and not roomy.is_set():
            raise MemoryError("batch too large")
        return [2 * x for x in items]

    policy = BatchPolicy(
        max_batch_size=4, eager=False, max_wait=0.05, isolate_errors=True, shrink_seconds=0.2
    )
    async with Batcher([double], policy) as batcher:
        assert await answered(asyncio.gather(*(batcher.submit(x) for x in (1, 2, 3, 4)))) == [
            2,
            4,
            6,
            8,
        ]
        assert batcher.batch_cap == 2
        roomy.set()
        await asyncio.sleep(0.3)
        assert await answered(asyncio.gather(*(batcher.submit(x) for x in (5, 6, 7, 8)))) == [
            10,
            12,
            14,
            16,
        ]
        assert batcher.batch_cap == 4
    assert calls[-1] == [5, 6, 7, 8]  # one whole batch again


async def test_an_item_that_runs_out_of_memory_alone_fails_with_out_of_resources() -> None:
    def double(items: list[int]) -> list[int]:
        if 99 in items:
            raise MemoryError("item too large")
        return [2 * x for x in items]

    async with Batcher([double], BatchPolicy(max_batch_size=4)) as batcher:
        with pytest.raises(OutOfResources) as caught:
            await answered(batcher.submit(99))
        assert isinstance(caught.value.__cause__, MemoryError)
        assert await answered(batcher.submit(1)) == 2


# -- leaving the queue early ------------------------------------------------


async def test_a_cancelled_caller_leaves_the_queue_and_its_items_are_never_computed() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=8, max_wait=0.001)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            before = asyncio.create_task(batcher.submit(1))
            leaving = asyncio.create_task(batcher.submit_many([2, 3]))
            after = asyncio.create_task(batcher.submit(4))
            await eventually(lambda: batcher.stats.queued == 4)
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
            assert batcher.stats.dropped["cancelled"] == 2
            assert batcher.stats.queued == 2
        finally:
            gate.set()
        assert list(await answered(asyncio.gather(first, before, after))) == [0, 2, 8]
    assert batches == [[0], [1, 4]]
    assert batcher.stats.queued == 0
    assert batcher.stats.in_flight == 0


async def test_a_caller_cancelled_while_its_batch_gathers_is_never_computed() -> None:
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=8, max_wait=60.0, eager=True)
    async with Batcher([double], policy) as batcher:
        assert await answered(batcher.submit(0)) == 0  # the worker now waits for arrivals
        leaving = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0)  # `leaving` queues its item and wakes the gatherer
        await asyncio.sleep(0)  # the gatherer yields one turn, to see if more items come
        leaving.cancel()  # ... and the caller leaves within that turn
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert await answered(batcher.submit(2)) == 4
    assert batches == [[0], [2]]
    assert batcher.stats.dropped["cancelled"] == 1


async def test_a_deadline_passing_in_the_queue_fails_promptly_and_is_never_computed() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=8, max_wait=0.001)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            # The gate is still closed, so only the deadline's timer can answer this.
            with pytest.raises(DeadlineExceeded):
                await answered(batcher.submit(1, deadline=time.monotonic() + 0.05))
            assert batcher.stats.dropped["deadline"] == 1
            assert batcher.stats.queued == 0
        finally:
            gate.set()
        assert await answered(first) == 0
        assert await answered(batcher.submit(2)) == 4
    assert batches == [[0], [2]]


async def test_an_item_past_its_deadline_when_its_batch_is_taken_is_never_computed() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []
    late: list[asyncio.Task[int]] = []
    late_was_pending: list[bool] = []
    deadline = 0.0

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    def stall(size: int, seconds: float, waits: list[float]) -> None:
        """A slow callback: the loop is busy until the late item's deadline has
        passed, so its timer gets no turn before the next batch is taken."""
        if late and not late_was_pending:
            late_was_pending.append(not late[0].done())
            while (left := deadline - time.monotonic()) > 0:
                threading.Event().wait(left)

    policy = BatchPolicy(max_batch_size=1, max_wait=0.001)
    async with Batcher([double], policy, on_batch=stall) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            deadline = time.monotonic() + 0.2
            late.append(asyncio.create_task(batcher.submit(1, deadline=deadline)))
            await eventually(lambda: batcher.stats.queued == 1)
        finally:
            gate.set()
        assert await answered(first) == 0
        with pytest.raises(DeadlineExceeded):
            await answered(late[0])
    assert late_was_pending == [True]
    assert batches == [[0]]


async def test_a_deadline_already_past_raises_at_once_and_queues_nothing() -> None:
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [2 * x for x in items]

    async with Batcher([double]) as batcher:
        call = batcher.submit_many([1, 2], deadline=time.monotonic() - 1.0)
        # It raises before its first suspension: it never reached the queue.
        with pytest.raises(DeadlineExceeded):
            call.send(None)
        assert batcher.stats.queued == 0
        assert batcher.stats.dropped["deadline"] == 2
    assert batches == []


async def test_a_full_queue_rejects_new_items_with_overloaded() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001, max_queue=8)
    async with Batcher([double], policy) as batcher:
        stats = batcher.stats
        try:
            running = [asyncio.create_task(batcher.submit(i)) for i in range(4)]
            await eventually(lambda: stats.in_flight == 4)
            flood = [asyncio.create_task(batcher.submit(i)) for i in range(4, 24)]
            await eventually(lambda: stats.queued + stats.dropped["overloaded"] == 20)
            assert stats.queued == 8
            assert stats.dropped["overloaded"] == 12
            accepted, rejected = flood[:8], flood[8:]
            assert not any(task.done() for task in accepted)
            for task in rejected:
                error = task.exception()
                assert isinstance(error, Overloaded)
                assert error.retry_after >= 1
        finally:
            gate.set()
        results = await answered(asyncio.gather(*running, *accepted))
    assert results == [2 * i for i in range(12)]
    assert sorted(x for batch in batches for x in batch) == list(range(12))


async def test_a_request_larger_than_the_free_room_is_rejected_whole() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        batches.append(list(items))
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001, max_queue=8)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            queued = asyncio.create_task(batcher.submit_many([1, 2, 3, 4, 5]))
            await eventually(lambda: batcher.stats.queued == 5)
            with pytest.raises(Overloaded):
                await answered(batcher.submit_many([10, 11, 12, 13]))
            assert batcher.stats.queued == 5
            assert batcher.stats.dropped["overloaded"] == 4
            fits = asyncio.create_task(batcher.submit_many([6, 7, 8]))
            await eventually(lambda: batcher.stats.queued == 8)
        finally:
            gate.set()
        assert await answered(first) == 0
        assert (await answered(queued)).results == [2, 4, 6, 8, 10]
        assert (await answered(fits)).results == [12, 14, 16]
    assert [x for batch in batches for x in batch] == list(range(9))


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


# -- instances and observers ------------------------------------------------


async def test_batches_run_on_every_model_instance_at_once() -> None:
    gate = threading.Event()
    ran: list[tuple[str, str, list[int]]] = []

    def instance(name: str) -> Callable[[list[int]], list[int]]:
        def double(items: list[int]) -> list[int]:
            ran.append((name, threading.current_thread().name, list(items)))
            gate.wait()
            return [2 * x for x in items]

        return double

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001, max_queue=64)
    async with Batcher([instance("a"), instance("b")], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            # One instance is held at the gate, so only the other can take this.
            second = asyncio.create_task(batcher.submit(1))
            await eventually(lambda: batcher.stats.in_flight == 2)
            rest = [asyncio.create_task(batcher.submit(i)) for i in range(2, 20)]
        finally:
            gate.set()
        results = await answered(asyncio.gather(first, second, *rest))
    assert results == [2 * i for i in range(20)]
    assert {name for name, _, _ in ran} == {"a", "b"}
    assert len({thread for _, thread, _ in ran}) == 2
    assert sorted(x for _, _, items in ran for x in items) == list(range(20))


async def test_on_batch_hears_of_every_batch_with_its_size_seconds_and_new_waits() -> None:
    gate = threading.Event()
    heard: list[tuple[int, float, list[float], bool]] = []

    def listener(size: int, seconds: float, waits: list[float]) -> None:
        on_loop_thread = threading.current_thread() is threading.main_thread()
        heard.append((size, seconds, waits, on_loop_thread))

    def double(items: list[int]) -> list[int]:
        gate.wait()
        if 13 in items:
            raise ValueError("unlucky")
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=3, max_wait=0.001)
    async with Batcher([double], policy, on_batch=listener) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            large = asyncio.create_task(batcher.submit_many([1, 2, 3, 4]))
            small = [asyncio.create_task(batcher.submit(x)) for x in (5, 6)]
            await eventually(lambda: batcher.stats.queued == 6)
        finally:
            gate.set()
        await answered(asyncio.gather(first, large, *small))
        with pytest.raises(BatchFailed):
            await answered(batcher.submit(13))
    # Batches: [0], [1 2 3] (the large request starts), [4 5 6] (5 and 6
    # start; the large one continues), [13] (fails, and is still heard of).
    assert [size for size, _, _, _ in heard] == [1, 3, 3, 1]
    assert [len(waits) for _, _, waits, _ in heard] == [1, 1, 2, 1]
    for _, seconds, waits, on_loop_thread in heard:
        assert seconds >= 0
        assert all(wait >= 0 for wait in waits)
        assert on_loop_thread
    assert all(wait > 0 for _, _, waits, _ in heard[1:3] for wait in waits)  # held back


# -- the invariant ----------------------------------------------------------


async def test_every_caller_gets_exactly_one_outcome_under_a_random_mix() -> None:
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

    policy = BatchPolicy(max_batch_size=8, max_wait=0.001, max_queue=48, eager=False)
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
