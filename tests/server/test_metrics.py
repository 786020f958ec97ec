"""``server/metrics.py``: the plain histograms read as prometheus-client's do."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from server.metrics import _Histograms
from tests.servers import scrape


def test_a_value_on_a_bound_counts_in_that_bucket_and_buckets_are_cumulative() -> None:
    histograms = _Histograms("h_seconds", "A test histogram.", (0.001, 0.01, 1))
    registry = CollectorRegistry()
    registry.register(histograms)
    one = histograms.labels("m")
    for value in (0.001, 0.002, 0.5, 7.0):
        one.observe(value)
    histograms.labels("other")  # a model with nothing observed yet
    figures = scrape(generate_latest(registry).decode())
    assert figures['h_seconds_bucket{le="0.001",model="m"}'] == 1
    assert figures['h_seconds_bucket{le="0.01",model="m"}'] == 2
    assert figures['h_seconds_bucket{le="1.0",model="m"}'] == 3
    assert figures['h_seconds_bucket{le="+Inf",model="m"}'] == 4
    assert figures['h_seconds_count{model="m"}'] == 4
    assert figures['h_seconds_sum{model="m"}'] == 0.001 + 0.002 + 0.5 + 7.0
    assert figures['h_seconds_count{model="other"}'] == 0
