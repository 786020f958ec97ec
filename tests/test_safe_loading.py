"""Weights load without executing pickle (RELIABILITY R23): server/weights.py.

The malicious checkpoints here would create a canary file when unpickled;
each test proves that with a positive control, then that the server refuses
the file and the canary never appears.
"""

from __future__ import annotations

import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.torch_version import TorchVersion

from server.repository import ConfigError
from server.weights import load_state_dict
from tests.servers import ROOT

DIGITS = ROOT / "weights" / "digits"
START_SECONDS = 180


class Canary:
    """Unpickling this opens (creates) ``path``: code execution, in miniature."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def planted_model(root: Path, weights: str) -> Path:
    """weights/digits' code and model.toml, with ``weights`` as its weights file."""
    folder = root / "digits"
    folder.mkdir(parents=True)
    shutil.copy(DIGITS / "model.py", folder / "model.py")
    toml = (DIGITS / "model.toml").read_text()
    (folder / "model.toml").write_text(
        toml.replace('weights = "model.safetensors"', f'weights = "{weights}"')
    )
    return folder


def serve(models: Path) -> subprocess.CompletedProcess[str]:
    """``python -m server serve`` as tests/servers.py starts it, run to its end."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--models",
            str(models),
            "--torch-threads",
            "1",
        ],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=START_SECONDS,
        check=False,
    )


def test_a_pickle_planted_as_model_pt_is_refused_at_start_and_never_runs(
    tmp_path: Path,
) -> None:
    folder = planted_model(tmp_path / "models", "model.pt")
    canary = tmp_path / "canary"
    torch.save({"layers.0.weight": Canary(canary)}, folder / "model.pt")
    control = tmp_path / "control"
    torch.save({"layers.0.weight": Canary(control)}, tmp_path / "control.pt")
    # the payload is live: unpickled without the guard, it opens its file
    torch.load(tmp_path / "control.pt", weights_only=False)["layers.0.weight"].close()
    assert control.exists()

    finished = serve(tmp_path / "models")

    assert finished.returncode != 0
    assert "Uvicorn running on" not in finished.stderr
    assert str(folder / "model.pt") in finished.stderr
    assert "refused" in finished.stderr
    assert not canary.exists()


def test_a_raw_pickle_named_model_pt_is_refused(tmp_path: Path) -> None:
    path, canary = tmp_path / "model.pt", tmp_path / "canary"
    # protocol 2, as torch.save writes (others only add a warning to the refusal)
    path.write_bytes(pickle.dumps({"layers.0.weight": Canary(canary)}, protocol=2))
    with pytest.raises(ConfigError, match="refused"):
        load_state_dict(path)
    assert not canary.exists()
    pickle.loads(path.read_bytes())["layers.0.weight"].close()  # the payload is live
    assert canary.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pkl", ".ckpt", ""])
def test_a_weights_file_of_another_type_is_refused_by_its_name(tmp_path: Path, suffix: str) -> None:
    path, canary = tmp_path / f"model{suffix}", tmp_path / "canary"
    path.write_bytes(pickle.dumps(Canary(canary)))
    with pytest.raises(ConfigError, match=r"must be \.safetensors"):
        load_state_dict(path)
    assert not canary.exists()


def test_a_truncated_safetensors_file_is_refused_cleanly(tmp_path: Path) -> None:
    whole = (DIGITS / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match="not a valid safetensors file"):
        load_state_dict(path)


@pytest.mark.parametrize("header_length", [200_000_000, 2**63], ids=["200MB", "2^63"])
def test_a_safetensors_header_length_over_100_mb_is_refused_without_reading_it(
    tmp_path: Path, header_length: int
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", header_length) + b'{"w": {}}')
    with pytest.raises(ConfigError, match="not a valid safetensors file"):
        load_state_dict(path)


def test_the_real_weights_still_load() -> None:
    state = load_state_dict(DIGITS / "model.safetensors")
    assert all(isinstance(tensor, torch.Tensor) for tensor in state.values())


def test_torch_is_at_least_2_10_the_weights_only_cve_floor() -> None:
    # CVE-2025-32434 (weights_only bypass, fixed in 2.6) and CVE-2026-24747
    # (memory corruption in the weights-only unpickler, fixed in 2.10)
    assert TorchVersion(torch.__version__) >= "2.10"
