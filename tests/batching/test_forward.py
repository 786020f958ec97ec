"""The forward pass, specified: what one batch's run in the worker thread
hands back, and what callers make of it.

The first tests call a ``Forward`` directly, as the worker thread does: plain
function calls, no event loop. The rest run the same cases through a real
``Batcher`` to check what each caller is answered with.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading

import pytest

from batching import Batcher, BatchFailed, BatchPolicy, OutOfResources
from batching.forward import Failure, Forward
from tests.batching.waiting import answered, eventually


class Model:
    """A batch function that records its calls and fails on request."""

    def __init__(self, poison: set[int] | None = None, oom_above: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.poison = poison or set()
        self.oom_above = oom_above

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        if self.oom_above is not None and len(items) > self.oom_above:
            raise MemoryError(f"a batch of {len(items)} does not fit")
        if self.poison & set(items):
            raise ValueError(f"cannot digest {sorted(self.poison & set(items))}")
        return [2 * x for x in items]


# -- called directly --------------------------------------------------------


def test_a_good_batch_is_one_call_and_its_results_in_order() -> None:
    model = Model()
    outcome = Forward(model, isolate_errors=True)([1, 2, 3])
    assert outcome.results == [2, 4, 6]
    assert (outcome.error, outcome.calls, outcome.failures) == (None, 1, 0)
    assert not outcome.transient
    assert outcome.shrink_to == 0
    assert model.calls == [[1, 2, 3]]


def test_results_in_any_sequence_come_back_as_a_list() -> None:
    def as_tuple(items: list[int]) -> tuple[int, ...]:
        return tuple(items)

    outcome = Forward(as_tuple, isolate_errors=False)([1, 2])
    assert outcome.results == [1, 2]
    assert type(outcome.results) is list


def test_without_isolation_a_raising_batch_fails_whole_in_one_call() -> None:
    model = Model(poison={2})
    outcome = Forward(model, isolate_errors=False)([1, 2, 3])
    assert isinstance(outcome.error, BatchFailed)
    assert not outcome.error.item_error
    assert isinstance(outcome.error.__cause__, ValueError)
    assert "cannot digest [2]" in str(outcome.error)
    assert (outcome.calls, outcome.failures) == (1, 0)
    assert model.calls == [[1, 2, 3]]


def test_with_isolation_a_poisoned_item_is_halved_out_and_fails_alone() -> None:
    model = Model(poison={3})
    outcome = Forward(model, isolate_errors=True)([1, 2, 3, 4])
    assert outcome.error is None
    assert model.calls == [[1, 2, 3, 4], [1, 2], [3, 4], [3], [4]]
    assert (outcome.calls, outcome.failures) == (5, 1)
    assert outcome.results[:2] == [2, 4]
    assert outcome.results[3] == 8
    failure = outcome.results[2]
    assert isinstance(failure, Failure)
    assert isinstance(failure.error, BatchFailed)
    assert failure.error.item_error
    assert not outcome.transient


def test_with_isolation_a_batch_of_one_that_raises_is_an_item_error() -> None:
    outcome = Forward(Model(poison={7}), isolate_errors=True)([7])
    assert isinstance(outcome.error, BatchFailed)
    assert outcome.error.item_error
    assert (outcome.calls, outcome.failures) == (1, 1)


def test_a_failure_that_does_not_recur_in_the_halves_is_transient() -> None:
    calls: list[list[int]] = []

    def flaky(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("a passing glitch")
        return [2 * x for x in items]

    outcome = Forward(flaky, isolate_errors=True)([1, 2, 3, 4])
    assert outcome.results == [2, 4, 6, 8]
    assert outcome.transient
    assert (outcome.error, outcome.calls, outcome.failures) == (None, 3, 0)
    assert calls == [[1, 2, 3, 4], [1, 2], [3, 4]]


@pytest.mark.parametrize("isolate_errors", [False, True])
def test_a_wrong_number_of_results_fails_the_batch_whole(isolate_errors: bool) -> None:
    def one_short(items: list[int]) -> list[int]:
        return items[:-1]

    outcome = Forward(one_short, isolate_errors=isolate_errors)([1, 2, 3])
    assert isinstance(outcome.error, BatchFailed)
    assert not outcome.error.item_error
    assert "2 results for a batch of 3 items" in str(outcome.error)
    assert outcome.calls == 1
    if isolate_errors:  # a slot per item still, so later segments line up
        assert outcome.results == [None, None, None]


def test_running_out_of_memory_notes_half_the_smallest_size_that_failed() -> None:
    model = Model(oom_above=2)
    outcome = Forward(model, isolate_errors=True)(list(range(8)))
    assert outcome.results == [2 * x for x in range(8)]
    assert outcome.error is None
    assert outcome.shrink_to == 2  # 8 failed (-> 4), then 4 failed (-> 2)
    assert model.calls[:3] == [list(range(8)), list(range(4)), [0, 1]]


def test_an_item_out_of_memory_alone_fails_with_out_of_resources_and_no_cap() -> None:
    outcome = Forward(Model(oom_above=0), isolate_errors=True)([5])
    assert isinstance(outcome.error, OutOfResources)
    assert "even alone" in str(outcome.error)
    assert isinstance(outcome.error.__cause__, MemoryError)
    assert outcome.shrink_to == 0  # a batch of one cannot shrink


def test_the_resource_check_decides_what_out_of_resources_means() -> None:
    class DeviceFull(Exception):
        pass

    def full(items: list[int]) -> list[int]:
        raise DeviceFull("no room on the device")

    forward = Forward(
        full, isolate_errors=False, is_resource_error=lambda exc: isinstance(exc, DeviceFull)
    )
    outcome = forward([1, 2])
    assert isinstance(outcome.error, OutOfResources)
    assert outcome.shrink_to == 1
    assert isinstance(Forward(full, isolate_errors=False)([1, 2]).error, BatchFailed)


def test_a_base_exception_goes_past_the_forward_without_another_call() -> None:
    class Abort(BaseException):
        pass

    calls: list[list[int]] = []

    def abort(items: list[int]) -> list[int]:
        calls.append(list(items))
        raise Abort("the model gave up")

    with pytest.raises(Abort):
        Forward(abort, isolate_errors=True)([1, 2, 3, 4])
    assert calls == [[1, 2, 3, 4]]


def test_isolating_k_failing_items_of_b_costs_at_most_2k_log2_b_extra_calls() -> None:
    rng = random.Random(11)
    for _ in range(200):
        size = rng.randint(2, 64)
        items = list(range(size))
        poison = set(rng.sample(items, rng.randint(1, min(4, size))))
        model = Model(poison=poison)
        outcome = Forward(model, isolate_errors=True)(items)
        assert outcome.failures == len(poison)
        assert outcome.calls == len(model.calls)
        assert outcome.calls - 1 <= 2 * len(poison) * math.ceil(math.log2(size))
        failed = {x for x, r in zip(items, outcome.results, strict=True) if isinstance(r, Failure)}
        assert failed == poison
        assert all(
            r == 2 * x for x, r in zip(items, outcome.results, strict=True) if x not in poison
        )


# -- through a batcher: failures ---------------------------------------------


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

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001, isolate_errors=False)
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

    policy = BatchPolicy(max_batch_size=4, max_wait=0.001, isolate_errors=False)
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


# -- through a batcher: isolating failures -----------------------------------


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
