"""The Python client (client/) and ``carpool predict``, against real servers.

Most tests use ``served`` (conftest.py: the real digits and minilm models)
and check answers against ``digits_reference``, the same network run
offline. Tests that need a failing or gated model run their own server over
the fake model of tests/fakes.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from sklearn.datasets import load_digits

import client.tensors
from client import AsyncClient, Client, InferenceError, StreamClosed
from server.cli import main
from server.settings import Settings
from server.websocket import StreamRegistry
from tests.conftest import DigitsReference, FloatArray
from tests.fakes import model_dir, recorder
from tests.servers import Running, in_thread

WAIT = 30.0


@pytest.fixture(scope="module")
def images() -> FloatArray:
    data: FloatArray = load_digits().data.astype(np.float32)[:300]
    return data


@pytest.fixture
def no_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client as it runs where numpy is not installed."""
    monkeypatch.setattr(client.tensors, "np", None)


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[Running]:
    """The fake model (y = 2 x) with a poison value, -13, that fails its item."""
    model_dir(tmp_path, "echo", max_batch_size=8, options={"poison": -13.0})
    try:
        with in_thread(Settings(models_dir=tmp_path, torch_threads=1)) as running:
            yield running
    finally:
        recorder("echo").gate.set()


async def rows(count: int) -> AsyncIterator[list[float]]:
    """Items of the fake model's input (``x``: FP32 [-1, 1]), one at a time."""
    for i in range(count):
        yield [float(i)]


async def drain_begun(streams: StreamRegistry) -> None:
    for _ in range(int(WAIT / 0.01)):  # polled: the server runs in another thread
        if streams.draining:
            return
        await asyncio.sleep(0.01)


# -- HTTP ------------------------------------------------------------------------


def test_infer_with_a_numpy_batch_matches_the_offline_model(
    served: Running, images: FloatArray, digits_reference: DigitsReference
) -> None:
    probabilities, labels = digits_reference(images[:20])
    with Client(served.url) as carpool:
        outputs = carpool.infer("digits", {"pixels": images[:20]})
    assert outputs["label"].dtype == np.int64
    assert outputs["label"].tolist() == labels.tolist()
    np.testing.assert_allclose(outputs["probabilities"], probabilities, rtol=1e-4, atol=1e-6)


def test_infer_with_one_item_gives_its_outputs_without_the_item_axis(
    served: Running, images: FloatArray, digits_reference: DigitsReference
) -> None:
    _, labels = digits_reference(images[:1])
    with Client(served.url) as carpool:
        outputs = carpool.infer("digits", images[0], outputs=["label"])
    assert list(outputs) == ["label"]
    assert outputs["label"].shape == ()
    assert int(outputs["label"]) == labels[0]


def test_infer_with_plain_lists_works_without_numpy(
    served: Running, images: FloatArray, digits_reference: DigitsReference, no_numpy: None
) -> None:
    _, labels = digits_reference(images[:3])
    rows = images[:3].astype(int).tolist()  # integers, for an FP32 input: converted
    with Client(served.url) as carpool:
        outputs = carpool.infer("digits", {"pixels": rows})
    assert outputs["label"] == labels.tolist()
    assert len(outputs["probabilities"]) == 3
    assert all(len(row) == 10 for row in outputs["probabilities"])


async def test_async_client_reports_health_and_metadata(served: Running) -> None:
    async with AsyncClient(served.url) as carpool:
        assert await carpool.live()
        assert await carpool.ready()
        assert await carpool.ready("digits")
        assert (await carpool.metadata())["name"] == "carpool"
        inputs = (await carpool.metadata("digits"))["inputs"]
        assert inputs == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]


async def test_async_infer_of_text_gives_one_embedding_per_sentence(served: Running) -> None:
    async with AsyncClient(served.url) as carpool:
        outputs = await carpool.infer("minilm", ["A man is eating food.", "Hi."])
    assert outputs["embedding"].shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(outputs["embedding"], axis=1), 1.0, rtol=1e-4)


async def test_an_error_answer_raises_inference_error_with_its_status(served: Running) -> None:
    async with AsyncClient(served.url) as carpool:
        with pytest.raises(InferenceError) as unknown:
            await carpool.infer("nope", [1.0])
    assert unknown.value.status == 404
    assert "nope" in unknown.value.message


async def test_inputs_that_do_not_fit_the_model_raise_value_error_before_sending(
    served: Running,
) -> None:
    async with AsyncClient(served.url) as carpool:
        with pytest.raises(ValueError, match="pixels"):
            await carpool.infer("digits", {"pixles": [0.0] * 64})
        with pytest.raises(ValueError, match="dimensions"):
            await carpool.infer("digits", [[[0.0] * 64]])


# -- streams ---------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary frames", "JSON frames"])
async def test_stream_yields_the_outputs_of_every_input_in_input_order(
    served: Running, images: FloatArray, digits_reference: DigitsReference, binary: bool
) -> None:
    _, labels = digits_reference(images)
    async with AsyncClient(served.url, binary=binary) as carpool:
        streamed = [
            outputs["label"] async for outputs in carpool.stream("digits", images, window=16)
        ]
    assert [int(label) for label in streamed] == labels.tolist()


async def test_stream_of_plain_lists_works_without_numpy(served: Running, no_numpy: None) -> None:
    sentences = ["A man is eating food.", "Someone is having a meal.", "Hi."]
    async with AsyncClient(served.url) as carpool:
        embeddings = [out["embedding"] async for out in carpool.stream("minilm", sentences)]
    assert [len(embedding) for embedding in embeddings] == [384, 384, 384]
    assert all(isinstance(value, float) for value in embeddings[0])


async def test_a_stream_takes_an_async_iterable(echo: Running) -> None:
    async with AsyncClient(echo.url) as carpool:
        ys = [float(out["y"][0]) async for out in carpool.stream("echo", rows(50), window=4)]
    assert ys == [2.0 * i for i in range(50)]


async def test_concurrent_callers_on_one_stream_each_get_their_own_answer(echo: Running) -> None:
    async with AsyncClient(echo.url) as carpool, carpool.connect("echo") as stream:
        results = await asyncio.gather(*(stream.infer([float(i)]) for i in range(100)))
        assert stream.in_flight == 0
    assert [float(out["y"][0]) for out in results] == [2.0 * i for i in range(100)]
    assert len(recorder("echo").batches) < 100, "the callers' requests were batched"


async def test_a_failed_request_raises_inference_error_from_the_stream(echo: Running) -> None:
    yielded: list[Any] = []

    async def consume(carpool: AsyncClient) -> None:
        async for outputs in carpool.stream("echo", [[1.0], [2.0], [-13.0], [4.0]]):
            yielded.append(float(outputs["y"][0]))

    async with AsyncClient(echo.url) as carpool:
        with pytest.raises(InferenceError) as failed:
            await consume(carpool)
    assert yielded == [2.0, 4.0]
    assert failed.value.status == 422
    assert failed.value.id is not None


async def test_a_submitted_request_fails_with_stream_closed_when_the_server_shuts_down(
    echo: Running,
) -> None:
    record = recorder("echo")
    record.gate.clear()
    async with AsyncClient(echo.url) as carpool, carpool.connect("echo") as stream:
        answered = await stream.submit([1.0])
        await asyncio.wait_for(asyncio.to_thread(record.entered.wait), WAIT)
        echo.server.should_exit = True
        streams = echo.app.streams
        await asyncio.wait_for(drain_begun(streams), WAIT)
        late = await stream.submit([2.0])  # sent while draining: never read
        record.gate.set()
        assert float((await asyncio.wait_for(answered, WAIT))["y"][0]) == 2.0
        with pytest.raises(StreamClosed) as closed:
            await asyncio.wait_for(late, WAIT)
    assert closed.value.code == 1001


async def test_a_token_is_sent_with_http_requests_and_the_stream_handshake(
    tmp_path: Path,
) -> None:
    model_dir(tmp_path, "echo")
    with in_thread(Settings(models_dir=tmp_path, torch_threads=1, auth_tokens="s3cret")) as running:
        async with AsyncClient(running.url) as anonymous:
            with pytest.raises(InferenceError) as refused:
                await anonymous.infer("echo", [1.0])
            assert refused.value.status == 401
        async with AsyncClient(running.url, token="s3cret") as carpool:
            assert float((await carpool.infer("echo", [1.0]))["y"][0]) == 2.0
            streamed = [float(out["y"][0]) async for out in carpool.stream("echo", [[1.0], [2.0]])]
        assert streamed == [2.0, 4.0]


# -- carpool predict ---------------------------------------------------------------


def test_carpool_predict_prints_the_outputs_as_json(
    served: Running,
    images: FloatArray,
    digits_reference: DigitsReference,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, labels = digits_reference(images[:1])
    pixels = orjson.dumps(images[0].astype(int).tolist()).decode()
    with pytest.raises(SystemExit) as status:
        main(["predict", "digits", "--input", pixels, "--output", "label", "--url", served.url])
    assert status.value.code == 0
    assert orjson.loads(capsys.readouterr().out) == {"label": int(labels[0])}


def test_carpool_predict_reads_named_inputs_from_a_file(
    served: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sentences.json"
    path.write_bytes(orjson.dumps(["A man is eating food.", "Hi."]))
    with pytest.raises(SystemExit) as status:
        main(["predict", "minilm", "-i", f"text=@{path}", "--url", served.url])
    assert status.value.code == 0
    embedding = orjson.loads(capsys.readouterr().out)["embedding"]
    assert [len(row) for row in embedding] == [384, 384]


def test_carpool_predict_says_what_went_wrong_and_exits_1(
    served: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as status:
        main(["predict", "nope", "--input", "[1]", "--url", served.url])
    assert status.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "404" in captured.err
    assert "nope" in captured.err
