"""The models a server serves: each one's config, kind and batcher.

``ModelSet.start()`` reads the repository, loads every instance of every
model in a worker thread (the event loop stays free), warms each instance up
with one forward pass, and only then starts its batcher: a model is ready
when it can answer at full speed. ``drain()`` finishes and stops every
batcher; ``server/lifecycle.py`` decides when.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batching import Batcher, BatchListener
from server.errors import NotFound
from server.kinds import BatchFn, ModelKind, Result, make_kind, resolve_device
from server.repository import ModelConfig, load_repository

logger = logging.getLogger("carpool.server")


@dataclass(slots=True)
class ServedModel:
    config: ModelConfig
    kind: ModelKind[Any]
    batcher: Batcher[Any, Result]
    device: torch.device

    @property
    def ready(self) -> bool:
        # a forward pass that hung is still holding its thread (and maybe the
        # device): not ready until it returns, so balancers look elsewhere
        return self.batcher.accepting and self.batcher.stats.hung_forwards == 0


class ModelSet:
    """All served models, by name. Empty until ``start()``."""

    def __init__(self, models_dir: Path, torch_threads: int | None = None) -> None:
        self.models_dir = models_dir
        self.torch_threads = torch_threads
        self._models: dict[str, ServedModel] = {}
        self.loaded = False
        self.draining = False

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    def resolve(self, name: str, version: str | None = None) -> ServedModel:
        """The model ``name`` (at ``version``, when given), or ``NotFound``."""
        model = self._models.get(name)
        if model is not None and (version is None or version == model.config.version):
            return model
        if model is not None:
            raise NotFound(f"model {name!r} has no version {version!r}")
        raise NotFound(f"unknown model {name!r}; this server serves {sorted(self._models)}")

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining and all(model.ready for model in self)

    async def start(self, listener_for: Any = None) -> None:
        """Load, warm up and start every model. ``listener_for(name)`` may
        return a per-batch listener (the metrics)."""
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        for config in load_repository(self.models_dir):
            kind = make_kind(config)
            device = resolve_device(config.device)
            fns = await asyncio.to_thread(_load_instances, kind, device)
            listener: BatchListener | None = listener_for(config.name) if listener_for else None
            batcher: Batcher[Any, Result] = Batcher(
                fns,
                config.policy,
                name=config.name,
                on_batch=listener,
                is_resource_error=kind.out_of_resources,
            )
            batcher.start()
            self._models[config.name] = ServedModel(config, kind, batcher, device)
            logger.info(
                "model %s ready: kind %s, %d instance(s) on %s, batches of up to %d",
                config.name,
                config.kind,
                config.instances,
                device,
                config.max_batch_size,
            )
        self.loaded = True

    def begin_drain(self) -> None:
        """Fail readiness from now on; requests are still accepted."""
        self.draining = True

    def stop_accepting(self) -> None:
        """Refuse new requests (503) from now on; queued ones still run."""
        self.draining = True
        for model in self:
            model.batcher.stop_accepting()

    async def drain(self, timeout: float) -> None:
        """Finish every accepted request within ``timeout`` seconds, fail the
        rest, and release the worker threads (``Batcher.aclose``)."""
        self.stop_accepting()
        await asyncio.gather(*(model.batcher.aclose(timeout) for model in self))


def _load_instances(kind: ModelKind[Any], device: torch.device) -> Sequence[BatchFn[Any]]:
    fns = []
    for _ in range(kind.config.instances):
        fn = kind.load(device)
        fn([kind.example()])  # warm-up: the first forward is slow, pay for it before serving
        fns.append(fn)
    return fns
