"""uvicorn's ``Server``, with carpool's drain (``server/lifecycle.py``) in
front of its shutdown, and the garbage collector set for serving."""

from __future__ import annotations

import gc
import signal
import socket
from types import FrameType

import uvicorn

from server.lifecycle import Lifecycle

YOUNG_GC_THRESHOLD = 50_000  # gc.set_threshold's first value once serving (Python's: 700)


class Server(uvicorn.Server):
    """uvicorn's server, with carpool's drain in front of its shutdown."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, freeze_heap: bool = False):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.freeze_heap = freeze_heap

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the lifespan has loaded the models by now
        if self.freeze_heap:
            # What start-up built (torch, the models: ~230k objects) lives as long as
            # the process: frozen, full collections (which connection churn triggers)
            # never walk it again (~150 ms each otherwise, bench/slowloris.py).
            gc.collect()
            gc.freeze()
            # A young collection runs whenever tracked objects outnumber the freed
            # ones by the threshold: the objects of in-flight requests do, so at 700
            # collections grow with load (17 us per request at 1,000 connections,
            # measured in-process; 1.4 us at 128). Requests free their own objects
            # (no cycles), so a high threshold costs little memory.
            gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has shut down, so the process
        # dies by SIGTERM; after a completed drain orchestrators expect status 0.
        self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifecycle.shutdown()  # carpool's drain, while connections are open
        await super().shutdown(sockets)  # then uvicorn's: listeners, connections, lifespan
