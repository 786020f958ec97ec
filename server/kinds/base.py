"""What a model kind is: how one kind of model decodes, runs and encodes.

A kind turns a validated request into items (on the event loop: cheap work
only), and builds, per model instance, the batch function that the batcher
runs in that instance's worker thread: collate the items into tensors, run
one forward pass, turn the outputs into Python lists once and slice them per
item. A result is a dict from output name to that item's value.
"""

from __future__ import annotations

import importlib.util
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

import torch

from server.repository import ConfigError, ModelConfig
from server.request import InferRequest

Item = TypeVar("Item")
Result = dict[str, Any]
BatchFn = Callable[[list[Item]], Sequence[Result]]


class ModelKind(ABC, Generic[Item]):
    """Base class of every kind; a user's own kind subclasses it too."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    @abstractmethod
    def split(self, request: InferRequest) -> list[Item]:
        """The request's items, in order (runs on the event loop)."""

    @abstractmethod
    def load(self, device: torch.device) -> BatchFn[Item]:
        """Load one instance onto ``device`` and return its batch function."""

    @abstractmethod
    def example(self) -> Item:
        """One valid item, used to warm each instance up before serving."""

    def figures(self) -> dict[str, float]:
        """Running counters this kind exports to /metrics (name -> total)."""
        return {}

    def out_of_resources(self, exc: BaseException) -> bool:
        """Whether ``exc`` from a batch means out of memory: the batcher then
        splits the batch and caps later ones (runs in the worker thread)."""
        return isinstance(exc, torch.OutOfMemoryError | MemoryError)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available")
    return device


def import_file(path: Path, name: str) -> ModuleType:
    """Import a Python file that ships inside a model folder."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def option(config: ModelConfig, key: str, kind: type, default: Any = None) -> Any:
    """A typed entry of model.toml's [options] table."""
    value = config.options.get(key, default)
    if value is None:
        raise ConfigError(f"{config.folder}/model.toml: [options] needs {key!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{config.folder}/model.toml: options.{key} must be a {kind.__name__}")
    return value


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device``: through pinned memory and without blocking on CUDA."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
