"""The micro-batcher as a state machine (RELIABILITY R25).

Hypothesis drives one real ``Batcher`` (one model instance) inside an event
loop that the machine owns, through random interleavings of: submitting
requests (with no deadline, one already past, or a short one; some holding a
poison item the model raises on, or runs out of memory on), cancelling a
waiting caller, letting the loop run for a moment, holding the model on a
``threading.Event`` gate (a hung forward pass) and releasing it, draining
(``stop_accepting``) and shutting down (``aclose`` with a short timeout).
``isolate_errors`` is drawn per example, and tracked: the split calls of a
failing batch must be exactly the halving the policy describes.

After every step it checks: the queue never exceeds ``max_queue``; no batch
exceeds ``max_batch_size``; items are computed once and in submission order
(FIFO); every caller ends in exactly one terminal state, the one its history
allows; successful callers get ``f(x)`` for their own items; a cancelled or
expired caller's items never enter a batch taken after that was observed;
after a drain nothing new is accepted; after ``aclose(timeout)`` every
accepted request is answered in time and nothing is queued or in flight.

``make test`` runs CARPOOL_STATEFUL_EXAMPLES examples (default 500, as R25 asks of CI) of 50
steps each; R25's pass figure is 500 examples x 50 steps:
``CARPOOL_STATEFUL_EXAMPLES=500 pytest tests/batching/test_states.py``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

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

EXAMPLES = int(os.environ.get("CARPOOL_STATEFUL_EXAMPLES", "500"))
STEPS = 50

OK, RAISE, OOM = "ok", "raise", "oom"
AFTER_SHUTDOWN = 10**9  # no batch is taken after aclose: every recorded one came before


def f(x: int) -> int:
    """The model: what every successful item must come back as."""
    return 3 * x + 1


@dataclass
class Caller:
    """One ``submit_many`` call and what the machine knows about it."""

    items: list[int]
    relative: float | None  # the deadline asked for, relative to submission; < 0: past
    task: asyncio.Task[Completion[int]] = field(init=False)
    deadline: float | None = None  # absolute, set when the call runs
    admitted: tuple[bool, int] | None = None  # (accepting, queued) just before admit()
    cancelled_at: int | None = None  # batches from this index on must not hold its items
    forbidden_from: int | None = None
    settled: bool = False


async def turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
class BatcherMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _, context: self.loop_errors.append(context))
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[list[int]] = []  # every call of the batch function, in order
        self.poison: dict[int, str] = {}
        self.callers: list[Caller] = []
        self.next_id = 0
        self.draining = False
        self.shut = False
        self.policy = BatchPolicy()
        self._batcher: Batcher[int, int] | None = None

    @property
    def batcher(self) -> Batcher[int, int]:
        assert self._batcher is not None
        return self._batcher

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        self.loop.run_until_complete(coro)

    def model(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        self.gate.wait(60)
        kinds = {self.poison.get(x, OK) for x in items}
        if OOM in kinds:
            raise MemoryError("poisoned item (out of memory)")
        if RAISE in kinds:
            raise ValueError("poisoned item")
        return [f(x) for x in items]

    # -- the model of the batches ------------------------------------------------

    def fails(self, items: list[int]) -> bool:
        return any(self.poison.get(x, OK) != OK for x in items)

    def expected_calls(self, items: list[int]) -> list[list[int]]:
        """The calls that one dispatched batch makes, per the policy."""
        calls = [items]
        if self.policy.isolate_errors and len(items) > 1 and self.fails(items):
            middle = len(items) // 2
            calls += self.expected_calls(items[:middle])
            calls += self.expected_calls(items[middle:])
        return calls

    def groups(self) -> list[list[int]]:
        """The dispatched batches, from the calls (a batch's split calls follow it)."""
        calls = list(self.calls)
        groups: list[list[int]] = []
        index = 0
        while index < len(calls):
            expected = self.expected_calls(calls[index])
            got = calls[index : index + len(expected)]
            assert got == expected[: len(got)], f"calls {got} are not the split of {expected}"
            groups.append(calls[index])
            index += len(expected)
        return groups

    def taken(self) -> int:
        """How many batches have been taken from the queue so far (one instance)."""
        if self.shut:
            return AFTER_SHUTDOWN
        stats = self.batcher.stats
        return stats.batches + (1 if stats.in_flight else 0)

    # -- rules ---------------------------------------------------------------------

    @initialize(
        max_batch_size=st.integers(1, 4),
        max_queue=st.integers(1, 12),
        max_wait=st.sampled_from([0.0, 0.001, 0.005]),
        eager=st.booleans(),
        isolate_errors=st.booleans(),
    )
    def start(
        self,
        max_batch_size: int,
        max_queue: int,
        max_wait: float,
        eager: bool,
        isolate_errors: bool,
    ) -> None:
        self.policy = BatchPolicy(
            max_batch_size=max_batch_size,
            max_wait=max_wait,
            max_queue=max_queue,
            eager=eager,
            isolate_errors=isolate_errors,
        )
        self._batcher = Batcher([self.model], self.policy, name="machine")

        async def start() -> None:
            self.batcher.start()

        self.run(start())

    async def call(self, caller: Caller) -> Completion[int]:
        batcher = self.batcher
        if caller.relative is not None:
            caller.deadline = time.monotonic() + caller.relative
        caller.admitted = (batcher.accepting, batcher.stats.queued)
        return await batcher.submit_many(caller.items, caller.deadline)

    @rule(
        count=st.integers(1, 5),
        relative=st.one_of(st.none(), st.just(-0.001), st.floats(0.001, 0.05)),
        poison=st.sampled_from([OK, OK, OK, RAISE, OOM]),
        where=st.integers(0, 4),
    )
    def submit(self, count: int, relative: float | None, poison: str, where: int) -> None:
        items = list(range(self.next_id, self.next_id + count))
        self.next_id += count
        if poison != OK:
            self.poison[items[where % count]] = poison
        caller = Caller(items, relative)
        caller.task = self.loop.create_task(self.call(caller))
        self.callers.append(caller)
        self.run(turns())

    @rule(pick=st.integers(0, 1000))
    def cancel(self, pick: int) -> None:
        # No precondition on which callers are still waiting: that depends on
        # timing, and Hypothesis needs the rules it may pick to be reproducible.
        live = [c for c in self.callers if not c.task.done()]
        if live:
            caller = live[pick % len(live)]
            caller.cancelled_at = self.taken()
            assert caller.task.cancel()
        self.run(turns())

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.003, 0.01]))
    def advance(self, seconds: float) -> None:
        async def wait() -> None:
            await asyncio.sleep(seconds)
            await turns()

        self.run(wait())

    @rule(act=st.integers(0, 2))
    def hang_model(self, act: int) -> None:
        if not act:  # one draw in three, or most examples would only overload
            self.gate.clear()
        self.run(turns())

    @rule()
    def release_model(self) -> None:
        self.gate.set()
        self.run(turns())

    # Draining and shutting down end an example's interesting part: they act on
    # one draw in four, so that most examples first build up some history.
    @rule(act=st.integers(0, 3))
    def begin_drain(self, act: int) -> None:
        if act:
            return
        self.batcher.stop_accepting()
        self.draining = True
        self.run(turns())

    @precondition(lambda self: not self.shut)
    @rule(timeout=st.sampled_from([0.0, 0.005, 0.02]), act=st.integers(0, 3))
    def shutdown(self, timeout: float, act: int) -> None:
        if not act:
            self.shutdown_within(timeout)

    def shutdown_within(self, timeout: float) -> None:
        self.draining = True

        async def close() -> None:
            began = time.monotonic()
            await asyncio.wait_for(self.batcher.aclose(timeout), timeout + 30)
            self.shut = True
            assert time.monotonic() - began < timeout + 5, "aclose overran its timeout"
            for _ in range(100):  # callers answered now resume within a few turns
                if all(c.task.done() for c in self.callers):
                    break
                await asyncio.sleep(0)

        self.run(close())
        assert all(c.task.done() for c in self.callers), "a caller outlived aclose"
        assert self.batcher.stats.queued == 0
        assert self.batcher.stats.in_flight == 0

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def bounds(self) -> None:
        if self._batcher is None:
            return
        stats = self.batcher.stats
        assert 0 <= stats.queued <= self.policy.max_queue
        assert 0 <= stats.in_flight <= self.policy.max_batch_size
        assert stats.loop_errors == 0
        assert not self.loop_errors, self.loop_errors
        for call in list(self.calls):
            assert 1 <= len(call) <= self.policy.max_batch_size, call
        if self.draining:
            assert not self.batcher.accepting
        if all(c.task.done() for c in self.callers):
            assert stats.queued == 0

    @invariant()
    def batches_and_callers(self) -> None:
        if self._batcher is None:
            return
        groups = self.groups()
        computed = [x for group in groups for x in group]
        # FIFO, and nothing computed twice (split calls are not new batches).
        assert computed == sorted(set(computed)), f"out of order or repeated: {groups}"
        batch_of = {x: index for index, group in enumerate(groups) for x in group}
        for caller in self.callers:
            if caller.task.done() and not caller.settled:
                caller.settled = True
                self.settle(caller, groups, batch_of)
            if caller.forbidden_from is not None:
                late = [x for x in caller.items if batch_of.get(x, -1) >= caller.forbidden_from]
                assert not late, f"items {late} of a cancelled or expired caller ran: {groups}"

    def settle(self, caller: Caller, groups: list[list[int]], batch_of: dict[int, int]) -> None:
        """Check the one terminal state ``caller`` ended in against its history."""
        task = caller.task
        if caller.cancelled_at is not None:
            assert task.cancelled(), "a cancelled caller ended otherwise"
            caller.forbidden_from = caller.cancelled_at
            return
        assert not task.cancelled()
        error = task.exception()
        assert caller.admitted is not None
        accepting, queued = caller.admitted
        count = len(caller.items)
        if not accepting:
            assert isinstance(error, Closed), repr(error)
            return
        if queued + count > self.policy.max_queue:
            assert isinstance(error, Overloaded), repr(error)
            return
        if caller.relative is not None and caller.relative < 0:
            assert isinstance(error, DeadlineExceeded), repr(error)
            return
        mine = [self.poison.get(x, OK) for x in caller.items]
        if error is None:
            assert task.result().results == [f(x) for x in caller.items]
            assert all(x in batch_of for x in caller.items)
            assert all(kind == OK for kind in mine)
            if not self.policy.isolate_errors:
                assert not any(self.fails(groups[batch_of[x]]) for x in caller.items)
        elif isinstance(error, DeadlineExceeded):
            assert caller.deadline is not None
            assert time.monotonic() >= caller.deadline - 0.005, "expired early"
            caller.forbidden_from = self.taken()
        elif isinstance(error, Cancelled):
            assert self.draining, "Cancelled before shutdown"
        elif isinstance(error, (BatchFailed, OutOfResources)):
            kind = OOM if isinstance(error, OutOfResources) else RAISE
            if self.policy.isolate_errors:
                assert kind in mine, (kind, mine)
                assert not isinstance(error, BatchFailed) or error.item_error
            else:
                ran = {batch_of[x] for x in caller.items if x in batch_of}
                assert any(self.error_kind(groups[index]) == kind for index in ran)
        else:
            raise AssertionError(f"unexpected outcome {error!r}")

    def error_kind(self, group: list[int]) -> str:
        kinds = {self.poison.get(x, OK) for x in group}
        return OOM if OOM in kinds else RAISE if RAISE in kinds else OK

    def teardown(self) -> None:
        self.gate.set()
        try:
            if self._batcher is not None:
                self.shutdown_within(5.0)
                self.batches_and_callers()
        finally:
            if self._batcher is not None:
                for instance in self._batcher._instances:
                    instance.executor.shutdown(wait=True)
            for caller in self.callers:
                if not caller.task.done():
                    caller.task.cancel()
            self.run(turns())
            self.loop.close()


TestBatcherStates = BatcherMachine.TestCase
