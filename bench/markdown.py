"""The Markdown report of a run, from its JSON document alone."""

from __future__ import annotations

import math
from typing import Any

from bench.results import number
from bench.stats import fmt_ms

Doc = dict[str, Any]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _rate(value: Any) -> str:
    x = number(value)
    return "-" if math.isnan(x) else f"{x:,.0f}"


def _label(p: dict[str, Any]) -> str:
    return f"{p['server']} (WS)" if p["transport"] == "ws" else str(p["server"])


def _errors(p: dict[str, Any]) -> str:
    parts = [f"{p[k]} {k}" for k in ("wrong", "failed", "timeouts") if p[k]]
    return ", ".join(parts) or "0"


def markdown(doc: Doc, pictures: list[str]) -> str:
    m = doc["machine"]
    out = [f"# carpool benchmark, {doc['started'][:10]} on {m['host']}", ""]
    if doc["quick"]:
        out += [
            "> **Quick run** (`make bench-quick`): a few short points per server, a smoke test "
            "of the suite. Its figures are not the ones to quote; run `make bench`.",
            "",
        ]
    verdict = "**passed**: every answer was right" if not doc["failures"] else "**failed**"
    out += [
        f"Run took {doc['seconds'] / 60:.1f} min; {verdict}.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"- Pinning: {doc['pinning']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        "- Reproduce: `make bench` (full) or `make bench-quick`; "
        "`python -m bench --render FILE.json` redraws this report.",
        "",
    ]
    if doc["failures"]:
        out += ["## Failures", ""] + [f"- {f}" for f in doc["failures"]] + [""]
    out += ["## Goals", ""]
    out += _table(
        ["goal", "target", "measured", "met"],
        [
            [g["name"], g["target"], g["measured"], {True: "yes", False: "no", None: "-"}[g["met"]]]
            for g in doc["goals"]
        ],
    )
    for picture in pictures:
        out += [f"![{picture}]({picture})", ""]
    for workload in doc["plan"]["workloads"]:
        out += _closed_section(doc, workload) + _cost_section(doc, workload)
        out += _open_section(doc, workload)
    out += _offline_section(doc) + _batches_section(doc) + _checks_section(doc)
    unavailable = [p for p in doc["points"] if p["status"] == "unavailable"]
    if unavailable:
        out += ["## Unavailable", ""]
        out += [f"- {_label(p)} {p['workload']}: {'; '.join(p['reasons'])}" for p in unavailable]
        out += [""]
    out += [
        "## How it was measured",
        "",
        "- Closed loop: wrk, one thread, N connections, each sending its next request when the "
        "last is answered; a Lua script checks every answer (status, id, and for tiny the "
        "label the offline model gives).",
        "- WebSocket: `/v2/models/{name}/stream` with N requests in flight, over ceil(N/64) "
        "connections (carpool reads at most 64 messages ahead per connection).",
        "- Open loop: our generator sends on a seeded Poisson schedule (the same for every "
        "server) at fractions of carpool's best closed-loop rate. Like a crowd of "
        "independent clients, it opens a new keep-alive connection whenever every open one "
        f"is busy, up to {doc['plan'].get('max_connections', 256)} (`connections`: the most "
        "it had open); latency counts from each request's intended send time, so queueing "
        "cannot hide. Requests leave on a timerfd alarm (sub-millisecond, asleep in "
        "between); its send lag shows whether the generator kept up. A request unanswered "
        "within the workload's timeout counts as infinitely slow (`timeout` in the tables).",
        "- Overloaded: offered more than 95% of that server's own best closed-loop rate. "
        "The run fails on any wrong answer; on a failed one (error status, broken connection) "
        "unless the server was overloaded; on a closed-loop timeout. An open-loop timeout is "
        "queueing, the thing measured: it counts as infinitely slow, not as a failure.",
        "- Server CPU: CPU seconds of the server's process tree over the point's wall time "
        "(1.00 = its core fully busy). Between points the suite waits until the server is idle.",
        "- The floor: a bare ASGI app under carpool's own uvicorn configuration (uvloop, "
        "carpool's httptools protocol) that reads each tiny body, parses it with orjson and "
        "answers carpool's JSON, looked up from the model's answers computed at start-up: "
        "what any Python server on this stack spends. It serves tiny over HTTP only.",
        "",
    ]
    return "\n".join(out)


def _closed_section(doc: Doc, workload: str) -> list[str]:
    points = [
        p for p in doc["points"]
        if p["workload"] == workload and p["mode"] == "closed" and p["status"] == "ok"
    ]  # fmt: skip
    if not points:
        return []
    unit = "req/s" if workload == "tiny" else "items/s"
    out = [f"## {workload}: closed loop", ""]
    rows = [
        [
            _label(p), str(p["concurrency"]), _rate(p["rps"]), fmt_ms(number(p["p50_ms"])),
            fmt_ms(number(p["p90_ms"])), fmt_ms(number(p["p99_ms"])),
            f"{number(p['server_cpu']):.2f}", f"{number(p['client_cpu']):.2f}",
            "-" if p["mean_batch"] is None else f"{p['mean_batch']:.1f}", _errors(p),
        ]
        for p in points
    ]  # fmt: skip
    header = ["server", "concurrency", unit, "p50 ms", "p90 ms", "p99 ms", "server CPU",
              "client CPU", "mean batch", "errors"]  # fmt: skip
    return out + _table(header, rows)


def _cost_section(doc: Doc, workload: str) -> list[str]:
    costs = doc.get("cpu_per_request", {}).get(workload)
    if not costs:
        return []
    intro = "At each server's best closed-loop HTTP point: server CPU seconds / requests answered."
    out = [f"## {workload}: server CPU per request", "", intro, ""]
    rows = [
        [
            c["server"], str(c["concurrency"]), _rate(c["rps"]),
            "-" if c["us_per_request"] is None else f"{c['us_per_request']:.1f}",
            "-" if c["vs_floor"] is None else f"{c['vs_floor']:.2f}x",
        ]
        for c in costs
    ]  # fmt: skip
    header = ["server", "concurrency", "req/s" if workload == "tiny" else "items/s",
              "µs CPU per request", "vs the floor"]  # fmt: skip
    return out + _table(header, rows)


def _open_section(doc: Doc, workload: str) -> list[str]:
    points = [
        p for p in doc["points"]
        if p["workload"] == workload and p["mode"] == "open" and p["status"] == "ok"
    ]  # fmt: skip
    if not points:
        return []
    capacity = doc.get("capacity", {}).get(workload)
    out = [
        f"## {workload}: open loop",
        "",
        f"Offered rates are fractions of carpool's best closed-loop rate ({_rate(capacity)}/s).",
        "",
    ]
    rows = [
        [
            _label(p), f"{p['load_fraction']:.0%}", _rate(p["offered_rps"]), _rate(p["rps"]),
            fmt_ms(number(p["p50_ms"])), fmt_ms(number(p["p90_ms"])), fmt_ms(number(p["p99_ms"])),
            fmt_ms(number(p["send_lag_p99_ms"])), str(p.get("connections") or "-"),
            f"{number(p['server_cpu']):.2f}",
            "yes" if p["overloaded"] else "", _errors(p),
        ]
        for p in sorted(points, key=lambda p: (p["load_fraction"], p["server"]))
    ]  # fmt: skip
    header = ["server", "load", "offered/s", "answered/s", "p50 ms", "p90 ms", "p99 ms",
              "send lag p99 ms", "connections", "server CPU", "overloaded",
              "errors"]  # fmt: skip
    return out + _table(header, rows)


def _offline_section(doc: Doc) -> list[str]:
    limits = doc.get("offline", {}).get("limit", {})
    if not limits:
        return []
    out = [
        "## Offline limit",
        "",
        "The bare model in one process, one torch thread, pinned like the servers: build the "
        "input tensor, forward, outputs to lists (embed: tokenize, pad each batch to its "
        "longest sentence, forward, mean-pool, normalise).",
        "",
    ]
    for workload, entries in limits.items():
        padded = all(e.get("padded_tokens") for e in entries)
        header = ["batch", "items/s"] + (["padding (% of tokens)"] if padded else [])
        rows = [
            [str(e["batch"]), _rate(e["items_per_s"])]
            + ([f"{100 * (1 - e['tokens'] / e['padded_tokens']):.0f}%"] if padded else [])
            for e in entries
        ]
        out += [f"**{workload}**", "", *_table(header, rows)]
    return out


def _batches_section(doc: Doc) -> list[str]:
    points = [
        p for p in doc["points"]
        if p["server"] == "carpool" and p["status"] == "ok" and p.get("batch_histogram")
    ]  # fmt: skip
    if not points:
        return []
    out = [
        "## carpool's batches",
        "",
        "From `/metrics` before and after each point: batches per size bucket, and for text "
        "the share of computed tokens that were padding (`carpool_model_total{figure=...}`).",
        "",
    ]
    rows = []
    for p in points:
        where = f"c={p['concurrency']}" if p["mode"] == "closed" else f"{_rate(p['offered_rps'])}/s"
        histogram = ", ".join(f"≤{k}: {v}" for k, v in p["batch_histogram"].items() if v)
        waste = "-" if p["padding_waste"] is None else f"{100 * p['padding_waste']:.0f}%"
        mean = "-" if p["mean_batch"] is None else f"{p['mean_batch']:.1f}"
        rows.append(
            [p["workload"], f"{p['transport']} {p['mode']} {where}", mean, waste, histogram]
        )
    return out + _table(["workload", "point", "mean batch", "padding", "batches by size"], rows)


def _checks_section(doc: Doc) -> list[str]:
    checks = doc.get("checks", [])
    if not checks:
        return []
    out = [
        "## Answer checks",
        "",
        "Before its points, each server answers a sample of requests alone; every output is "
        "compared with the offline model's (tiny: label and probabilities within 1e-4; embed: "
        "norm 1 and cosine >= 0.999). During the points every answer is checked too.",
        "",
    ]
    rows = [
        [
            c["server"],
            c["workload"],
            str(c["checked"]),
            str(c["wrong"]),
            "; ".join(c["reasons"][:1]),
        ]
        for c in checks
    ]
    return out + _table(["server", "workload", "checked", "wrong", "first problem"], rows)
