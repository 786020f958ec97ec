"""Fake models for tests: a custom kind that doubles numbers and records
every batch, with optional faults. One model folder per test (tmp_path).

``model_dir(tmp_path, name, **config)`` writes a model.toml (input ``x``
FP32 [-1, 1], output ``y`` FP32 [-1, 1]) whose handler imports ``EchoKind``
from this module, so the test process shares its state: ``recorder(name)``
holds the batches the model ran (each a list of x values) and a ``gate``
(a threading.Event, open by default) that every forward pass waits on.

Options (model.toml [options]): ``poison`` (a value that makes a forward
pass raise ValueError), ``oom_above`` (batches larger than this raise
torch.OutOfMemoryError), ``sleep_ms`` (a fixed delay per batch),
``fail_once`` (the first batch of more than one item raises), ``drop_one_at``
(a value that makes the model return one result too few), ``leak_kib``
(memory kept forever per item: a leak the soak test must detect).

Faults around the forward pass (RELIABILITY R13), each set off by a value
in the input: ``fail_decode_at`` (``split`` raises RuntimeError on the event
loop, a stand-in for a decoder bug), ``fail_collate_at`` (building the batch
raises TypeError), ``fail_postprocess_at`` (slicing the outputs per item
raises IndexError), ``unserializable_at`` (that item's output is an object
no encoder takes), ``fail_sizing_at`` (the forward raises ``SizingTrap``,
and the kind's ``out_of_resources`` check, which sizes later batches, raises
RuntimeError on it), ``crash_at`` (the forward raises ``WorkerCrash``, a
BaseException: the batcher's watchdog must restart the loop), ``hang_at``
(the forward blocks until the recorder's ``release`` event is set: a hung
model the hang watchdog must give up on).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.kinds import BatchFn, ModelKind, Result
from server.request import InferRequest


@dataclass
class Recorder:
    batches: list[list[float]] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)  # ends hang_at

    def __post_init__(self) -> None:
        self.gate.set()

    @property
    def computed(self) -> list[float]:
        with self.lock:
            return [x for batch in self.batches for x in batch]


_RECORDERS: dict[str, Recorder] = {}


class WorkerCrash(BaseException):
    """Raised by the fake forward on ``crash_at``: not an Exception."""


class SizingTrap(ValueError):
    """Raised by the fake forward on ``fail_sizing_at``; the resource check trips on it."""


def recorder(name: str) -> Recorder:
    return _RECORDERS.setdefault(name, Recorder())


class EchoKind(ModelKind[float]):
    def split(self, request: InferRequest) -> list[float]:
        xs = list(request.columns["x"])
        fail_at = self.config.options.get("fail_decode_at")
        if fail_at is not None and fail_at in xs:
            raise RuntimeError(f"fake decoder bug on {fail_at}")
        return xs

    def out_of_resources(self, exc: BaseException) -> bool:
        if isinstance(exc, SizingTrap):
            raise RuntimeError("fake bug in the resource check that sizes batches")
        return super().out_of_resources(exc)

    def example(self) -> float:
        return -1.0

    def load(self, device: torch.device) -> BatchFn[float]:
        record = recorder(self.config.name)
        options = self.config.options
        poison = options.get("poison")
        oom_above = options.get("oom_above")
        sleep = options.get("sleep_ms", 0) / 1000
        fail_once = [bool(options.get("fail_once", False))]
        drop_one_at = options.get("drop_one_at")
        leak = bytes(int(options.get("leak_kib", 0) * 1024))
        leaked: list[bytearray] = []
        collate_at = options.get("fail_collate_at")
        postprocess_at = options.get("fail_postprocess_at")
        unserializable_at = options.get("unserializable_at")
        sizing_at = options.get("fail_sizing_at")
        crash_at = options.get("crash_at")
        hang_at = options.get("hang_at")

        def run(xs: list[float]) -> Sequence[Result]:
            if xs == [-1.0]:
                return [{"y": [-2.0]}]  # the warm-up is not recorded
            record.entered.set()
            record.gate.wait()
            with record.lock:
                record.batches.append(list(xs))
            if sleep:
                time.sleep(sleep)
            if hang_at is not None and hang_at in xs:
                record.release.wait()
            if collate_at is not None and collate_at in xs:
                raise TypeError(f"cannot collate {collate_at} into a batch tensor")
            if crash_at is not None and crash_at in xs:
                raise WorkerCrash(f"fake worker crash on {crash_at}")
            if sizing_at is not None and sizing_at in xs:
                raise SizingTrap(f"fake failure on {sizing_at}")
            if oom_above is not None and len(xs) > oom_above:
                raise torch.OutOfMemoryError(f"fake OOM: batch of {len(xs)} > {oom_above}")
            if poison is not None and poison in xs:
                raise ValueError(f"poison value {poison} in the batch")
            if fail_once[0] and len(xs) > 1:
                fail_once[0] = False
                raise RuntimeError("a transient failure")
            if leak:
                leaked.extend(bytearray(leak) for _ in xs)  # the soak's positive control
            results: list[Result] = []
            for x in xs:
                if x == postprocess_at:
                    raise IndexError(f"cannot slice the output of {postprocess_at}")
                results.append({"y": [object() if x == unserializable_at else x * 2]})
            if drop_one_at is not None and drop_one_at in xs:
                results.pop()
            return results

        return run


def model_dir(root: Path, name: str = "echo", **config: Any) -> Path:
    """A model repository under ``root`` holding one fake model; returns ``root``."""
    _RECORDERS[name] = Recorder()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    options = config.pop("options", {})
    lines = [f'name = "{name}"', 'kind = "custom"', 'device = "cpu"']
    lines += [f"{key} = {_toml(value)}" for key, value in config.items()]
    lines += [
        '[[inputs]]\nname = "x"\ndatatype = "FP32"\nshape = [-1, 1]',
        '[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [-1, 1]',
        '[options]\nmodule = "handler.py"\nclass = "EchoKind"',
    ]
    lines += [f"{key} = {_toml(value)}" for key, value in options.items()]
    (folder / "model.toml").write_text("\n".join(lines) + "\n")
    (folder / "handler.py").write_text("from tests.fakes import EchoKind\n")
    return root


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def infer_body(xs: Sequence[float]) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(xs), 1], "data": list(xs)}]}


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``predicate`` on the event loop until it holds (bounded)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not predicate():
        if loop.time() > give_up:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)
