"""The server's life: start every model, and the one shutdown sequence.

``Lifecycle.shutdown`` is the only way the server stops serving. carpool's
uvicorn ``Server`` (``server/uvicorn_internals/serving.py``) runs it on SIGTERM
before uvicorn's own shutdown, while every connection is still open; the
lifespan's end runs it too, where it is a no-op by then, or the whole
sequence when the app runs under a plain uvicorn.
"""

from __future__ import annotations

import asyncio
import logging

from server.metrics import Metrics
from server.models import ModelSet
from server.websocket import StreamRegistry

logger = logging.getLogger("carpool.server")


class Lifecycle:
    """Owns the start and the drain of the models and the streams."""

    def __init__(
        self,
        models: ModelSet,
        streams: StreamRegistry,
        metrics: Metrics,
        drain_delay: float,
        drain_timeout: float,
    ) -> None:
        self.models = models
        self.streams = streams
        self.metrics = metrics
        self.drain_delay = drain_delay
        self.drain_timeout = drain_timeout
        self._lock = asyncio.Lock()
        self._stopped = False

    async def start(self) -> None:
        """Load, warm up and start every model (ready when this returns)."""
        await self.models.start(self.metrics.listener)

    async def shutdown(self) -> None:
        """Drain and stop; a second call waits for the first, then returns."""
        async with self._lock:
            if self._stopped:
                return
            self._stopped = True
            timeout = self.drain_timeout
            # 1. fail readiness (503) at once, so load balancers stop sending
            self.models.begin_drain()
            logger.info("draining: not ready; finishing accepted requests (up to %.0f s)", timeout)
            # 2. serve as usual for drain_delay: time for endpoint removal to reach every balancer
            if self.drain_delay > 0:
                await asyncio.sleep(self.drain_delay)
            # 3. stop accepting: new requests and streams get 503 + Retry-After
            self.streams.stop_accepting()
            self.models.stop_accepting()
            # 4. finish what was accepted, HTTP and WebSocket, within drain_timeout;
            # 5. past it, cancel the rest: its callers get 503, streams close with 1001;
            # 6. release: the batchers' worker threads go
            await asyncio.gather(self.streams.drain(timeout), self.models.drain(timeout))
            logger.info("drained")
