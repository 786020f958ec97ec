"""Fixtures shared by the integration tests.

``served`` is one real uvicorn serving the real ``weights/`` folder for the
whole session: minilm takes seconds to load, and every test that uses it
only sends requests, so one server is enough. ``digits_reference`` runs
``weights/digits/model.py`` offline, as the answer the server must give.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt
import pytest
import torch
from safetensors.torch import load_file

from server.settings import Settings
from tests.servers import ROOT, Running, in_thread

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
DigitsReference = Callable[[FloatArray], tuple[FloatArray, IntArray]]


@pytest.fixture(scope="session")
def served() -> Iterator[Running]:
    """carpool serving weights/ (digits and minilm) on a free loopback port."""
    with in_thread(Settings(models_dir=ROOT / "weights", torch_threads=1)) as running:
        yield running


@pytest.fixture(scope="session")
def digits_reference() -> DigitsReference:
    """``pixels [n, 64] -> (probabilities [n, 10], labels [n])``, computed
    offline, one image at a time, by the network the server serves."""
    spec = importlib.util.spec_from_file_location(
        "digits_reference_model", ROOT / "weights" / "digits" / "model.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.DigitsNet()
    net.load_state_dict(load_file(ROOT / "weights" / "digits" / "model.safetensors"))
    net.eval()

    def run(pixels: FloatArray) -> tuple[FloatArray, IntArray]:
        probabilities, labels = [], []
        with torch.inference_mode():
            for row in pixels.astype(np.float32):
                out = net(torch.from_numpy(row).reshape(1, 64))
                probabilities.append(out["probabilities"][0].numpy())
                labels.append(int(out["label"][0]))
        return np.stack(probabilities), np.array(labels, dtype=np.int64)

    return run
