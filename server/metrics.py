"""Prometheus metrics, per model.

Figures the batcher already counts (queue depth, in flight, batches, dropped
items) are read when /metrics is scraped, so they cost the hot path nothing.
Histograms are plain counts (``_Histogram``), observed once per batch
(the queue wait once per request in it). Requests are counted per request
in a plain dict (an integer add, where a prometheus-client counter takes a
lock), which ``/metrics`` reads as ``carpool_requests_total``.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from batching import BatchListener
from server.models import ModelSet

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)


class Metrics:
    def __init__(self, models: ModelSet) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # (model, outcome) -> requests answered; counted on the event loop only
        self.requests: dict[tuple[str, str], int] = {}
        self.registry.register(_RequestCollector(self.requests))
        self.batch_size = _Histograms(
            "carpool_batch_size", "Items per forward pass.", _SIZE_BUCKETS
        )
        self.queue_seconds = _Histograms(
            "carpool_queue_seconds",
            "Time a request waited in the queue before its first batch ran.",
            _SECONDS_BUCKETS,
        )
        self.compute_seconds = _Histograms(
            "carpool_compute_seconds", "Time one batch took in the worker thread.", _SECONDS_BUCKETS
        )
        for histograms in (self.batch_size, self.queue_seconds, self.compute_seconds):
            self.registry.register(histograms)
        self.registry.register(_BatcherCollector(models))
        # process_resident_memory_bytes, process_open_fds, ...: what a soak
        # (RELIABILITY R24) and an operator watch for leaks
        ProcessCollector(registry=self.registry)
        # python_gc_collections_total{generation}: collections that grow with load
        # mean in-flight objects are being walked (server/uvicorn_internals/serving.py)
        GCCollector(registry=self.registry)
        self.registry.register(_LoopCollector())

    def count(self, model: str, outcome: str) -> None:
        key = (model, outcome)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def listener(self, model: str) -> BatchListener:
        size = self.batch_size.labels(model)
        queue = self.queue_seconds.labels(model)
        compute = self.compute_seconds.labels(model)

        def on_batch(items: int, seconds: float, waits: list[float]) -> None:
            size.observe(items)
            compute.observe(seconds)
            for wait in waits:
                queue.observe(wait)

        return on_batch

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Histogram:
    """One histogram's bucket counts and sum, observed on the event loop
    with a bisect and two adds (prometheus-client's takes a lock per
    observation: per request, for the queue wait)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class _Histograms(Collector):
    """A histogram per model, exported as prometheus-client exports one."""

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(map(float, bounds))
        self._labels = [*map(floatToGoString, self.bounds), "+Inf"]
        self._by_model: dict[str, _Histogram] = {}

    def labels(self, model: str) -> _Histogram:
        found = self._by_model.get(model)
        if found is None:
            found = self._by_model[model] = _Histogram(self.bounds)
        return found

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        for model, histogram in list(self._by_model.items()):
            cumulative = list(accumulate(histogram.counts))
            family.add_metric(
                [model], list(zip(self._labels, cumulative, strict=True)), histogram.total
            )
        yield family


class _RequestCollector(Collector):
    def __init__(self, counts: dict[tuple[str, str], int]) -> None:
        self.counts = counts

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "carpool_requests", "Infer requests answered, by outcome.", labels=["model", "outcome"]
        )
        for (model, outcome), count in list(self.counts.items()):
            family.add_metric([model, outcome], count)
        yield family


class _LoopCollector(Collector):
    """Tasks alive on the event loop that serves /metrics: a count that must
    come back to its baseline after load (a leak of tasks otherwise)."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # rendered outside the event loop
            return
        yield GaugeMetricFamily("carpool_event_loop_tasks", "asyncio tasks alive.", value=tasks)


class _BatcherCollector(Collector):
    def __init__(self, models: ModelSet) -> None:
        self.models = models

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "carpool_queue_depth", "Items waiting in the queue.", labels=["model"]
        )
        flight = GaugeMetricFamily(
            "carpool_in_flight", "Items in a running batch.", labels=["model"]
        )
        ready = GaugeMetricFamily(
            "carpool_model_ready", "1 when the model accepts requests.", labels=["model"]
        )
        cap = GaugeMetricFamily(
            "carpool_batch_cap",
            "Most items the next batch may take (below max_batch_size while capped after OOM).",
            labels=["model"],
        )
        batches = CounterMetricFamily("carpool_batches", "Forward passes run.", labels=["model"])
        items = CounterMetricFamily("carpool_items", "Items computed.", labels=["model"])
        failed = CounterMetricFamily(
            "carpool_failed_batches", "Batches whose forward pass failed.", labels=["model"]
        )
        counters = {
            "forward_calls": CounterMetricFamily(
                "carpool_forward_calls",
                "Forward passes, counting the reruns of split failing batches.",
                labels=["model"],
            ),
            "isolated_items": CounterMetricFamily(
                "carpool_isolated_items",
                "Items that failed alone after their batch was split (poison or out of memory).",
                labels=["model"],
            ),
            "transient_errors": CounterMetricFamily(
                "carpool_transient_errors",
                "Failed batches whose split halves all succeeded.",
                labels=["model"],
            ),
            "loop_errors": CounterMetricFamily(
                "carpool_batcher_loop_errors",
                "Errors the batch loop caught and survived (0 unless carpool has a bug).",
                labels=["model"],
            ),
            "loop_restarts": CounterMetricFamily(
                "carpool_batcher_loop_restarts",
                "Batch loops the watchdog restarted on a fresh worker thread after a "
                "BaseException (SystemExit, KeyboardInterrupt, ...) escaped them.",
                labels=["model"],
            ),
            "hangs": CounterMetricFamily(
                "carpool_hung_forwards",
                "Forward passes given up on after hang_timeout_ms (their callers got 504).",
                labels=["model"],
            ),
        }
        stuck = GaugeMetricFamily(
            "carpool_hung_forwards_running",
            "Given-up forward passes whose thread has not returned (the model is not ready).",
            labels=["model"],
        )
        dropped = CounterMetricFamily(
            "carpool_dropped_items", "Items never computed, by reason.", labels=["model", "reason"]
        )
        kind = CounterMetricFamily(
            "carpool_model",
            "Counters a model kind keeps (e.g. tokens).",
            labels=["model", "figure"],
        )
        for model in self.models:
            name, stats = model.config.name, model.batcher.stats
            depth.add_metric([name], stats.queued)
            flight.add_metric([name], stats.in_flight)
            ready.add_metric([name], 1.0 if model.ready else 0.0)
            cap.add_metric([name], model.batcher.batch_cap)
            stuck.add_metric([name], stats.hung_forwards)
            batches.add_metric([name], stats.batches)
            items.add_metric([name], stats.items)
            failed.add_metric([name], stats.failed_batches)
            for field, family in counters.items():
                family.add_metric([name], getattr(stats, field))
            for reason, count in stats.dropped.items():
                dropped.add_metric([name, reason], count)
            for figure, value in model.kind.figures().items():
                kind.add_metric([name, figure], value)
        yield cap
        yield stuck
        yield from (depth, flight, ready, batches, items, failed, *counters.values(), dropped, kind)
