"""What a run measured: one ``Point`` per load level per server, plus the
offline limit and the answer checks, as plain data that goes to JSON as is."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.stats import Latency


@dataclass(slots=True)
class Point:
    """One load level against one server over one transport."""

    workload: str
    server: str
    transport: str  # http | ws
    mode: str  # closed | open
    concurrency: int | None = None
    offered_rps: float | None = None
    load_fraction: float | None = None  # of the reference capacity (open loop)
    status: str = "ok"  # ok | unavailable | error
    duration_s: float = 0.0
    requests: int = 0
    ok: int = 0
    failed: int = 0
    wrong: int = 0
    timeouts: int = 0
    rps: float = 0.0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    mean_ms: float = math.nan
    send_lag_p50_ms: float | None = None
    send_lag_p99_ms: float | None = None
    connections: int | None = None  # open loop: the most the generator had open at once
    server_cpu: float = math.nan  # cores busy during the point (1.0 = the whole server core)
    server_cpu_s: float = math.nan  # CPU seconds of the server's process tree over the point
    client_cpu: float = math.nan
    overloaded: bool = False  # offered more than this server's own capacity
    idle_wait_s: float = 0.0
    batch_histogram: dict[str, int] | None = None
    mean_batch: float | None = None
    tokens: int | None = None
    padded_tokens: int | None = None
    padding_waste: float | None = None
    reasons: list[str] = field(default_factory=list)

    def set_latency(self, latency: Latency) -> None:
        self.p50_ms, self.p90_ms, self.p99_ms = latency.p50, latency.p90, latency.p99
        self.max_ms, self.mean_ms = latency.max, latency.mean

    @property
    def label(self) -> str:
        return f"{self.server} (WS)" if self.transport == "ws" else self.server

    @property
    def bad(self) -> int:
        return bad_answers(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


@dataclass(slots=True)
class Check:
    """The answers to the sample requests, compared in full with the offline model's."""

    workload: str
    server: str
    checked: int = 0
    wrong: int = 0
    reasons: list[str] = field(default_factory=list)


def bad_answers(point: dict[str, Any]) -> int:
    """The answers of a point that make the run fail.

    Any wrong answer. Any failed one (an error status, a broken connection)
    unless the server was offered more than its own capacity, where shedding
    load is the right answer. Timeouts in a closed loop, which never offers
    more than its concurrency: an answer 10 s late there means a stuck server.
    In the open loop a late answer is queueing, the very thing measured: it
    counts as infinitely slow in the percentiles, and does not fail the run.
    """
    failed = 0 if point["overloaded"] else point["failed"]
    late = point["timeouts"] if point["mode"] == "closed" else 0
    return int(point["wrong"] + failed + late)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: NaN -> null, infinity -> "inf"."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf"
    return value


def number(value: Any) -> float:
    """A figure read back from the JSON: null -> NaN, "inf" -> infinity."""
    if value is None:
        return math.nan
    if value == "inf":
        return math.inf
    return float(value)
