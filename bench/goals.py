"""The goals of issues 3 and 11, each beside the value a run measured.

They read the run's JSON document, so a report can be rebuilt from a
results file. A goal whose figures are missing (a server that did not run,
an endpoint that is not there yet) is reported as not measured, not as met.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench import costs
from bench.results import bad_answers, number
from bench.stats import fmt_ms

PEERS = ("mosec", "fastapi", "flask")
OPEN_LOOP_FRACTION = 0.8
FLOOR_RATIO = 1.4  # carpool's CPU per tiny request, at most this many floors
LONE_P50_MS = 0.5
WS_OVER_MOSEC = 1.25  # carpool's best WebSocket msg/s over mosec's best HTTP req/s
CROWD, CROWD_BASE, CROWD_RATIO = 1000, 128, 0.8  # closed loop at 1000 connections vs 128
OPEN_P99_MS = 15.0


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    target: str
    measured: str
    met: bool | None  # None: not measured

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "measured": self.measured,
            "met": self.met,
        }


Doc = dict[str, Any]


def _points(doc: Doc, **match: Any) -> list[dict[str, Any]]:
    return [
        p
        for p in doc["points"]
        if p.get("status") == "ok" and all(p.get(k) == v for k, v in match.items())
    ]


def best_rps(doc: Doc, workload: str, server: str, transport: str = "http") -> float:
    """A server's best closed-loop throughput (correct answers/s); NaN if none."""
    rates = [
        number(p["rps"])
        for p in _points(doc, workload=workload, server=server, transport=transport, mode="closed")
    ]
    return max(rates) if rates else math.nan


def closed_at(doc: Doc, workload: str, server: str, concurrency: int) -> dict[str, Any] | None:
    found = _points(
        doc,
        workload=workload,
        server=server,
        transport="http",
        mode="closed",
        concurrency=concurrency,
    )
    return found[0] if found else None


def open_at(doc: Doc, workload: str, server: str, fraction: float) -> dict[str, Any] | None:
    found = [
        p
        for p in _points(doc, workload=workload, server=server, mode="open")
        if p.get("load_fraction") is not None and abs(p["load_fraction"] - fraction) < 1e-9
    ]
    return found[0] if found else None


def offline_rate(doc: Doc, workload: str, batch: int) -> float:
    for entry in doc.get("offline", {}).get("limit", {}).get(workload, []):
        if entry["batch"] == batch:
            return float(entry["items_per_s"])
    return math.nan


def _ms(value: float) -> str:
    text = fmt_ms(value)
    return text if text in ("timeout", "-") else f"{text} ms"


def _rate(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def evaluate(doc: Doc) -> list[Goal]:
    goals: list[Goal] = []
    carpool, mosec = best_rps(doc, "tiny", "carpool"), best_rps(doc, "tiny", "mosec")
    goals.append(
        Goal(
            "tiny: throughput",
            "carpool's best req/s >= mosec's",
            f"carpool {_rate(carpool)} req/s, mosec {_rate(mosec)} req/s",
            None if math.isnan(carpool) or math.isnan(mosec) else carpool >= mosec,
        )
    )
    lone = closed_at(doc, "tiny", "carpool", 1)
    lone_mosec = closed_at(doc, "tiny", "mosec", 1)
    p50 = number(lone["p50_ms"]) if lone else math.nan
    goals.append(
        Goal(
            "tiny: latency of a lone request",
            f"carpool's p50 at concurrency 1 < {LONE_P50_MS:g} ms",
            f"carpool {_ms(p50)}"
            + (f", mosec {_ms(number(lone_mosec['p50_ms']))}" if lone_mosec else ""),
            None if math.isnan(p50) else p50 < LONE_P50_MS,
        )
    )
    embed, limit = best_rps(doc, "embed", "carpool"), offline_rate(doc, "embed", 1)
    ratio = embed / limit if limit else math.nan
    goals.append(
        Goal(
            "embed: throughput",
            "carpool's best items/s >= 1.3x the offline limit at batch 1",
            f"{_rate(embed)} items/s = {ratio:.2f}x (offline, batch 1: {_rate(limit)} items/s)"
            if not math.isnan(ratio)
            else "not measured",
            None if math.isnan(ratio) else ratio >= 1.3,
        )
    )
    ws = best_rps(doc, "tiny", "carpool", "ws")
    unavailable = any(
        p.get("status") == "unavailable" and p.get("transport") == "ws" for p in doc["points"]
    )
    ws_ratio = ws / carpool if carpool else math.nan
    goals.append(
        Goal(
            "WebSocket: throughput",
            "carpool's WS req/s >= 3x its HTTP req/s on tiny",
            "the WebSocket endpoint is unavailable"
            if unavailable
            else (
                f"{_rate(ws)} req/s = {ws_ratio:.2f}x HTTP"
                if not math.isnan(ws_ratio)
                else "not measured"
            ),
            None if math.isnan(ws_ratio) else ws_ratio >= 3.0,
        )
    )
    over_mosec = ws / mosec if mosec else math.nan
    # the stack's own ceiling: the floor's stream, which only parses and answers
    floor_ws = best_rps(doc, "tiny", costs.FLOOR, "ws")
    ceiling = (
        f"; the floor's WS {_rate(floor_ws)} msg/s = {floor_ws / mosec:.2f}x"
        if not math.isnan(floor_ws) and mosec
        else ""
    )
    goals.append(
        Goal(
            "WebSocket: against mosec",
            f"carpool's best WS msg/s >= {WS_OVER_MOSEC:g}x mosec's best HTTP req/s",
            f"carpool WS {_rate(ws)} msg/s = {over_mosec:.2f}x mosec's {_rate(mosec)} req/s"
            + ceiling
            if not math.isnan(over_mosec)
            else "not measured",
            None if math.isnan(over_mosec) else over_mosec >= WS_OVER_MOSEC,
        )
    )
    goals.append(_floor_goal(doc))
    goals.append(_crowd_goal(doc))
    goals.append(_open_loop_crowd_goal(doc))
    for workload in doc["plan"]["workloads"]:
        goals.append(_open_loop_goal(doc, workload, PEERS))
    return goals


def _floor_goal(doc: Doc) -> Goal:
    name = "tiny HTTP: CPU per request"
    target = f"carpool's <= {FLOOR_RATIO:g}x the floor's (a bare ASGI app on the same uvicorn)"
    ours, floor = costs.cost(doc, "tiny", "carpool"), costs.cost(doc, "tiny", costs.FLOOR)
    if ours is None or floor is None or math.isnan(ours.times(floor)):
        return Goal(name, target, "not measured", None)
    ratio = ours.times(floor)
    measured = (
        f"carpool {ours.us_per_request:.1f} µs = {ratio:.2f}x the floor's "
        f"{floor.us_per_request:.1f} µs"
    )
    mosec = costs.cost(doc, "tiny", "mosec")
    if mosec is not None and not math.isnan(mosec.times(floor)):
        measured += f" (mosec {mosec.us_per_request:.1f} µs = {mosec.times(floor):.2f}x)"
    return Goal(name, target, measured, round(ratio, 2) <= FLOOR_RATIO)  # judged as shown


def _crowd_goal(doc: Doc) -> Goal:
    name = f"tiny: flat in connections (closed loop at {CROWD})"
    target = f"carpool at {CROWD} connections >= {CROWD_RATIO:g}x carpool at {CROWD_BASE}"
    crowd, base = (
        closed_at(doc, "tiny", "carpool", CROWD),
        closed_at(doc, "tiny", "carpool", CROWD_BASE),
    )
    if crowd is None or base is None or not number(base["rps"]):
        return Goal(name, target, "not measured", None)
    ratio = number(crowd["rps"]) / number(base["rps"])
    measured = (
        f"{_rate(number(crowd['rps']))} req/s at {CROWD} = {ratio:.2f}x "
        f"{_rate(number(base['rps']))} at {CROWD_BASE}"
    )
    mosec_crowd, mosec_base = (
        closed_at(doc, "tiny", "mosec", CROWD),
        closed_at(doc, "tiny", "mosec", CROWD_BASE),
    )
    if mosec_crowd and mosec_base and number(mosec_base["rps"]):
        measured += f" (mosec {number(mosec_crowd['rps']) / number(mosec_base['rps']):.2f}x)"
    return Goal(name, target, measured, round(ratio, 2) >= CROWD_RATIO)


def _open_loop_crowd_goal(doc: Doc) -> Goal:
    name = "tiny: a crowd in open loop at 80% of capacity"
    target = (
        f"every request answered right (goodput = offered), p99 <= {OPEN_P99_MS:g} ms, "
        "no rejections"
    )
    point = open_at(doc, "tiny", "carpool", OPEN_LOOP_FRACTION)
    if point is None:
        return Goal(name, target, "not measured", None)
    p99 = number(point["p99_ms"])
    missed = point.get("requests", 0) - point.get("ok", 0)
    measured = (
        f"at {_rate(number(point['offered_rps']))}/s: {point.get('ok', 0):,} of {point.get('requests', 0):,} "
        f"right, answered {_rate(number(point['rps']))}/s, p99 {_ms(p99)}, "
        f"{point.get('connections') or '-'} connections, send lag p99 "
        f"{_ms(number(point.get('send_lag_p99_ms')))}"
    )
    return Goal(name, target, measured, missed == 0 and p99 <= OPEN_P99_MS)


def _open_loop_goal(doc: Doc, workload: str, peers: Sequence[str]) -> Goal:
    ours = open_at(doc, workload, "carpool", OPEN_LOOP_FRACTION)
    name = f"{workload}: open loop at 80% of capacity"
    target = "carpool's p99 below every peer's at the same offered rate"
    if ours is None:
        return Goal(name, target, "not measured", None)
    mine = number(ours["p99_ms"])
    parts = [f"at {_rate(number(ours['offered_rps']))}/s: carpool {_ms(mine)}"]
    met: bool | None = True
    seen = 0
    for peer in peers:
        theirs = open_at(doc, workload, peer, OPEN_LOOP_FRACTION)
        if theirs is None:
            continue
        seen += 1
        value = number(theirs["p99_ms"])
        parts.append(f"{peer} {_ms(value)}")
        if not mine < value:
            met = False
    return Goal(name, target, ", ".join(parts), met if seen else None)


def failures(doc: Doc) -> list[str]:
    """Why the run failed: a server that could not be measured, a wrong sample
    answer, or a point with answers that count against it (``bad_answers``)."""
    found = list(doc.get("errors", []))
    for check in doc.get("checks", []):
        if check["wrong"]:
            found.append(
                f"{check['server']} {check['workload']}: {check['wrong']} of {check['checked']} "
                f"sample answers differ from the offline model's ({check['reasons'][:1]})"
            )
    for p in doc["points"]:
        if p.get("status") != "ok":
            continue
        if bad_answers(p):
            where = (
                f"c={p['concurrency']}"
                if p["mode"] == "closed"
                else f"{_rate(number(p['offered_rps']))}/s"
            )
            found.append(
                f"{p['server']} {p['transport']} {p['workload']} {p['mode']} {where}: "
                f"{p['wrong']} wrong, {p['failed']} failed, {p['timeouts']} timed out "
                f"({'; '.join(p['reasons'][:1])})"
            )
    return found
