"""Clients for carpool's v2 HTTP API: ``Client`` (blocking) and ``AsyncClient``.

Both read a model's metadata once, to send each input in the datatype and
shape the model declares, so plain lists work as well as numpy arrays::

    with Client("http://127.0.0.1:8000") as client:
        client.infer("digits", {"pixels": image})["label"]

``AsyncClient.stream`` sends many requests over one WebSocket (client/stream.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import connect

from client.errors import InferenceError
from client.stream import Stream
from client.tensors import Spec, decode, encode

DEFAULT_URL = "http://127.0.0.1:8000"
_HEADER_LENGTH = "inference-header-content-length"


class _Requests:
    """What both clients share: paths, request bodies, reading answers."""

    def __init__(
        self, url: str, binary: bool, token: str | None, headers: dict[str, str] | None
    ) -> None:
        self.url = url.rstrip("/")
        self.binary = binary
        self.headers = dict(headers or {})
        if token is not None:
            self.headers["authorization"] = f"Bearer {token}"
        self._specs: dict[tuple[str, str | None], list[Spec]] = {}

    @staticmethod
    def _model_path(model: str, version: str | None) -> str:
        return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")

    def _body(
        self, specs: list[Spec], inputs: Any, outputs: Sequence[str] | None
    ) -> tuple[bytes, dict[str, str], bool]:
        encoded = encode(specs, inputs, binary=self.binary)
        doc: dict[str, Any] = {"inputs": encoded.inputs}
        if outputs is not None:
            doc["outputs"] = [{"name": name} for name in outputs]
        if not encoded.chunks:
            return orjson.dumps(doc), {"content-type": "application/json"}, encoded.single
        doc["parameters"] = {"binary_data_output": True}
        header = orjson.dumps(doc)
        headers = {"content-type": "application/octet-stream", _HEADER_LENGTH: str(len(header))}
        return b"".join((header, *encoded.chunks)), headers, encoded.single

    @staticmethod
    def _read(response: httpx.Response, single: bool) -> dict[str, Any]:
        _raise_for_error(response)
        content = response.content
        length = response.headers.get(_HEADER_LENGTH)
        if length is None:
            return decode(orjson.loads(content), None, single)
        split = int(length)
        return decode(orjson.loads(content[:split]), memoryview(content)[split:], single)


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        doc = orjson.loads(response.content)
        message, reason = str(doc["error"]), doc.get("reason")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message, reason = response.text or response.reason_phrase, None
    retry = response.headers.get("retry-after")
    raise InferenceError(
        response.status_code,
        message,
        reason=reason,
        retry_after=float(retry) if retry and retry.isdigit() else None,
    )


class Client(_Requests):
    """A blocking client for the v2 HTTP API.

    ``token`` is sent as ``Authorization: Bearer``; ``binary=False`` sends
    numpy arrays as JSON instead of raw bytes."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        headers: dict[str, str] | None = None,
        binary: bool = True,
    ) -> None:
        super().__init__(url, binary, token, headers)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def live(self) -> bool:
        return self._http.get("/v2/health/live").status_code == 200

    def ready(self, model: str | None = None) -> bool:
        path = "/v2/health/ready" if model is None else self._model_path(model, None) + "/ready"
        return self._http.get(path).status_code == 200

    def metadata(self, model: str | None = None, version: str | None = None) -> dict[str, Any]:
        """The server's metadata, or a model's (inputs, outputs, versions)."""
        response = self._http.get("/v2" if model is None else self._model_path(model, version))
        _raise_for_error(response)
        doc: dict[str, Any] = orjson.loads(response.content)
        return doc

    def infer(
        self,
        model: str,
        inputs: Any,
        outputs: Sequence[str] | None = None,
        *,
        version: str | None = None,
    ) -> dict[str, Any]:
        """Run ``inputs`` (a dict by input name, or a bare value for a model
        with one input) and return the outputs by name."""
        specs = self._specs.get((model, version))
        if specs is None:
            specs = self._specs[model, version] = Spec.parse(self.metadata(model, version))
        body, headers, single = self._body(specs, inputs, outputs)
        path = self._model_path(model, version) + "/infer"
        return self._read(self._http.post(path, content=body, headers=headers), single)


class AsyncClient(_Requests):
    """An asyncio client for the v2 HTTP API, and for streams over WebSocket."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        headers: dict[str, str] | None = None,
        binary: bool = True,
    ) -> None:
        super().__init__(url, binary, token, headers)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=self.headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def live(self) -> bool:
        return (await self._http.get("/v2/health/live")).status_code == 200

    async def ready(self, model: str | None = None) -> bool:
        path = "/v2/health/ready" if model is None else self._model_path(model, None) + "/ready"
        return (await self._http.get(path)).status_code == 200

    async def metadata(
        self, model: str | None = None, version: str | None = None
    ) -> dict[str, Any]:
        """The server's metadata, or a model's (inputs, outputs, versions)."""
        path = "/v2" if model is None else self._model_path(model, version)
        response = await self._http.get(path)
        _raise_for_error(response)
        doc: dict[str, Any] = orjson.loads(response.content)
        return doc

    async def infer(
        self,
        model: str,
        inputs: Any,
        outputs: Sequence[str] | None = None,
        *,
        version: str | None = None,
    ) -> dict[str, Any]:
        """Run ``inputs`` (a dict by input name, or a bare value for a model
        with one input) and return the outputs by name."""
        specs = await self._inputs(model, version)
        body, headers, single = self._body(specs, inputs, outputs)
        path = self._model_path(model, version) + "/infer"
        return self._read(await self._http.post(path, content=body, headers=headers), single)

    async def stream(
        self,
        model: str,
        inputs: Iterable[Any] | AsyncIterable[Any],
        *,
        window: int = 64,
        version: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Run every input over one WebSocket, keeping up to ``window`` in
        flight, and yield their outputs in input order. The first request
        that fails raises ``InferenceError``."""
        async with self.connect(model, version=version) as stream:
            async for outputs in stream.map(inputs, window=window):
                yield outputs

    @asynccontextmanager
    async def connect(self, model: str, *, version: str | None = None) -> AsyncIterator[Stream]:
        """A ``Stream`` to ``model``: submit requests, await their answers."""
        specs = await self._inputs(model, version)
        scheme, _, rest = self.url.partition("://")
        url = ("wss" if scheme == "https" else "ws") + "://" + rest
        websocket = await connect(
            url + self._model_path(model, version) + "/stream",
            additional_headers=self.headers,
            compression=None,  # tensors hardly compress; deflate would cost both ends CPU
            max_size=None,  # answers are as large as the server makes them
        )
        stream = Stream(websocket, specs, binary=self.binary)
        try:
            yield stream
        finally:
            await stream.aclose()

    async def _inputs(self, model: str, version: str | None) -> list[Spec]:
        specs = self._specs.get((model, version))
        if specs is None:
            specs = self._specs[model, version] = Spec.parse(await self.metadata(model, version))
        return specs
