"""A run's results: the JSON document, and a Markdown report with plots.

``document`` gathers everything a run measured into one JSON-ready dict;
``write`` puts ``<stem>.json``, ``<stem>.md`` and ``<stem>-*.png`` side by
side. The report is rebuilt from the JSON alone (``python -m bench --render
FILE``), so a results file is all that needs keeping.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import costs, goals, plots
from bench.markdown import markdown
from bench.plan import Plan
from bench.runner import Outcome

Doc = dict[str, Any]
_PACKAGES = (
    "carpool", "torch", "starlette", "uvicorn", "websockets", "mosec",
    "fastapi", "flask", "gunicorn", "uvloop", "httptools", "orjson",
)  # fmt: skip


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        versions["wrk"] = (wrk.stdout or wrk.stderr).split()[1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        versions["wrk"] = None
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def document(plan: Plan, outcome: Outcome, started: datetime, seconds: float) -> Doc:
    offline = {k: v for k, v in outcome.offline.items() if k != "reference"}
    doc: Doc = {
        "schema": 1,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "quick": plan.quick,
        "machine": machine(),
        "pinning": "each server's process tree on core 0 (taskset), the load generators on core 1; "
        "torch intra-op threads 1, OMP_NUM_THREADS=MKL_NUM_THREADS=1 everywhere",
        "plan": asdict(plan),
        "capacity": outcome.capacity,
        "offline": offline,
        "checks": [asdict(c) for c in outcome.checks],
        "points": [p.to_json() for p in outcome.points],
        "errors": outcome.errors,
    }
    doc["cpu_per_request"] = costs.summary(doc)
    doc["goals"] = [g.to_json() for g in goals.evaluate(doc)]
    doc["failures"] = goals.failures(doc)
    return doc


def stem_for(doc: Doc, out_dir: Path) -> Path:
    day = doc["started"][:10]
    return out_dir / f"{day}-{doc['machine']['host'] or 'host'}"


def write(doc: Doc, out_dir: Path) -> Path:
    """Write the JSON, the plots and the Markdown report; return the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem_for(doc, out_dir)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    return render(doc, stem)


def render(doc: Doc, stem: Path) -> Path:
    """Plots and Markdown for ``doc``, its costs, goals and failures judged afresh."""
    doc["cpu_per_request"] = costs.summary(doc)
    doc["goals"] = [g.to_json() for g in goals.evaluate(doc)]
    doc["failures"] = goals.failures(doc)
    pictures = plots.draw_all(doc, stem)
    report = stem.with_suffix(".md")
    report.write_text(markdown(doc, [p.name for p in pictures]))
    return report


def now() -> datetime:
    return datetime.now(UTC)
