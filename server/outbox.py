"""A stream's answers on their way out, in the order they finish.

Answers are posted from the done-callbacks of queued requests (``post``);
one writer task (``write``) sends them. With carpool's stream protocol
(``frames.SEND_MANY``) every answer that is waiting goes in one write: the
answers of one batch arrive in one turn of the loop, so they leave in one
syscall. Under any other server each is one ASGI message. The close frame
(``post_close``) goes last, once, and ends the writer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator

from server import frames
from server.asgi import Message, Send


class Outbox:
    """What waits to be sent on one stream; ``sent(count)`` is told of every
    ``count`` answers that have left."""

    def __init__(self, send: Send, send_many: bool, sent: Callable[[int], None]) -> None:
        self._send = send
        self._send_many = send_many  # the protocol writes many frames at once
        self._sent = sent
        self._queue: deque[frames.Frame | Message] = deque()  # a Message: the close
        self._wake = asyncio.Event()  # the queue has something
        self.closing = False  # a close frame is posted

    def __iter__(self) -> Iterator[frames.Frame | Message]:
        """What is posted and not yet sent."""
        return iter(self._queue)

    def post(self, message: frames.Frame | Message) -> None:
        self._queue.append(message)
        self._wake.set()

    def post_close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self.post(frames.close(code, reason))

    async def write(self) -> None:
        """Send what is posted, until the close frame has gone."""
        queue = self._queue
        send = self._send
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = queue.popleft()
            count = 1
            if isinstance(first, tuple):
                if self._send_many:
                    batch = [first]
                    while queue and isinstance(queue[0], tuple):
                        batch.append(queue.popleft())  # type: ignore[arg-type]
                    message: Message = {"type": frames.SEND_MANY, "frames": batch}
                    count = len(batch)
                else:
                    message = frames.message(first)
            else:
                message = first  # the close
            try:
                await send(message)
            except RuntimeError as exc:
                # uvicorn refuses to send once the protocol has closed the
                # connection itself (a 1009, say) and before it reports the loss
                raise ConnectionError(f"the connection is closed: {exc}") from exc
            if message["type"] == "websocket.close":
                return
            self._sent(count)
