"""Latency statistics: nearest-rank percentiles over what was measured.

Nearest rank never invents a latency that no request had, and a request that
never got an answer counts as infinitely slow: if more than 1% of requests
timed out, p99 is infinite, which is the honest figure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of sorted ``values`` (NaN if empty)."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is outside (0, 100]")
    if not values:
        return math.nan
    rank = math.ceil(p / 100 * len(values))
    return values[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True)
class Latency:
    """Milliseconds; ``inf`` where timed-out requests reach that rank."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Latency:
        ordered = sorted(seconds)
        finite = [v for v in ordered if math.isfinite(v)]
        return cls(
            count=len(ordered),
            p50=percentile(ordered, 50) * 1000,
            p90=percentile(ordered, 90) * 1000,
            p99=percentile(ordered, 99) * 1000,
            max=(ordered[-1] * 1000) if ordered else math.nan,
            mean=(sum(finite) / len(finite) * 1000) if finite else math.nan,
        )


def fmt_ms(value: float | None) -> str:
    """A latency for a table: ``0.41``, ``12.3``, ``1,204``, ``timeout``, ``-``."""
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return "timeout"
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"
