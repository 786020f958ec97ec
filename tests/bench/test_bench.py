"""The benchmark harness' own logic: percentiles, the open-loop schedule and
clock, answer checking, the loopback-only rule, reading wrk and /metrics, the
floor's answers and each server's CPU per request.

Pure and fast: no server is started and no load is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from typing import Any

import orjson
import pytest

from bench import costs, goals, metrics, wrk
from bench.client import fetch
from bench.loadgen import PENDING, TIMEOUT, HttpPool, Recorder, drive
from bench.loopback import NotLoopback, require_loopback, require_loopback_url
from bench.peers.floor_app import Floor
from bench.plan import Plan
from bench.schedule import poisson_schedule
from bench.stats import Latency, fmt_ms, percentile
from bench.workloads import FAILED, OK, WRONG, Embed, Tiny
from bench.wsload import closed_loop

# -- percentiles -----------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 90) == 90
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.0


def test_percentile_of_nothing_is_nan_and_bad_ranks_are_refused() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 0)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_latency_counts_unanswered_requests_as_infinitely_slow() -> None:
    latency = Latency.of([0.001] * 98 + [math.inf] * 2)
    assert latency.p50 == pytest.approx(1.0)
    assert math.isinf(latency.p99)
    assert latency.mean == pytest.approx(1.0)  # the mean is of answered requests
    assert fmt_ms(latency.p99) == "timeout"
    assert fmt_ms(0.4321) == "0.43"
    assert fmt_ms(1234.0) == "1,234"


# -- the open-loop schedule --------------------------------------------------


def test_schedule_is_seeded() -> None:
    assert poisson_schedule(500, 2, seed=1) == poisson_schedule(500, 2, seed=1)
    assert poisson_schedule(500, 2, seed=1) != poisson_schedule(500, 2, seed=2)


def test_schedule_is_poisson_at_the_asked_rate() -> None:
    rate, duration = 1000.0, 20.0
    times = poisson_schedule(rate, duration, seed=7)
    assert all(0 <= t < duration for t in times)
    assert times == sorted(times)
    assert len(times) / duration == pytest.approx(rate, rel=0.03)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # exponential gaps: mean 1/rate, and standard deviation equal to the mean
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)


def test_schedule_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive"):
        poisson_schedule(0, 1, seed=1)


# -- latency from the intended send time -------------------------------------


def test_latency_counts_from_the_intended_time_not_the_send_time() -> None:
    recorder = Recorder(1)
    recorder.intended[0], recorder.sent[0] = 10.0, 10.5  # the generator was 0.5 s late
    recorder.finish(0, OK, 11.0)
    assert recorder.latencies() == [pytest.approx(1.0)]
    assert recorder.send_lags() == [pytest.approx(0.5)]


def test_failed_and_timed_out_requests_count_as_infinitely_slow() -> None:
    recorder = Recorder(3)
    for index in range(3):
        recorder.intended[index] = 0.0
    recorder.finish(0, OK, 0.002)
    recorder.finish(1, FAILED, 0.001, "status 503")
    recorder.finish(2, TIMEOUT, 5.0, "no answer")
    recorder.finish(2, OK, 6.0)  # a late answer does not change the verdict
    assert recorder.latencies() == [pytest.approx(0.002), math.inf, math.inf]
    assert recorder.count(TIMEOUT) == 1
    assert recorder.reasons == ["status 503", "no answer"]
    assert recorder.pending == 0


async def test_a_late_generator_shows_in_send_lag_and_in_latency() -> None:
    schedule = [0.0, 0.001, 0.002]
    recorder = Recorder(len(schedule))

    def dispatch(index: int) -> None:
        if index == 0:
            time.sleep(0.05)  # the generator stalls: the next two leave late
        recorder.finish(index, OK, time.perf_counter())  # answered at once

    await drive(schedule, dispatch, recorder)
    lags, latencies = recorder.send_lags(), recorder.latencies()
    assert lags[0] < 0.01
    assert lags[1] >= 0.045
    assert latencies[1] >= lags[1] >= 0.045
    assert latencies[2] >= 0.045
    assert recorder.pending == 0


async def test_requests_leave_at_their_intended_times() -> None:
    schedule = [0.0, 0.02, 0.04]
    recorder = Recorder(len(schedule))
    sent: list[float] = []

    def dispatch(index: int) -> None:
        sent.append(time.perf_counter())
        recorder.finish(index, OK, time.perf_counter())

    start = await drive(schedule, dispatch, recorder)
    for offset, at in zip(schedule, sent, strict=True):
        assert at >= start + offset
    assert sent[2] - sent[0] == pytest.approx(0.04, abs=0.01)
    assert all(outcome != PENDING for outcome in recorder.outcome)


# -- judging answers -----------------------------------------------------------


def _tiny() -> Tiny:
    probabilities = [0.0] * 10
    probabilities[3] = 0.9
    probabilities[5] = 0.1
    reference = {
        "labels": [3, 1],
        "runner_up": [5, 7],
        "margins": [0.8, 0.00001],  # item 1 is a near tie: 1 and 7 are both right
        "probabilities": [probabilities, probabilities],
    }
    return Tiny([[0] * 64, [1] * 64], reference)


def _label_answer(request_id: str, label: int, extra: list[dict[str, Any]] | None = None) -> bytes:
    outputs = [
        *(extra or []),
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [label]},
    ]
    return orjson.dumps(
        {"model_name": "digits", "model_version": "1", "id": request_id, "outputs": outputs}
    )


def test_the_right_tiny_answer_passes() -> None:
    workload = _tiny()
    assert workload.judge(0, "0", 200, _label_answer("0", 3)) == (OK, "")
    assert workload.judge(1, "1", 200, _label_answer("1", 7))[0] == OK  # the near tie


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, _label_answer("0", 4), WRONG),  # the wrong label
        (200, _label_answer("9", 3), WRONG),  # the answer to another request
        (200, b'{"outputs": []}', WRONG),  # no id, no label
        (200, b"not json", WRONG),
        (
            200,
            orjson.dumps(
                {
                    "id": "0",
                    "outputs": [
                        {"name": "label", "datatype": "INT64", "shape": [2], "data": [3, 3]}
                    ],
                }
            ),
            WRONG,
        ),
        (500, b'{"error": "the model failed"}', FAILED),
        (503, b'{"error": "queue full"}', FAILED),
    ],
)
def test_a_wrong_or_failed_tiny_answer_is_caught(status: int, body: bytes, verdict: int) -> None:
    got, why = _tiny().judge(0, "0", status, body)
    assert got == verdict
    assert why


def test_the_full_check_compares_probabilities() -> None:
    workload = _tiny()
    right = list(workload.reference["probabilities"][0])
    off = [*right[:3], right[3] - 0.01, *right[4:]]

    def answer(probabilities: list[float]) -> bytes:
        extra = [
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": probabilities}
        ]
        return _label_answer("c", 3, extra)

    assert workload.judge(0, "c", 200, answer(right), full=True) == (OK, "")
    verdict, why = workload.judge(0, "c", 200, answer(off), full=True)
    assert verdict == WRONG
    assert "probabilities" in why


def test_wrks_substring_check_matches_carpools_answer_format() -> None:
    workload = _tiny()
    answer = _label_answer("0", 3).decode()
    assert workload.lua_expectation(0) in answer
    assert workload.lua_expectation(0) not in _label_answer("0", 4).decode()
    assert workload.lua_expectation(1) in _label_answer("1", 7).decode()  # a near tie: shape only
    assert workload.body(0, "0").startswith(b'{"id":"0","inputs":[{"name":"pixels"')


def _embed(vector: list[float]) -> tuple[Embed, list[float]]:
    return Embed(["A sentence."], {"embeddings": {"0": vector}}), vector


def _embedding_answer(request_id: str, data: list[float], dim: int = 384) -> bytes:
    output = {"name": "embedding", "datatype": "FP32", "shape": [1, dim], "data": data}
    return orjson.dumps({"id": request_id, "outputs": [output]})


def test_embeddings_are_checked_for_shape_norm_and_direction() -> None:
    unit = [0.0] * 384
    unit[0] = 1.0
    workload, _ = _embed(unit)
    assert workload.judge(0, "0", 200, _embedding_answer("0", unit), full=True) == (OK, "")
    assert workload.lua_expectation(0) in _embedding_answer("0", unit).decode()

    doubled = [2 * v for v in unit]
    assert workload.judge(0, "0", 200, _embedding_answer("0", doubled))[0] == WRONG

    short = unit[:383]
    assert workload.judge(0, "0", 200, _embedding_answer("0", short, dim=383))[0] == WRONG

    elsewhere = [0.0] * 384
    elsewhere[1] = 1.0  # norm 1, but not the offline model's direction
    assert workload.judge(0, "0", 200, _embedding_answer("0", elsewhere))[0] == OK
    verdict, why = workload.judge(0, "0", 200, _embedding_answer("0", elsewhere), full=True)
    assert verdict == WRONG
    assert "cosine" in why


# -- loopback only -------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.4.5.6", "::1", "[::1]", "localhost"])
def test_loopback_hosts_are_allowed(host: str) -> None:
    assert require_loopback(host) == host


@pytest.mark.parametrize(
    "host", ["10.0.0.1", "192.168.1.10", "172.16.0.1", "8.8.8.8", "0.0.0.0", "example.com", ""]
)
def test_other_hosts_are_refused(host: str) -> None:
    with pytest.raises(NotLoopback):
        require_loopback(host)


def test_urls_are_judged_by_their_host() -> None:
    assert require_loopback_url("http://127.0.0.1:8000/v2")
    assert require_loopback_url("ws://[::1]:9000/v2/models/digits/stream")
    for url in ("http://10.1.2.3:8000/", "ws://example.com/stream", "http:///nohost"):
        with pytest.raises(NotLoopback):
            require_loopback_url(url)


async def test_every_load_generator_refuses_other_hosts() -> None:
    workload = _tiny()
    with pytest.raises(NotLoopback):
        HttpPool("10.0.0.1", 80, workload, Recorder(1), 8, 1.0)
    with pytest.raises(NotLoopback):
        await fetch("192.168.0.1", 80, "GET", "/")
    with pytest.raises(NotLoopback):
        await closed_loop("ws://10.0.0.1:80/v2/models/digits/stream", workload, 1, 0.1, 0.1)
    runner = object.__new__(wrk.Wrk)  # no wrk binary needed: the guard comes first
    runner.binary, runner.script = "/bin/false", "/dev/null"
    with pytest.raises(NotLoopback):
        await runner.run("8.8.8.8", 80, 1, 1, 1)


# -- wrk -----------------------------------------------------------------------


def test_wrk_output_is_parsed() -> None:
    output = (
        "Running 5s test @ http://127.0.0.1:8000/\n  1 threads and 32 connections\n"
        'WRK_RESULT {"requests":5000,"duration_us":5000000,"connect":0,"read":1,"write":0,'
        '"timeout":2,"checked":4990,"wrong":3,"non200":10,"mean_us":812.5,"max_us":9000,'
        '"p50_us":700,"p90_us":1500,"p99_us":4000}\n'
        'WRK_FIRST_WRONG {"id":"1","outputs":[]}\n'
    )
    result = wrk.parse(output)
    assert result.ok == 4987
    assert result.rps == pytest.approx(997.4)
    assert (result.wrong, result.non200, result.socket_errors, result.timeouts) == (3, 10, 1, 2)
    assert result.latency.p50 == pytest.approx(0.7)
    assert result.latency.p99 == pytest.approx(4.0)
    assert result.first_wrong == '{"id":"1","outputs":[]}'
    with pytest.raises(RuntimeError, match="no result line"):
        wrk.parse("wrk: connection refused\n")


def test_lua_strings_are_escaped() -> None:
    assert wrk.lua_string('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert wrk.lua_string("é\n") == '"\\195\\169\\010"'
    script = wrk.lua_script(_tiny())
    assert script.count("wrk.format") == 1
    assert '["1"]' in script


# -- /metrics ------------------------------------------------------------------

_BEFORE = """
carpool_batch_size_bucket{le="1.0",model="minilm"} 2.0
carpool_batch_size_bucket{le="2.0",model="minilm"} 2.0
carpool_batch_size_bucket{le="4.0",model="minilm"} 3.0
carpool_batch_size_bucket{le="+Inf",model="minilm"} 3.0
carpool_batches_total{model="minilm"} 3.0
carpool_items_total{model="minilm"} 6.0
carpool_model_total{figure="tokens",model="minilm"} 100.0
carpool_model_total{figure="padded_tokens",model="minilm"} 120.0
"""
_AFTER = """
carpool_batch_size_bucket{le="1.0",model="minilm"} 3.0
carpool_batch_size_bucket{le="2.0",model="minilm"} 5.0
carpool_batch_size_bucket{le="4.0",model="minilm"} 9.0
carpool_batch_size_bucket{le="+Inf",model="minilm"} 9.0
carpool_batches_total{model="minilm"} 9.0
carpool_items_total{model="minilm"} 26.0
carpool_model_total{figure="tokens",model="minilm"} 400.0
carpool_model_total{figure="padded_tokens",model="minilm"} 520.0
"""


def test_a_points_batches_are_the_difference_of_two_scrapes() -> None:
    before = metrics.ModelFigures.of(metrics.parse(_BEFORE), "minilm")
    after = metrics.ModelFigures.of(metrics.parse(_AFTER), "minilm")
    figures = metrics.difference(before, after)
    assert figures.histogram == {"1": 1, "2": 2, "4": 3, "inf": 0}
    assert (figures.batches, figures.items) == (6, 20)
    assert figures.mean_batch == pytest.approx(20 / 6)
    assert figures.padding_waste == pytest.approx(1 - 300 / 400)


# -- what fails a run ------------------------------------------------------------


def _point(**fields: Any) -> dict[str, Any]:
    point: dict[str, Any] = {
        "workload": "tiny",
        "server": "carpool",
        "transport": "http",
        "mode": "open",
        "status": "ok",
        "concurrency": None,
        "offered_rps": 100.0,
        "load_fraction": 0.8,
        "wrong": 0,
        "failed": 0,
        "timeouts": 0,
        "overloaded": False,
        "reasons": [],
        "rps": 100.0,
        "p99_ms": 2.0,
    }
    return point | fields


def test_wrong_answers_always_fail_a_run_failures_only_below_capacity() -> None:
    doc: dict[str, Any] = {
        "points": [
            _point(),
            _point(server="flask", overloaded=True, timeouts=40, failed=3, p99_ms="inf"),
            _point(server="mosec", timeouts=2, p99_ms="inf"),  # open loop: late, not failed
        ],
        "checks": [],
        "plan": {"workloads": ["tiny"]},
    }
    assert goals.failures(doc) == []
    doc["points"].append(_point(server="mosec", overloaded=True, wrong=1, reasons=["label 4"]))
    doc["points"].append(_point(server="fastapi", failed=2, reasons=["status 500"]))
    doc["points"].append(_point(server="flask", mode="closed", concurrency=8, timeouts=1))
    found = goals.failures(doc)
    assert len(found) == 3
    assert "mosec" in found[0]
    assert "fastapi" in found[1]
    assert "flask http tiny closed c=8" in found[2]


def test_the_open_loop_goal_compares_p99_at_the_same_rate() -> None:
    doc: dict[str, Any] = {
        "points": [
            _point(),
            _point(server="flask", p99_ms="inf"),
            _point(server="mosec", p99_ms=15.0),
        ],
        "plan": {"workloads": ["tiny"]},
        "checks": [],
    }
    goal = next(g for g in goals.evaluate(doc) if g.name.startswith("tiny: open loop"))
    assert goal.met is True
    assert "flask timeout" in goal.measured
    doc["points"].append(_point(server="fastapi", p99_ms=1.5))
    goal = next(g for g in goals.evaluate(doc) if g.name.startswith("tiny: open loop"))
    assert goal.met is False


def _goal(doc: dict[str, Any], prefix: str) -> goals.Goal:
    return next(g for g in goals.evaluate(doc) if g.name.startswith(prefix))


def _closed_point(
    server: str, concurrency: int, rps: float, transport: str = "http"
) -> dict[str, Any]:
    return _point(server=server, mode="closed", transport=transport, concurrency=concurrency,
                  load_fraction=None, rps=rps, requests=1000, ok=1000)  # fmt: skip


def test_a_crowd_in_open_loop_must_get_every_answer_within_the_p99_bound() -> None:
    doc: dict[str, Any] = {"plan": {"workloads": ["tiny"]}, "checks": []}
    doc["points"] = [_point(requests=500, ok=500, p99_ms=9.0, connections=40)]
    goal = _goal(doc, "tiny: a crowd")
    assert goal.met is True
    assert "40 connections" in goal.measured
    doc["points"] = [_point(requests=500, ok=499, p99_ms=9.0, connections=40)]
    assert _goal(doc, "tiny: a crowd").met is False  # one lost, timed out or refused
    doc["points"] = [_point(requests=500, ok=500, p99_ms=15.5, connections=40)]
    assert _goal(doc, "tiny: a crowd").met is False


def test_flat_in_connections_compares_1000_with_128() -> None:
    doc: dict[str, Any] = {"plan": {"workloads": ["tiny"]}, "checks": []}
    doc["points"] = [
        _closed_point("carpool", 128, 20_000.0),
        _closed_point("carpool", 1000, 16_000.0),
    ]
    goal = _goal(doc, "tiny: flat in connections")
    assert goal.met is True
    assert "0.80x" in goal.measured
    doc["points"][1]["rps"] = 15_000.0
    assert _goal(doc, "tiny: flat in connections").met is False
    doc["points"].pop()
    assert _goal(doc, "tiny: flat in connections").met is None


def test_the_websocket_goal_is_against_mosecs_best_http() -> None:
    doc: dict[str, Any] = {"plan": {"workloads": ["tiny"]}, "checks": []}
    doc["points"] = [
        _closed_point("mosec", 128, 40_000.0),
        _closed_point("carpool", 128, 50_000.0, "ws"),
    ]
    assert _goal(doc, "WebSocket: against mosec").met is True
    doc["points"][1]["rps"] = 49_000.0
    goal = _goal(doc, "WebSocket: against mosec")
    assert goal.met is False
    assert "1.23x" in goal.measured
    assert "floor" not in goal.measured  # not measured: not said
    doc["points"].append(_closed_point("floor", 128, 60_000.0, "ws"))
    assert "the floor's WS 60,000 msg/s = 1.50x" in _goal(doc, "WebSocket: against mosec").measured


# -- the floor and the CPU per request -------------------------------------------


def _floor_for(workload: Tiny) -> Floor:
    ref = workload.reference
    return Floor(
        {
            tuple(image): (ref["probabilities"][i], ref["labels"][i])
            for i, image in enumerate(workload.items)
        }
    )


async def _call(app: Floor, scope: dict[str, Any], messages: list[dict[str, Any]]) -> list[Any]:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def _post(
    app: Floor, body: bytes, path: str = "/v2/models/digits/infer"
) -> tuple[int, bytes]:
    scope = {"type": "http", "method": "POST", "path": path}
    # the body in two chunks: the floor reads all of it
    half = len(body) // 2
    messages = [
        {"type": "http.request", "body": body[:half], "more_body": True},
        {"type": "http.request", "body": body[half:], "more_body": False},
    ]
    start, answer = await _call(app, scope, messages)
    headers = dict(start["headers"])
    assert headers[b"content-length"] == str(len(answer["body"])).encode()
    assert headers[b"content-type"] == b"application/json"
    return start["status"], answer["body"]


async def test_the_floor_answers_a_tiny_request_as_carpool_does() -> None:
    workload = _tiny()
    floor = _floor_for(workload)
    status, answer = await _post(floor, workload.body(0, "7"))
    assert workload.judge(0, "7", status, answer) == (OK, "")
    assert answer == _label_answer("7", 3)  # carpool's keys, in carpool's order
    status, answer = await _post(floor, workload.body(1, "c", full=True))
    assert workload.judge(1, "c", status, answer, full=True) == (OK, "")


async def test_the_floor_refuses_what_it_cannot_answer() -> None:
    workload = _tiny()
    floor = _floor_for(workload)
    unknown = Tiny([[2] * 64], workload.reference).body(0, "0")
    assert (await _post(floor, unknown))[0] == 400
    assert (await _post(floor, b"not json"))[0] == 400
    assert (await _post(floor, workload.body(0, "0"), path="/v2/models/minilm/infer"))[0] == 404


async def test_the_floor_completes_its_lifespan() -> None:
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent = await _call(_floor_for(_tiny()), {"type": "lifespan"}, messages)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_the_floor_answers_every_stream_message_with_its_id() -> None:
    workload = _tiny()
    messages: list[dict[str, Any]] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": workload.body(0, "a").decode()},
        {"type": "websocket.receive", "text": workload.body(1, "b", full=True).decode()},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        for _ in range(3):
            await asyncio.sleep(0)  # the writer sends what was posted before the next
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/v2/models/digits/stream"}
    await _floor_for(workload)(scope, receive, send)
    assert sent[0] == {"type": "websocket.accept"}
    answers = [orjson.loads(m["text"]) for m in sent[1:]]
    assert [a["id"] for a in answers] == ["a", "b"]
    assert workload.judge_doc(0, "a", answers[0]) == (OK, "")
    assert workload.judge_doc(1, "b", answers[1], full=True) == (OK, "")


async def test_the_floor_refuses_a_stream_on_another_path() -> None:
    sent = await _call(
        _floor_for(_tiny()), {"type": "websocket", "path": "/v2/models/minilm/stream"}, []
    )
    assert sent == [{"type": "websocket.close"}]


def test_the_floor_is_planned_only_for_the_workload_it_serves() -> None:
    plan = Plan.quick_run().only(("embed",), ("floor",))
    assert plan.planned_seconds() == plan.offline_estimate()
    assert Plan.quick_run().only(("tiny",), ("floor",)).planned_seconds() > plan.offline_estimate()


def _closed(server: str, rps: float, cpu_s: float | None, requests: int, **fields: Any) -> Any:
    return _point(
        server=server, mode="closed", concurrency=32, load_fraction=None, offered_rps=None,
        rps=rps, server_cpu_s=cpu_s, requests=requests,
    ) | fields  # fmt: skip


def _cost_doc(*points: dict[str, Any]) -> dict[str, Any]:
    return {"points": list(points), "plan": {"workloads": ["tiny"]}, "checks": []}


def test_cpu_per_request_is_read_at_each_servers_best_closed_loop_point() -> None:
    doc = _cost_doc(
        _closed("carpool", 30_000, 1.2, 60_000, concurrency=8),
        _closed("carpool", 35_000, 2.1, 70_000),  # the best: 30 us each
        _closed("carpool", 90_000, 9.9, 90_000, transport="ws"),  # not HTTP
        _closed("floor", 40_000, 2.0, 80_000),  # 25 us each
        _closed("mosec", 20_000, 2.0, 40_000),  # 50 us each
    )
    carpool = costs.cost(doc, "tiny", "carpool")
    assert carpool is not None
    assert carpool.concurrency == 32
    assert carpool.us_per_request == pytest.approx(30.0)
    rows = {row["server"]: row for row in costs.summary(doc)["tiny"]}
    assert list(rows) == ["carpool", "floor", "mosec"]
    assert rows["carpool"]["us_per_request"] == pytest.approx(30.0)
    assert rows["carpool"]["vs_floor"] == pytest.approx(1.2)
    assert rows["mosec"]["vs_floor"] == pytest.approx(2.0)
    assert rows["floor"]["vs_floor"] == pytest.approx(1.0)


def test_cpu_per_request_without_cpu_seconds_or_a_floor_is_unknown() -> None:
    doc = _cost_doc(_closed("carpool", 35_000, None, 70_000), _closed("mosec", 1, 1.0, 0))
    rows = {row["server"]: row for row in costs.summary(doc)["tiny"]}
    assert rows["carpool"]["us_per_request"] is None
    assert rows["mosec"]["us_per_request"] is None
    assert rows["mosec"]["vs_floor"] is None


def _floor_goal(doc: dict[str, Any]) -> goals.Goal:
    return next(g for g in goals.evaluate(doc) if g.name == "tiny HTTP: CPU per request")


def test_the_floor_goal_allows_carpool_at_most_1_4_floors() -> None:
    floor = _closed("floor", 40_000, 2.0, 80_000)  # 25 us each
    met = _floor_goal(_cost_doc(floor, _closed("carpool", 30_000, 2.1, 60_000)))  # 35 us
    assert met.met is True
    assert "1.40x" in met.measured
    missed = _floor_goal(_cost_doc(floor, _closed("carpool", 30_000, 2.2, 60_000)))
    assert missed.met is False
    with_mosec = _cost_doc(floor, _closed("carpool", 1, 1.0, 1), _closed("mosec", 1, 2.0, 40_000))
    assert "mosec 50.0 µs = 2.00x" in _floor_goal(with_mosec).measured
    assert _floor_goal(_cost_doc(_closed("carpool", 30_000, 2.1, 60_000))).met is None
