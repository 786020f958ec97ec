"""``python -m bench``: run the benchmark suite and write its report.

    python -m bench                  # the full run (make bench)
    python -m bench --quick          # a few short points per server (make bench-quick)
    python -m bench --workloads tiny --servers carpool,mosec
    python -m bench --render bench/results/FILE.json   # redraw a report

Exits 1 when any answer was wrong or failed (see the report's Failures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import report, runner
from bench.plan import Plan
from bench.servers import SERVERS
from bench.workloads import NAMES

RESULTS = Path(__file__).resolve().parent / "results"


def _names(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few short points per server")
    parser.add_argument(
        "--workloads", type=lambda v: _names(v, NAMES, "workloads"), help=",".join(NAMES)
    )
    servers = tuple(spec.name for spec in SERVERS)
    parser.add_argument(
        "--servers", type=lambda v: _names(v, servers, "servers"), help=",".join(servers)
    )
    parser.add_argument("--out", type=Path, help="results folder (default bench/results)")
    parser.add_argument("--render", type=Path, help="redraw the report of a results JSON file")
    args = parser.parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text())
        print(report.render(doc, args.render.with_suffix("")))
        return 0
    plan = (Plan.quick_run() if args.quick else Plan.full()).only(args.workloads, args.servers)
    out = args.out or (RESULTS / "quick" if plan.quick else RESULTS)
    started, began = report.now(), time.monotonic()
    outcome = runner.run(plan)
    doc = report.document(plan, outcome, started, time.monotonic() - began)
    path = report.write(doc, out)
    print(f"\nreport: {path}\nresults: {path.with_suffix('.json')}")
    for goal in doc["goals"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
        print(f"  {goal['name']}: {goal['measured']} [{met}]")
    if doc["failures"]:
        print("\nFAILED:", *doc["failures"], sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
