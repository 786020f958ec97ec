"""Atheris fuzz targets (RELIABILITY R19): the three parsers of untrusted bytes.

- ``json``: an HTTP infer body (``server/request.py: decode_request``);
- ``binary``: the binary tensor extension (a JSON header, then raw tensors,
  split at ``Inference-Header-Content-Length``);
- ``stream``: one WebSocket message, text or binary, as ``server/stream.py``
  takes it off the connection (``Stream._take``): framing, decoding, the
  stream's own checks, submission, and the encoding of its answer.

Each input's first byte picks the model config (and, for ``stream``, the frame
type); the rest is the body. A target passes an input when decoding succeeds
with a consistent result or fails with our ``BadRequest``; any other
exception, or an answer with a 5xx status, is a finding. libFuzzer's
``-timeout=1`` fails any input that takes over 1 s. Peak RSS is watched here
(``VmHWM``, over 512 MiB fails the run), not by libFuzzer's ``-rss_limit_mb``:
that reads ``ru_maxrss``, which Linux carries over from the parent through
fork and exec, so a run started by a large pytest process would fail at
once. The ``control-*`` targets are planted bugs of each kind, for the tests
that prove a finding fails the run.

    python -m tests.fuzz json --seconds 60 [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import math
import os
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson
import torch

from batching import Completion
from server import frames
from server.asgi import Message
from server.errors import BadRequest
from server.infer import Infer
from server.kinds.tensor import TensorKind
from server.metrics import Metrics
from server.models import ModelSet, ServedModel
from server.repository import ModelConfig, TensorSpec
from server.request import InferRequest, decode_request, queue_timeout
from server.settings import Settings
from server.stream import Stream

Target = Callable[[bytes], None]

TIMEOUT_SECONDS = 1
RSS_LIMIT_MIB = 512
OUT_OF_MEMORY = 71  # libFuzzer's own exit status for it


def _config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> ModelConfig:
    return ModelConfig(name, "tensor", Path("."), tuple(inputs), tuple(outputs))


# Every datatype, fixed and variable item shapes, several inputs per request.
CONFIGS = (
    _config(
        "mixed",
        [
            TensorSpec("a", "FP32", (-1, 2, 2)),
            TensorSpec("b", "INT32", (-1,)),
            TensorSpec("c", "BOOL", (-1, 3)),
        ],
        [TensorSpec("y", "FP32", (-1, 2)), TensorSpec("z", "INT64", (-1,))],
    ),
    _config(
        "wide",
        [
            TensorSpec("h", "FP16", (-1, 4)),
            TensorSpec("u", "UINT64", (-1,)),
            TensorSpec("d", "FP64", (-1,)),
            TensorSpec("i", "INT8", (-1, 2)),
        ],
        [TensorSpec("o", "FP64", (-1,))],
    ),
    _config(
        "text",
        [TensorSpec("text", "BYTES", (-1,)), TensorSpec("raw", "UINT16", (-1, -1))],
        [TensorSpec("e", "FP32", (-1, 3))],
    ),
)
# the stream target runs the real tensor kind's split, which needs fixed shapes
STREAM_CONFIGS = CONFIGS[:2]


def _check(request: InferRequest, config: ModelConfig) -> None:
    """What a decoded request promises: every input, ``count`` items of its shape."""
    if request.count < 1 or set(request.columns) != {spec.name for spec in config.inputs}:
        raise AssertionError(f"inconsistent request: {request}")
    for spec in config.inputs:
        column = request.columns[spec.name]
        if -1 not in spec.item_shape and len(column) != request.count * math.prod(spec.item_shape):
            raise AssertionError(f"{spec.name}: {len(column)} values for {request.count} items")
    queue_timeout(config, request.parameters, None)


def json_body(data: bytes) -> None:
    if not data:
        return
    config = CONFIGS[data[0] % len(CONFIGS)]
    try:
        request = decode_request(data[1:], config)
    except BadRequest:
        return
    try:
        _check(request, config)
    except BadRequest:
        return


def binary_body(data: bytes) -> None:
    if len(data) < 5:
        return
    config = CONFIGS[data[0] % len(CONFIGS)]
    (header_length,) = struct.unpack_from("<i", data, 1)
    try:
        request = decode_request(data[5:], config, header_length)
        _check(request, config)
    except BadRequest:
        return


# -- the WebSocket message --------------------------------------------------------


class _Batcher:
    """Completes at once with results of the declared output shapes."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def enqueue(self, items: Sequence[Any], deadline: float | None = None) -> Any:
        result: dict[str, Any] = {}
        for spec in self.config.outputs:
            value = 0.5 if spec.datatype.startswith("FP") else 1
            result[spec.name] = [value] * math.prod(spec.item_shape) if spec.item_shape else value
        future: asyncio.Future[Completion[Any]] = asyncio.get_running_loop().create_future()
        future.set_result(Completion([dict(result) for _ in items], 0.0, 0.0, len(items)))
        return SimpleNamespace(future=future)

    def withdraw(self, pending: Any) -> None:
        pending.future.cancel()


class _Metrics:
    def count(self, model: str, outcome: str) -> None:
        pass


_SETTINGS = Settings(ws_max_message_bytes=8192, max_items_per_request=64, ws_max_in_flight=4)
_INFER = Infer(ModelSet(Path(".")), _SETTINGS)  # the stream is handed its model directly
_LOOP = asyncio.new_event_loop()


async def _never() -> Message:
    raise AssertionError("the target never reads from the connection")


async def _discard(message: Message) -> None:
    pass


async def _take(message: Message, config: ModelConfig) -> Stream:
    model = ServedModel(
        config, TensorKind(config), cast(Any, _Batcher(config)), torch.device("cpu")
    )
    stream = Stream(
        config.name, model, "", _INFER, cast(Metrics, _Metrics()), _never, _discard, _SETTINGS
    )
    if not stream._take(message):
        stream.closed.set()
    await asyncio.sleep(0)  # the done-callbacks post the answers
    return stream


def ws_message(data: bytes) -> None:
    if not data:
        return
    config = STREAM_CONFIGS[(data[0] >> 1) % len(STREAM_CONFIGS)]
    frame = data[1:]
    if data[0] & 1:
        message: Message = {"type": "websocket.receive", "bytes": frame}
    else:
        message = {"type": "websocket.receive", "text": frame.decode("utf-8", "replace")}
    stream = _LOOP.run_until_complete(_take(message, config))
    for posted in stream._outbox:
        if isinstance(posted, tuple):
            posted = frames.message(posted)
        if posted["type"] == "websocket.close":
            if posted["code"] != 1009:
                raise AssertionError(f"unexpected close: {posted}")
            continue
        text = posted.get("text")
        if text is not None:
            answer = orjson.loads(text)
            if "error" in answer and not 400 <= answer["status"] < 500:
                raise AssertionError(f"a message got {answer['status']}: {answer['error']}")


# -- planted bugs: each must make a run fail ------------------------------------------


def control_exception(data: bytes) -> None:
    """Treats our own BadRequest as a finding: fails on the first bad body."""
    if data:
        decode_request(data[1:], CONFIGS[0])


def control_slow(data: bytes) -> None:
    time.sleep(2)


def control_memory(data: bytes) -> None:
    bytearray(768 * 1024 * 1024)


TARGETS: dict[str, Target] = {
    "json": json_body,
    "binary": binary_body,
    "stream": ws_message,
    "control-exception": control_exception,
    "control-slow": control_slow,
    "control-memory": control_memory,
}


# -- seeds ------------------------------------------------------------------------------


def _example(spec: TensorSpec, count: int) -> tuple[list[int], list[Any]]:
    shape = [count, *(2 if d == -1 else d for d in spec.item_shape)]
    size = math.prod(shape)
    value: Any = {"BOOL": True, "BYTES": "héllo"}.get(spec.datatype, 1)
    if spec.datatype.startswith("FP"):
        value = 1.5
    return shape, [value] * size


def _binary(spec: TensorSpec, values: list[Any]) -> bytes:
    if spec.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)
    code = {"BOOL": "?", "FP16": "e", "FP32": "f", "FP64": "d", "INT8": "b", "INT32": "i"}
    code |= {"INT64": "q", "UINT16": "H", "UINT64": "Q"}
    return struct.pack(f"<{len(values)}{code[spec.datatype]}", *values)


def seeds(target: str) -> list[bytes]:
    """Valid inputs for ``target``: the corpus libFuzzer starts mutating from."""
    found = []
    for index, config in enumerate(CONFIGS):
        inputs, raw = [], []
        for spec in config.inputs:
            shape, values = _example(spec, 2)
            chunk = _binary(spec, values)
            inputs.append({"name": spec.name, "datatype": spec.datatype, "shape": shape})
            raw.append((inputs[-1], values, chunk))
        text: dict[str, Any] = {
            "id": "seed",
            "inputs": [{**entry, "data": values} for entry, values, _ in raw],
            "parameters": {"timeout": 1000},
        }
        binary = {
            "id": "seed",
            "inputs": [
                {**entry, "parameters": {"binary_data_size": len(chunk)}} for entry, _, chunk in raw
            ],
            "outputs": [{"name": spec.name} for spec in config.outputs],
        }
        header = orjson.dumps(binary)
        tail = b"".join(chunk for _, _, chunk in raw)
        if target == "json":
            found.append(bytes([index]) + orjson.dumps(text))
        elif target == "binary":
            found.append(bytes([index]) + struct.pack("<i", len(header)) + header + tail)
        elif target == "stream" and config in STREAM_CONFIGS:
            found.append(bytes([index << 1]) + orjson.dumps(text))
            framed = struct.pack("<I", len(header)) + header + tail
            found.append(bytes([index << 1 | 1]) + framed)
    return found or [b"\x00{}"]


# -- the run ------------------------------------------------------------------------


def peak_rss_mib() -> int:
    """This process's own peak RSS (VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class MemoryWatch:
    """Fails the run once peak RSS passes the limit, keeping the input that
    was running; records the peak in ``workdir/peak_rss_mib`` as it goes."""

    def __init__(self, workdir: Path, limit_mib: int) -> None:
        self.workdir = workdir
        self.limit_mib = limit_mib
        self.current = b""
        self._recorded = -1
        threading.Thread(target=self._watch, name="memory-watch", daemon=True).start()

    def wrap(self, target: Target) -> Target:
        def watched(data: bytes) -> None:
            self.current = data
            target(data)

        return watched

    def _watch(self) -> None:
        while True:
            peak = peak_rss_mib()
            if peak != self._recorded:
                (self.workdir / "peak_rss_mib").write_text(f"{peak}\n")
                self._recorded = peak
            if peak > self.limit_mib:
                data = self.current
                path = self.workdir / f"oom-{hashlib.sha1(data).hexdigest()}"
                path.write_bytes(data)
                print(
                    f"==carpool== ERROR: out-of-memory: peak RSS {peak} MiB is over "
                    f"{self.limit_mib} MiB; the input is in {path}",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(OUT_OF_MEMORY)
            time.sleep(0.05)


def run(argv: Sequence[str]) -> None:
    """Fuzz one target until ``--seconds`` have passed or a finding stops it
    (exit status 0: nothing found; libFuzzer's non-zero status otherwise)."""
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz")
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--workdir", type=Path, help="corpus and findings (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"carpool-atheris-{args.target}-"))
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for number, seed in enumerate(seeds(args.target)):
        (corpus / f"seed-{number}").write_bytes(seed)
    print(f"atheris: {args.target} for {args.seconds} s; corpus and findings in {workdir}")
    sys.stdout.flush()
    libfuzzer = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={args.seconds}",
        f"-artifact_prefix={workdir}/",
        "-print_final_stats=1",
        f"-timeout={TIMEOUT_SECONDS}",
        "-rss_limit_mb=0",  # MemoryWatch instead (see the module's docstring)
    ]
    watch = MemoryWatch(workdir, RSS_LIMIT_MIB)
    atheris = importlib.import_module("atheris")
    atheris.Setup(libfuzzer, watch.wrap(TARGETS[args.target]))
    atheris.Fuzz()
