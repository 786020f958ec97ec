"""The report's PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.results import number

Doc = dict[str, Any]
_ORDER = ("carpool", "carpool (WS)", "mosec", "fastapi", "flask", "floor", "floor (WS)")


def _label(point: dict[str, Any]) -> str:
    return f"{point['server']} (WS)" if point["transport"] == "ws" else str(point["server"])


def _series(doc: Doc, workload: str, mode: str) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = {}
    for p in doc["points"]:
        if p["workload"] == workload and p["mode"] == mode and p["status"] == "ok":
            series.setdefault(_label(p), []).append(p)
    return dict(
        sorted(series.items(), key=lambda kv: _ORDER.index(kv[0]) if kv[0] in _ORDER else 99)
    )


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def throughput(doc: Doc, path: Path) -> None:
    """Correct answers/s against closed-loop concurrency, with the offline limit."""
    names = doc["plan"]["workloads"]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], names, strict=True):
        for label, points in _series(doc, workload, "closed").items():
            points.sort(key=lambda p: p["concurrency"])
            ax.plot(
                [p["concurrency"] for p in points],
                [number(p["rps"]) for p in points],
                marker="o",
                label=label,
            )
        limit = doc.get("offline", {}).get("limit", {}).get(workload, [])
        if limit:
            one = limit[0]["items_per_s"]
            best = max(entry["items_per_s"] for entry in limit)
            ax.axhline(one, color="grey", linestyle=":", label="offline limit, batch 1")
            if best > one * 1.05 and workload != "tiny":
                ax.axhline(best, color="grey", linestyle="--", label="offline limit, best batch")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrency (connections, or WS requests in flight)")
        ax.set_ylabel("correct answers / s" if workload == "tiny" else "items / s")
        ax.set_title(f"{workload}: throughput vs concurrency (closed loop)")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(doc: Doc, path: Path) -> None:
    """p50 and p99 against offered load (open loop); timeouts drawn at the top."""
    names = doc["plan"]["workloads"]
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4 * len(names)), squeeze=False)
    for row, workload in zip(axes, names, strict=True):
        series = _series(doc, workload, "open")
        finite = [
            number(p[key])
            for points in series.values()
            for p in points
            for key in ("p50_ms", "p99_ms")
            if math.isfinite(number(p[key]))
        ]
        ceiling = max(finite, default=1.0) * 2
        for ax, key, title in ((row[0], "p50_ms", "p50"), (row[1], "p99_ms", "p99")):
            for label, points in series.items():
                points.sort(key=lambda p: number(p["offered_rps"]))
                xs = [number(p["offered_rps"]) for p in points]
                ys = [number(p[key]) for p in points]
                (line,) = ax.plot(
                    xs, [y if math.isfinite(y) else ceiling for y in ys], marker="o", label=label
                )
                timed_out = [(x, ceiling) for x, y in zip(xs, ys, strict=True) if math.isinf(y)]
                if timed_out:
                    ax.scatter(
                        *zip(*timed_out, strict=True), marker="^", s=80, color=line.get_color()
                    )
            capacity = doc.get("capacity", {}).get(workload)
            if capacity:
                ax.axvline(capacity, color="grey", linestyle=":", label="carpool's capacity")
            ax.set_yscale("log")
            ax.set_xlabel("offered load (requests / s, Poisson)")
            ax.set_ylabel(f"{title} latency, ms (from the intended send time)")
            ax.set_title(f"{workload}: {title} vs offered load (open loop; ▲ = timeouts)")
            ax.grid(True, which="both", alpha=0.3)
            _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def batches(doc: Doc, path: Path) -> None:
    """carpool's batch sizes at each closed-loop concurrency (share of items)."""
    names = doc["plan"]["workloads"]
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], names, strict=True):
        points = [
            p
            for p in doc["points"]
            if p["workload"] == workload
            and p["server"] == "carpool"
            and p["transport"] == "http"
            and p["mode"] == "closed"
            and p.get("batch_histogram")
        ]
        points.sort(key=lambda p: p["concurrency"])
        buckets = [b for b in (points[0]["batch_histogram"] if points else {}) if b != "inf"]
        width = 0.8 / max(len(points), 1)
        for k, p in enumerate(points):
            histogram = p["batch_histogram"]
            # items per bucket, taking each bucket's upper bound as its size
            items = [histogram.get(b, 0) * float(b) for b in buckets]
            total = sum(items) or 1.0
            ax.bar(
                [i + k * width for i in range(len(buckets))],
                [v / total for v in items],
                width=width,
                label=f"c={p['concurrency']} (mean {number(p['mean_batch']):.1f})",
            )
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(buckets))], [f"≤{b}" for b in buckets]
        )
        ax.set_xlabel("batch size (histogram bucket)")
        ax.set_ylabel("share of items (approx.)")
        ax.set_title(f"{workload}: carpool's batch sizes (closed loop)")
        _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def offline(doc: Doc, path: Path) -> None:
    """The offline limit against batch size; for embed, the padding it computes."""
    limits = doc.get("offline", {}).get("limit", {})
    names = [w for w in doc["plan"]["workloads"] if limits.get(w)]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], names, strict=True):
        entries = limits[workload]
        sizes = [e["batch"] for e in entries]
        ax.plot(sizes, [e["items_per_s"] for e in entries], marker="o", label="items/s")
        ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("items / s (bare model, one thread)")
        ax.set_title(f"{workload}: offline limit")
        ax.grid(True, which="both", alpha=0.3)
        if all(e.get("padded_tokens") for e in entries):
            waste = ax.twinx()
            waste.plot(
                sizes,
                [100 * (1 - e["tokens"] / e["padded_tokens"]) for e in entries],
                marker="s",
                color="tab:red",
                label="padding, % of tokens",
            )
            waste.set_ylabel("padding (% of computed tokens)", color="tab:red")
            waste.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_all(doc: Doc, stem: Path) -> list[Path]:
    """Every plot, as ``<stem>-<name>.png``; returns their paths."""
    drawn = []
    for name, draw in (
        ("throughput", throughput),
        ("latency", latency),
        ("batches", batches),
        ("offline", offline),
    ):
        path = stem.with_name(f"{stem.name}-{name}.png")
        draw(doc, path)
        if path.exists():
            drawn.append(path)
    return drawn
