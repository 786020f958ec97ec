"""Loading weights without executing pickle.

safetensors files cannot carry code, and they are the only format loaded by
default. A ``.pt``/``.pth`` checkpoint is a pickle: it loads only when its
model opts in (``[options] allow_pickle = true``), then through
``torch.load(weights_only=True)``, which refuses any object that is not a
tensor or plain container, and only on torch >= 2.10: earlier weights-only
unpicklers had a code-execution bypass (CVE-2025-32434, fixed in 2.6) and
memory corruption (CVE-2026-24747, fixed in 2.10). Every other file type is
refused. Pinned SHA-256 digests are checked before this runs
(``server/repository.py: check_pins``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.torch_version import TorchVersion

from server.repository import ConfigError

PICKLE_TORCH_FLOOR = "2.10"
PICKLE_SUFFIXES = frozenset({".pt", ".pth"})


def load_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{path} is not a valid safetensors file: {exc}") from exc
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ConfigError(
                f"{path} was refused: pickle checkpoints are disabled; convert it to "
                "safetensors, or set [options] allow_pickle = true in model.toml to load "
                "it weights-only"
            )
        return _load_weights_only(path)
    raise ConfigError(
        f"{path} was refused: weights must be .safetensors "
        "(or .pt/.pth with [options] allow_pickle = true)"
    )


def _load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    if TorchVersion(torch.__version__) < PICKLE_TORCH_FLOOR:
        raise ConfigError(
            f"{path} was refused: loading a pickle checkpoint needs torch >= "
            f"{PICKLE_TORCH_FLOOR} (this is {torch.__version__}, whose weights-only "
            "unpickler has known flaws); upgrade torch or convert it to safetensors"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        # torch's message goes on to suggest weights_only=False: keep only the reason
        lines = str(exc).splitlines() or [type(exc).__name__]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise ConfigError(
            f"{path} was refused: it is not a plain tensor checkpoint "
            f"(only weights load, never code): {reason.strip()}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors")
    return state
