"""Graceful shutdown: drain before uvicorn closes anything.

uvicorn's own shutdown closes the listeners, fails open WebSockets with 1012
at once, and only then runs the lifespan shutdown, when the connections are
already gone. So the drain runs first, from ``Server.shutdown``:

1. readiness fails (503) at once, so load balancers stop sending;
2. for ``drain_delay`` seconds requests are still served as usual (time for
   endpoint removal to reach every balancer);
3. new requests get 503 + Retry-After (nginx retries them on another
   replica), while everything already accepted, HTTP and WebSocket, is
   finished within ``drain_timeout``;
4. then uvicorn's shutdown: close listeners and connections, lifespan.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from types import FrameType
from typing import Any, Protocol

import uvicorn

logger = logging.getLogger("carpool.server")


class Drainable(Protocol):
    def begin_drain(self) -> None: ...

    async def drain(self, timeout: float) -> None: ...


class Server(uvicorn.Server):
    """uvicorn's server with a drain phase in front of its shutdown."""

    def __init__(
        self,
        config: uvicorn.Config,
        state: Any,
        drain_delay: float,
        drain_timeout: float,
        freeze_heap: bool = False,
    ) -> None:
        super().__init__(config)
        self.state = state  # the app's state: .models, and .streams when streaming exists
        self.drain_delay = drain_delay
        self.drain_timeout = drain_timeout
        self.freeze_heap = freeze_heap

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the lifespan has loaded the models by now
        if self.freeze_heap:
            # What start-up built (torch, the models: ~230k objects) lives as
            # long as the process. Frozen, the cycle collector never scans it
            # again; otherwise every full collection, which connection churn
            # triggers, walks all of it (~150 ms each, bench/slowloris.py).
            gc.collect()
            gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has shut down, so the
        # process dies by SIGTERM; after a completed drain that is a clean
        # exit, and orchestrators expect status 0.
        self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.drain()
        await super().shutdown(sockets)

    async def drain(self) -> None:
        parts: list[Drainable] = [self.state.models]
        streams = getattr(self.state, "streams", None)
        if streams is not None:
            parts.append(streams)
        for part in parts:
            part.begin_drain()
        logger.info(
            "draining: not ready; finishing accepted requests (up to %.0f s)", self.drain_timeout
        )
        if self.drain_delay > 0:
            await asyncio.sleep(self.drain_delay)
        await asyncio.gather(*(part.drain(self.drain_timeout) for part in parts))
        logger.info("drained")
