"""The offline limit, and the reference answers every server is judged by.

Run by the suite as a child pinned to the server core with the servers'
thread settings (``python -m bench.offline --out FILE``). For each workload
it measures items/s of the bare model in-process at batch sizes 1..128: no
HTTP, no queue, just building the input tensor, the forward pass and turning
the output into lists (and for embed, tokenizing and pooling too, with each
batch padded to its longest sentence, and the padding it cost). It also
computes, one item at a time, the answers the servers must give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import workloads
from bench.plan import Plan
from bench.servers import ROOT, server_env

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_BATCHES = (1, 8, 64)
EMBED_SAMPLE = 32  # sentences whose embeddings are compared in full
_CHILD_SECONDS = 900


def measure(
    run: Callable[[list[Any]], Any], items: Sequence[Any], batch: int, seconds: float
) -> tuple[float, int]:
    """(items per second, batches run) of ``run`` on batches of ``batch`` items."""
    chunks = [
        [items[(start + k) % len(items)] for k in range(batch)]
        for start in range(0, max(len(items), batch), batch)
    ]
    run(chunks[0])  # warm-up: the first call at a new shape is slow
    done, began, index = 0, time.perf_counter(), 0
    while True:
        run(chunks[index % len(chunks)])
        done += 1
        index += 1
        elapsed = time.perf_counter() - began
        if elapsed >= seconds and done >= 2:
            return done * batch / elapsed, done


def tiny(quick: bool, seconds: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from bench.models import Digits

    items = workloads.items_for("tiny", quick)
    model = Digits()
    probabilities, labels, runner_up, margins = [], [], [], []
    for row in items:
        probs, (label,) = model([row])
        ranked = sorted(range(10), key=probs[0].__getitem__, reverse=True)
        probabilities.append(probs[0])
        labels.append(label)
        runner_up.append(ranked[1])
        margins.append(probs[0][ranked[0]] - probs[0][ranked[1]])
    reference = {
        "probabilities": probabilities,
        "labels": labels,
        "runner_up": runner_up,
        "margins": margins,
    }
    limit = []
    for batch in QUICK_BATCHES if quick else BATCHES:
        rate, _ = measure(model, items, batch, seconds)
        limit.append({"batch": batch, "items_per_s": rate})
    return reference, limit


def embed(quick: bool, seconds: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from bench.models import Embedder

    items = workloads.items_for("embed", quick)
    model = Embedder()
    embeddings = {str(i): model([items[i]])[0][0] for i in range(min(EMBED_SAMPLE, len(items)))}
    limit = []
    for batch in QUICK_BATCHES if quick else BATCHES:
        tokens = padded = 0

        def run(texts: list[str]) -> None:
            nonlocal tokens, padded
            _, used, computed = model(texts)
            tokens += used
            padded += computed

        rate, _ = measure(run, items, batch, seconds)
        limit.append(
            {"batch": batch, "items_per_s": rate, "tokens": tokens, "padded_tokens": padded}
        )
    return {"embeddings": embeddings}, limit


async def run_child(plan: Plan, core: int, workdir: Path) -> dict[str, Any]:
    """Run this module as a child pinned to ``core``; its result as a dict."""
    out = workdir / "offline.json"
    command = [
        *["taskset", "-c", str(core), sys.executable, "-m", "bench.offline"],
        *["--out", str(out), "--workloads", ",".join(plan.workloads)],
        *["--seconds", str(plan.offline_seconds), *(["--quick"] if plan.quick else [])],
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=server_env("digits"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        log, _ = await asyncio.wait_for(process.communicate(), _CHILD_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"the offline run took more than {_CHILD_SECONDS} s") from None
    except asyncio.CancelledError:  # the run was stopped (SIGTERM): the child with it
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"the offline run failed:\n{log.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="the offline limit and reference answers")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workloads", default=",".join(workloads.NAMES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    # torch only in the child: the suite's own process stays light
    import torch

    from bench.models import set_threads

    set_threads()
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "reference": {},
        "limit": {},
    }
    for name in args.workloads.split(","):
        measure_one = tiny if name == "tiny" else embed
        reference, limit = measure_one(args.quick, args.seconds)
        result["reference"][name] = reference
        result["limit"][name] = limit
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
