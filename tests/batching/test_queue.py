"""The queue of pending callers, specified: how items are grouped into
batches, kept in order, capped after running out of memory, and dropped
when their caller leaves, their deadline passes or there is no room.

Most tests drive the queue through a real ``Batcher``: a fake model records
the batches it ran and, where the queue's state matters, waits on a
``threading.Event`` gate so that one batch stays in the worker thread while
the test arranges the queue behind it. The last few drive a bare ``Queue``
by hand. Nothing here sleeps to synchronise or asserts on a duration; tests
wait for conditions, and timings belong in ``bench/``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable

import pytest

from batching import (
    Batcher,
    BatcherStats,
    BatchPolicy,
    Cancelled,
    Closed,
    Completion,
    DeadlineExceeded,
    Overloaded,
)
from batching.pending import Pending
from batching.queue import Queue
from tests.batching.waiting import answered, eventually

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


# -- the out-of-resources cap ----------------------------------------------


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


async def test_deadlines_in_any_order_each_fail_while_the_model_is_busy() -> None:
    """One timer serves the callers queued in deadline order; a shorter
    deadline behind a longer one has its own. Each fails at or after its
    deadline (never before) while the model holds, in deadline order."""
    gate = threading.Event()

    def double(items: list[int]) -> list[int]:
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=1, max_wait=0.001)
    async with Batcher([double], policy) as batcher:
        try:
            first = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            now = time.monotonic()
            waits = {1: 0.30, 2: 0.32, 3: 0.10, 4: 0.34, 5: 0.05}  # 3 and 5 out of order
            order: list[int] = []
            tasks = {
                x: asyncio.create_task(batcher.submit(x, deadline=now + wait))
                for x, wait in waits.items()
            }
            failed_at: dict[int, float] = {}

            def done(x: int) -> Callable[[asyncio.Task[int]], None]:
                def record(_: asyncio.Task[int]) -> None:
                    failed_at[x] = time.monotonic()
                    order.append(x)

                return record

            for x, task in tasks.items():
                task.add_done_callback(done(x))
            for task in tasks.values():
                with pytest.raises(DeadlineExceeded):
                    await answered(task)  # the gate is shut: only the deadline answers
            assert all(failed_at[x] >= now + wait for x, wait in waits.items())
            assert order == sorted(waits, key=waits.__getitem__)
            assert batcher.stats.dropped["deadline"] == 5
            assert batcher.stats.queued == 0
        finally:
            gate.set()
        assert await answered(first) == 0


async def test_a_short_deadline_after_the_queue_emptied_is_not_left_to_a_later_timer() -> None:
    gate = threading.Event()
    gate.set()

    def double(items: list[int]) -> list[int]:
        gate.wait()
        return [2 * x for x in items]

    policy = BatchPolicy(max_batch_size=1, max_wait=0.001)
    async with Batcher([double], policy) as batcher:
        try:
            # taken at once: the queue's timer stays armed for 30 s from now
            assert await answered(batcher.submit(1, deadline=time.monotonic() + 30)) == 2
            gate.clear()
            held = asyncio.create_task(batcher.submit(0))
            await eventually(lambda: batcher.stats.in_flight == 1)
            with pytest.raises(DeadlineExceeded):  # within answered()'s 10 s, not 30
                await answered(batcher.submit(2, deadline=time.monotonic() + 0.05))
        finally:
            gate.set()
        assert await answered(held) == 0


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


# -- the queue by hand ------------------------------------------------------


def bare_queue(max_batch_size: int = 32) -> Queue[int, int]:
    """An open queue that nobody serves: the test takes its batches."""
    queue: Queue[int, int] = Queue(
        BatchPolicy(max_batch_size=max_batch_size), BatcherStats(), "bare", instances=1
    )
    queue.open()
    return queue


def queued(
    queue: Queue[int, int], items: list[int], deadline: float | None = None
) -> Pending[int, int]:
    pending = queue.enqueue(items, deadline)
    assert pending is not None
    return pending


async def test_take_splits_a_request_at_the_cap_and_resumes_it_in_the_next_batch() -> None:
    queue = bare_queue(max_batch_size=3)
    large = queued(queue, [10, 11, 12, 13])
    small = queued(queue, [20])
    now = time.monotonic()
    assert queue.take(now) == [(large, 0, 3)]
    assert queue.take(now) == [(large, 3, 4), (small, 0, 1)]
    assert queue.take(now) == []
    assert queue.stats.queued == 0


async def test_take_skips_a_withdrawn_caller_and_its_items_leave_the_count() -> None:
    queue = bare_queue(max_batch_size=8)
    leaving = queued(queue, [1, 2])
    staying = queued(queue, [3])
    queue.withdraw(leaving, "cancelled")
    assert queue.stats.queued == 1
    assert queue.stats.dropped["cancelled"] == 2
    assert queue.take(time.monotonic()) == [(staying, 0, 1)]


async def test_take_expires_a_caller_whose_deadline_passed_before_its_timer_ran() -> None:
    queue = bare_queue(max_batch_size=8)
    late = queued(queue, [1], time.monotonic() + 60)
    on_time = queued(queue, [2])
    assert queue.take(time.monotonic() + 120) == [(on_time, 0, 1)]
    with pytest.raises(DeadlineExceeded):
        late.future.result()
    assert queue.stats.dropped["deadline"] == 1


async def test_enqueue_refuses_before_open_and_past_max_queue_and_queues_nothing() -> None:
    queue: Queue[int, int] = Queue(BatchPolicy(max_queue=2), BatcherStats(), "bare", 1)
    with pytest.raises(Closed):
        queue.enqueue([1], None)
    queue.open()
    queued(queue, [1, 2])
    with pytest.raises(Overloaded) as caught:
        queue.enqueue([3], None)
    assert caught.value.retry_after >= 1
    assert queue.stats.queued == 2
    assert queue.stats.dropped["closed"] == 1
    assert queue.stats.dropped["overloaded"] == 1


async def test_gather_returns_none_once_closed_and_empty() -> None:
    queue = bare_queue()
    queue.stop_accepting()
    assert await answered(queue.gather()) is None
    assert not queue.accepting
    queue.open()  # stop_accepting is for good
    assert not queue.accepting


async def test_cancel_all_fails_every_queued_caller_with_cancelled_once() -> None:
    queue = bare_queue()
    callers = [queued(queue, [x]) for x in range(3)]
    queue.cancel_all()
    for caller in callers:
        assert isinstance(caller.future.exception(), Cancelled)
    assert queue.stats.queued == 0
    assert queue.stats.dropped["closed"] == 3


@pytest.mark.parametrize("turns", range(6))
async def test_a_gatherer_cancelled_as_the_queue_closes_ends_cancelled(turns: int) -> None:
    # aclose() closes the queue (which wakes a gatherer waiting out max_wait)
    # and then cancels the instances it timed out on. However many loop turns
    # fall between the two, the gatherer must end cancelled: a gatherer that
    # swallowed the cancellation went on to run a batch, and aclose waited on
    # it (Python 3.11's wait_for returns the inner result on a cancellation
    # that lands in the turn the inner wait finished).
    queue: Queue[int, int] = Queue(
        BatchPolicy(max_batch_size=8, max_wait=60.0, eager=False),
        BatcherStats(),
        "bare",
        instances=1,
    )
    queue.open()
    queued(queue, [1])
    gatherer = asyncio.create_task(queue.gather())
    for _ in range(3):
        await asyncio.sleep(0)  # it waits out max_wait for more items
    assert not gatherer.done()
    queue.stop_accepting()
    for _ in range(turns):
        await asyncio.sleep(0)
    if gatherer.cancel():  # False: it had returned its batch already, which is fine
        with pytest.raises(asyncio.CancelledError):
            await gatherer
