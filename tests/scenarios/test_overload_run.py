"""The overload run's judge, proven able to fail, and its shortened run
(RELIABILITY R3 10x overload, R4 recovery, R5 health under overload; the full
run is `make overload`, bench/overload.py).

The shortened run is the full run's code path with 4 s phases and 1.5 s
calibration steps (about 35 s). It asserts every behavioural criterion that
the full run judges (``verdict.failures``):

- R3: 0 accepted requests lost (reset, EOF, no answer), 0 answers 500, 0
  wrong answers; at least 99.9 % of the 503s are carpool's JSON with reason
  ``overloaded`` and a Retry-After (uvicorn's bare 503 counted apart); the 10x
  phase was really overloaded (it got rejections); RSS at the end of 10x <=
  1.1 x RSS after 1x; the server process is the same and alive at the end.
- R4: after the recovery window (2 x the queue timeout), 0 rejections;
  ``carpool_queue_depth`` <= max_batch_size in the last /metrics sample (the
  queue drained) and ``carpool_batch_cap`` at max_batch_size in every one.
- R5: live answered 200 and ready never failed, on every probe (one a second).

It leaves out the pure speed figures (``verdict.speed_failures``), which a
shared 2-core machine running the rest of the suite cannot promise: goodput at
10x >= 0.9 x 1x, p99 at 10x <= 2 x p99 at 1x and <= queue wait + one batch,
rejection p99 <= 10 ms, recovered p99 <= 1.1 x baseline, live p99 < 100 ms,
and queue depth <= max_batch_size in every sample after the recovery window
(a moment's stall of the shared core leaves a deeper queue for a moment).
Of those it keeps one, loosened to a behaviour: goodput at 10x stays above
half of 1x (the server keeps serving its capacity, it does not collapse).
"""

from __future__ import annotations

import math
from dataclasses import replace

from bench.overload import (
    BARE,
    DEADLINE,
    GOOD,
    LOST,
    OTHER_503,
    OURS,
    Answer,
    Figures,
    Probe,
    classify_503,
    figures,
    judge_answers,
    judge_health,
    judge_overload,
    judge_recovery,
    overload,
)

OUR_HEAD = b"http/1.1 503 service unavailable\r\ncontent-type: application/json\r\nretry-after: 1"
OUR_BODY = b'{"error":"slow is at capacity; retry later","reason":"overloaded"}'


def series(
    rate: float,
    seconds: float,
    accepted: float,
    latency: float,
    rejection: float = 0.001,
    kind: str = OURS,
) -> list[Answer]:
    """``rate`` requests a second for ``seconds``, the first ``accepted`` a
    second answered 200 after ``latency`` s, the rest rejected as ``kind``."""
    count = int(rate * seconds)
    good = int(accepted * seconds)
    return [
        Answer(i / rate, GOOD, latency, latency, 0.0)
        if i * good // count != (i + 1) * good // count
        else Answer(i / rate, kind, rejection, rejection, 0.0)
        for i in range(count)
    ]


def window(answers: list[Answer], name: str, rss: float = 300.0) -> Figures:
    return replace(figures(answers, name, 0, 10, len(answers) / 10), rss_mb=rss)


def test_carpools_503_is_told_from_uvicorns_and_from_one_without_retry_after() -> None:
    assert classify_503(OUR_HEAD, OUR_BODY) == OURS
    assert (
        classify_503(b"http/1.1 503 x\r\ncontent-type: text/plain", b"Service Unavailable") == BARE
    )
    without_retry = OUR_HEAD.replace(b"\r\nretry-after: 1", b"")
    assert classify_503(without_retry, OUR_BODY) == OTHER_503
    draining = OUR_BODY.replace(b"overloaded", b"shutting_down")
    assert classify_503(OUR_HEAD, draining) == OTHER_503


def test_the_overload_judge_passes_a_server_that_sheds_and_keeps_its_goodput() -> None:
    base = window(series(150, 10, 150, 0.080), "1x")
    ten = window(series(1500, 10, 190, 0.120), "10x")
    assert judge_answers([base, ten]) == []
    assert judge_overload(base, ten, bound_ms=200) == ([], [])


def test_the_overload_judge_fails_lost_500_bare_503_and_slow_or_collapsing_service() -> None:
    base = window(series(150, 10, 150, 0.080), "1x")
    collapsed = series(1500, 10, 60, 0.400, rejection=0.050, kind=BARE)
    collapsed[0] = Answer(0.0, LOST, math.inf, math.nan, 0.0)
    collapsed[1] = Answer(0.0, "status 500", 0.01, 0.01, 0.0)
    ten = window(collapsed, "10x", rss=400)
    failures = judge_answers([base, ten])
    assert any("lost" in f for f in failures)
    assert any("500" in f for f in failures)
    assert any("uvicorn bare" in f for f in failures)
    behaviour, speed = judge_overload(base, ten, bound_ms=200)
    assert any("not overloaded" in f for f in behaviour)  # no 503 of ours at 10x
    assert any("RSS" in f for f in behaviour)
    assert any("goodput" in f for f in speed)
    assert any("2.0 x" in f for f in speed)
    assert any("max queue wait" in f for f in speed)
    assert any("rejection p99" in f for f in speed)


def test_deadline_answers_are_accepted_outcomes_not_failures() -> None:
    answers = series(150, 10, 150, 0.080)
    answers[5] = Answer(answers[5].at, DEADLINE, 0.150, 0.150, 0.0)
    assert judge_answers([window(answers, "1x")]) == []


def test_the_recovery_judge_fails_rejections_a_deep_queue_and_a_stuck_cap() -> None:
    base = window(series(150, 10, 150, 0.080), "1x")
    recovered = window(series(75, 10, 75, 0.070), "after")
    assert judge_recovery(base, recovered, [0, 3, 8], [8, 8, 8], 8) == ([], [])
    still = window(series(75, 10, 70, 0.200), "after")
    behaviour, speed = judge_recovery(base, still, [0, 12], [8, 4], 8)
    assert any("rejections" in f for f in behaviour)
    assert any("queue depth 12" in f and "at the end" in f for f in behaviour)
    assert any("cap stuck" in f for f in behaviour)
    assert any("1.1 x" in f for f in speed)
    # a moment's deeper queue that has drained by the end: a speed figure only
    behaviour, speed = judge_recovery(base, recovered, [0, 10, 2], [8, 8, 8], 8)
    assert behaviour == []
    assert any("queue depth 10" in f for f in speed)
    assert judge_recovery(base, recovered, [], [], 8)[0]  # nothing sampled: not a pass


def test_the_health_judge_fails_a_live_probe_that_fails_or_is_slow_and_a_ready_503() -> None:
    good = [Probe(t, path, 200, 2.0) for t in range(60) for path in ("/live", "/ready")]
    assert judge_health(good) == ([], [])
    bad = [*good, Probe(61, "/live", 0, 2000.0), Probe(61, "/ready", 503, 1.0)]
    bad += [Probe(62 + t, "/live", 200, 150.0) for t in range(5)]
    behaviour, speed = judge_health(bad)
    assert any("live failed 1" in f for f in behaviour)
    assert any("ready failed 1" in f for f in behaviour)
    assert any("live probe p99" in f for f in speed)
    assert judge_health([])[0]


async def test_a_short_overload_run_sheds_in_json_loses_nothing_and_recovers() -> None:
    verdict = await overload("slow", phase_seconds=4, step_seconds=1.5)
    assert verdict.failures == [], verdict.failures
    one, _, ten, _ = verdict.phases
    assert ten.counts.get(OURS, 0) > ten.requests // 2  # 10x: most of it shed, by us
    assert ten.goodput_rps >= 0.5 * one.goodput_rps  # loosened from 0.9: see the docstring
    assert verdict.recovery.requests > 0
    assert verdict.probes >= 2 * 14  # live + ready, about once a second for 16 s
