"""The judges of `make slow-clients` (bench/slowloris.py, RELIABILITY R20) can
fail, and `carpool serve` raises its own open-files limit. The run itself
takes minutes; tests/server/test_limits.py has its short version."""

from __future__ import annotations

import math
import resource
from collections.abc import Iterator

import orjson
import pytest

from bench.loadgen import OpenLoopResult
from bench.slowloris import Echo, judge_closes, judge_fds, judge_traffic
from bench.stats import Latency
from bench.trickle import Closed
from bench.workloads import OK, WRONG
from server.cli import raise_open_files_limit


def traffic(seconds: list[float], lost: int = 0) -> OpenLoopResult:
    """A run whose correct answers took ``seconds`` and ``lost`` timed out."""
    latencies = [*seconds, *[math.inf] * lost]
    return OpenLoopResult(
        offered_rps=100.0,
        requests=len(latencies),
        ok=len(seconds),
        failed=0,
        wrong=0,
        timeouts=lost,
        achieved_rps=100.0,
        latency=Latency.of(latencies),
        send_lag=Latency.of([0.0]),
        reasons=("no answer within 5 s",) if lost else (),
    )


BASELINE = traffic([0.002] * 980 + [0.010] * 20)  # p99 10 ms


def test_the_traffic_judge_passes_an_attack_within_the_p99_factor() -> None:
    assert judge_traffic(BASELINE, traffic([0.002] * 980 + [0.0119] * 20)) == []


def test_the_traffic_judge_fails_a_p99_over_the_factor() -> None:
    (failure,) = judge_traffic(BASELINE, traffic([0.002] * 980 + [0.0121] * 20))
    assert "p99" in failure


def test_the_traffic_judge_fails_a_single_lost_request_in_either_run() -> None:
    failures = judge_traffic(BASELINE, traffic([0.002] * 999, lost=1))
    assert any("1 of 1000 real requests failed during the attack" in f for f in failures)
    failures = judge_traffic(traffic([0.002] * 999, lost=1), BASELINE)
    assert any("during the baseline" in f for f in failures)


def on_time(kind: str, seconds: float = 10.05, status: int = 408) -> Closed:
    return Closed(kind, seconds, status)


def test_the_close_judge_passes_408s_within_a_second_of_the_deadline() -> None:
    closes = [on_time("headers", 9.2), on_time("headers", 10.9), on_time("body", 10.0)]
    assert judge_closes(closes, 10.0) == []


@pytest.mark.parametrize(
    ("odd", "says"),
    [
        (on_time("headers", 11.2), "1 late"),
        (on_time("body", 8.5), "1 closed early"),
        (on_time("body", math.inf, 0), "1 late"),  # never closed by the server
        (on_time("headers", status=0), "without a 408"),
        (on_time("headers", status=400), "without a 408"),
    ],
)
def test_the_close_judge_fails_one_connection_off_the_deadline_or_without_408(
    odd: Closed, says: str
) -> None:
    closes = [on_time("headers")] * 100 + [on_time("body")] * 20 + [odd]
    failures = judge_closes(closes, 10.0)
    assert any(says in failure for failure in failures), failures
    assert all(failure.startswith(f"slow {odd.kind}:") for failure in failures)


def test_the_close_judge_fails_when_nothing_was_measured() -> None:
    assert judge_closes([], 10.0)


def test_the_fd_judge_allows_two_either_way_and_no_more() -> None:
    assert judge_fds(14, 16) == []
    assert judge_fds(14, 12) == []
    assert judge_fds(14, 17)


def test_the_echo_workload_accepts_only_twice_its_input() -> None:
    echo = Echo([1.5, 3.0], {})
    body = orjson.loads(echo.body(1, "1"))
    assert body["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [3.0]}]

    def answer(y: float) -> bytes:
        output = {"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [y]}
        return orjson.dumps({"id": "1", "outputs": [output]})

    assert echo.judge(1, "1", 200, answer(6.0))[0] == OK
    assert echo.judge(1, "1", 200, answer(3.0))[0] == WRONG


@pytest.fixture
def low_soft_limit() -> Iterator[int]:
    """The soft open-files limit at 1024 (a common default), restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_carpool_serve_raises_its_soft_open_files_limit_to_the_hard_limit(
    low_soft_limit: int,
) -> None:
    # 1,200 slow connections need 1,200 fds: at 1024, accept() would fail
    # and real clients could not connect
    raised = raise_open_files_limit()
    assert raised == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert raised > 1024
    if low_soft_limit != resource.RLIM_INFINITY:
        assert raised == low_soft_limit
