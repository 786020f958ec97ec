"""tritonclient's HTTP client, unmodified, against carpool.

A standard Open Inference Protocol v2 client must work as it is: health,
metadata, and infer with binary and with JSON tensors. tritonclient's HTTP
client is synchronous (gevent underneath), so these tests are plain
functions that talk to the session's server from the test thread.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient  # type: ignore[import-untyped]
from sklearn.datasets import load_digits

from tests.conftest import DigitsReference, FloatArray
from tests.servers import Running


@pytest.fixture
def client(served: Running) -> Iterator[httpclient.InferenceServerClient]:
    triton = httpclient.InferenceServerClient(f"127.0.0.1:{served.port}", network_timeout=60.0)
    try:
        yield triton
    finally:
        triton.close()


@pytest.fixture(scope="module")
def images() -> FloatArray:
    data: FloatArray = load_digits().data[:8].astype(np.float32)
    return data


def test_the_server_is_live_and_ready(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready("digits") is True


def test_model_metadata_reads_as_the_declared_tensors(
    client: httpclient.InferenceServerClient,
) -> None:
    metadata = client.get_model_metadata("digits")
    assert metadata["name"] == "digits"
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [
        ("probabilities", "FP32"),
        ("label", "INT64"),
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_digits_infer_gives_the_offline_answer(
    client: httpclient.InferenceServerClient,
    images: FloatArray,
    digits_reference: DigitsReference,
    binary: bool,
) -> None:
    expected_probabilities, expected_labels = digits_reference(images)
    pixels = httpclient.InferInput("pixels", list(images.shape), "FP32")
    pixels.set_data_from_numpy(images, binary_data=binary)
    requested = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("label", binary_data=binary),
    ]
    result = client.infer("digits", [pixels], outputs=requested)
    labels = result.as_numpy("label")
    probabilities = result.as_numpy("probabilities")
    assert labels.dtype == np.int64
    assert labels.tolist() == expected_labels.tolist()
    assert probabilities.shape == (len(images), 10)
    np.testing.assert_allclose(probabilities, expected_probabilities, atol=1e-5)
    response = result.get_response()
    assert response["model_name"] == "digits"
    assert all(("data" in output) != binary for output in response["outputs"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_minilm_infer_takes_bytes_and_gives_unit_embeddings(
    client: httpclient.InferenceServerClient, binary: bool
) -> None:
    sentences = np.array(
        [b"A man is eating food.", b"Someone is having a meal.", "Ça va?".encode()],
        dtype=np.object_,
    )
    text = httpclient.InferInput("text", [len(sentences)], "BYTES")
    text.set_data_from_numpy(sentences, binary_data=binary)
    result = client.infer(
        "minilm", [text], outputs=[httpclient.InferRequestedOutput("embedding", binary_data=binary)]
    )
    embeddings = result.as_numpy("embedding")
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    # the two sentences about a meal are closer to each other than to the third
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > max(similarity[0, 2], similarity[1, 2])
