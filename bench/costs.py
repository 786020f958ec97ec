"""What a request costs the server's CPU, set against the floor's.

The floor (``bench/peers/floor_app.py``) is the least a Python server on
carpool's HTTP stack can spend on a tiny request: uvicorn, httptools and
uvloop, an orjson parse and an orjson answer, nothing else. Everything
carpool spends above it is its own: routing, validation, the queue, the
batch, the model. A server's cost is read at its best closed-loop HTTP point,
where its core is busiest and what it spends while idle (timers, the loop
waking) weighs least: the CPU seconds of its process tree over the point,
divided by the requests answered in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bench.results import number

FLOOR = "floor"
Doc = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Cost:
    """One server's CPU per request at its best closed-loop HTTP point."""

    server: str
    concurrency: int | None
    rps: float
    server_cpu_s: float
    requests: int

    @property
    def us_per_request(self) -> float:
        """Microseconds of server CPU per answered request; NaN if unmeasured."""
        if not self.requests or math.isnan(self.server_cpu_s):
            return math.nan
        return self.server_cpu_s / self.requests * 1e6

    def times(self, other: Cost | None) -> float:
        """How many times ``other``'s CPU per request this one spends; NaN if unknown."""
        if other is None:
            return math.nan
        theirs = other.us_per_request
        return self.us_per_request / theirs if theirs > 0 else math.nan


def best_point(doc: Doc, workload: str, server: str) -> dict[str, Any] | None:
    """The server's closed-loop HTTP point with the most correct answers per second."""
    points = [
        p
        for p in doc["points"]
        if p.get("status") == "ok" and p["workload"] == workload and p["server"] == server
        and p["transport"] == "http" and p["mode"] == "closed"
    ]  # fmt: skip
    return max(points, key=lambda p: number(p["rps"]), default=None)


def cost(doc: Doc, workload: str, server: str) -> Cost | None:
    point = best_point(doc, workload, server)
    if point is None:
        return None
    return Cost(
        server=server,
        concurrency=point["concurrency"],
        rps=number(point["rps"]),
        # results written before the CPU seconds were kept have none
        server_cpu_s=number(point.get("server_cpu_s")),
        requests=int(point["requests"]),
    )


def costs(doc: Doc, workload: str) -> list[Cost]:
    """Every server's cost on ``workload``, in the order the servers ran."""
    found = []
    for server in dict.fromkeys(p["server"] for p in doc["points"]):
        measured = cost(doc, workload, server)
        if measured is not None:
            found.append(measured)
    return found


def summary(doc: Doc) -> dict[str, list[dict[str, Any]]]:
    """The JSON section: for each workload, each server's cost and its ratio to the floor."""
    out: dict[str, list[dict[str, Any]]] = {}
    for workload in doc["plan"]["workloads"]:
        measured = costs(doc, workload)
        floor = next((c for c in measured if c.server == FLOOR), None)
        out[workload] = [
            {
                "server": c.server,
                "concurrency": c.concurrency,
                "rps": _finite(c.rps),
                "server_cpu_s": _finite(c.server_cpu_s),
                "requests": c.requests,
                "us_per_request": _finite(c.us_per_request),
                "vs_floor": _finite(c.times(floor)),
            }
            for c in measured
        ]
    return out


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)
