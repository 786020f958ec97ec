"""Model kinds, by the name model.toml's ``kind`` uses.

``tensor`` and ``text`` ship with carpool. ``custom`` points at a user's own
subclass of ``ModelKind`` in the model folder:

    kind = "custom"
    [options]
    module = "handler.py"
    class = "MyKind"
"""

from __future__ import annotations

from typing import Any

from server.kinds.base import BatchFn, ModelKind, Result, import_file, option, resolve_device
from server.kinds.tensor import TensorKind
from server.kinds.text import TextKind
from server.repository import ConfigError, ModelConfig

KINDS: dict[str, type[ModelKind[Any]]] = {"tensor": TensorKind, "text": TextKind}


def make_kind(config: ModelConfig) -> ModelKind[Any]:
    if config.kind == "custom":
        module = import_file(
            config.folder / option(config, "module", str), f"carpool_kinds.{config.name}"
        )
        cls = getattr(module, option(config, "class", str), None)
        if not (isinstance(cls, type) and issubclass(cls, ModelKind)):
            raise ConfigError(f"{config.folder}: options.class is not a ModelKind subclass")
        return cls(config)
    try:
        return KINDS[config.kind](config)
    except KeyError:
        raise ConfigError(
            f"{config.folder}/model.toml: kind {config.kind!r} is not one of {sorted(KINDS)} or 'custom'"
        ) from None


__all__ = ["KINDS", "BatchFn", "ModelKind", "Result", "make_kind", "resolve_device"]
