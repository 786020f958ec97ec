"""Steady, bounded load: a few clients sending digits requests in a loop,
counting every answer that is not a 200 and every request that got none.

    async with SteadyLoad("http://127.0.0.1:8080") as load:
        await load.answered(500)        # 500 more answers, whatever they were
    assert load.failures == []
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

import httpx
import orjson

# An 8x8 handwritten 0, raw intensities 0-16 as scikit-learn gives them.
DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0]
DIGIT_ZERO += [0, 4, 12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2]
DIGIT_ZERO += [14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
BODY = orjson.dumps(
    {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": DIGIT_ZERO}],
        "outputs": [{"name": "label"}],
    }
)
PATH = "/v2/models/digits/infer"


class SteadyLoad:
    """``clients`` loops of POST, pause, POST... through ``url``, until closed
    or ``limit`` requests have been sent. Owns its tasks: leaving the
    ``async with`` stops and awaits them."""

    def __init__(
        self, url: str, clients: int = 4, pause: float = 0.01, limit: int = 20_000
    ) -> None:
        self.url = url
        self.clients = clients
        self.pause = pause
        self.limit = limit
        self.sent = 0
        self.ok = 0
        self.failures: list[str] = []
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []
        self._http = httpx.AsyncClient(
            base_url=url,
            timeout=30.0,
            limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
            headers={"content-type": "application/json"},
        )

    @property
    def done(self) -> int:
        """Requests answered or failed so far."""
        return self.ok + len(self.failures)

    async def __aenter__(self) -> SteadyLoad:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._stop = True
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self._http.aclose()

    async def answered(self, count: int, timeout: float = 60.0) -> None:
        """Waits until ``count`` more requests are done (answered or failed)."""
        target = self.done + count
        deadline = time.monotonic() + timeout
        while self.done < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.done}/{target} requests done after {timeout} s")
            if all(task.done() for task in self._tasks):
                raise RuntimeError(f"the load stopped at {self.done} of {target} requests")
            await asyncio.sleep(0.05)

    async def _client(self) -> None:
        while not self._stop and self.sent < self.limit:
            self.sent += 1
            try:
                response = await self._http.post(PATH, content=BODY)
            except httpx.HTTPError as error:
                self.failures.append(f"{type(error).__name__}: {error}")
            else:
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{response.status_code}: {response.text[:200]}")
            await asyncio.sleep(self.pause)
