"""Loading weights without executing pickle.

safetensors files cannot carry code. ``.pt``/``.pth`` checkpoints go through
``torch.load(weights_only=True)``, which refuses any object that is not a
tensor or plain container (torch >= 2.6; older versions had a bypass,
CVE-2025-32434). Every other file type is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from server.repository import ConfigError


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{path} is not a valid safetensors file: {exc}") from exc
    if path.suffix in {".pt", ".pth"}:
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
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise ConfigError(f"{path} does not hold a state dict of tensors")
        return state
    raise ConfigError(f"{path}: weights must be .safetensors (or .pt/.pth, loaded weights-only)")
