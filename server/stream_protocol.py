"""carpool's WebSocket protocol: uvicorn's websockets-sansio protocol with the
reading and writing a stream of many small messages needs.

Like ``server/uvicorn_internals/``, this relies on uvicorn's internals
(uvicorn 0.54, pinned to <0.55 in pyproject.toml) and websockets' (17):
read both again before moving a pin. The stream (``server/stream.py``)
finds what it offers in the scope's extensions (``server/frames.py``).
"""

from __future__ import annotations

import struct
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.protocol import State

from server import frames

_READ_AHEAD = 16  # messages read ahead of the app, at most
_READ_AHEAD_BYTES = 1024 * 1024  # and their bytes (text counted in characters)


def frame_head(is_text: bool, length: int) -> bytes:
    """The header of a final, unmasked text or binary frame of ``length`` bytes."""
    first = 0x81 if is_text else 0x82
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _HEAD_16.pack(first, 126, length)
    return _HEAD_64.pack(first, 127, length)


_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


class StreamProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, with the reading and writing a
    stream of many small messages needs.

    uvicorn pauses reading after every message and resumes once the app has
    taken them all: two system calls a message. Here reading goes on while
    fewer than ``_READ_AHEAD`` messages (and ``_READ_AHEAD_BYTES``) wait for
    the app, so one read brings in as many messages as the socket holds;
    past that, reading pauses until the app has taken half. And
    ``frames.SEND_MANY`` (offered in the scope's extensions) sends many
    answers as one write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting_bytes = 0
        # frames.PUSH: the stream's sink, and whether messages go to it (else
        # to the queue, until the app has read the queue empty)
        self._sink: Any = None
        self._pushing = False

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # accepted by websockets: the app's task starts on the next turn
            scope["extensions"][frames.SEND_MANY] = {}
            scope["extensions"][frames.PUSH] = {}

    def send_receive_event_to_app(self) -> None:
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return
        binary = self.curr_msg_data_type != "text"
        text = ""
        if not binary:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.logger.exception("Invalid UTF-8 sequence received from client.")
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        if self._pushing:
            if self._sink(bytes(data), binary):
                return
            self._pushing = False  # the stream is full: queue until it has read them all
        if binary:
            self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
        else:
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
        self._waiting_bytes += len(data)
        if not self.read_paused and (
            self.queue.qsize() >= _READ_AHEAD or self._waiting_bytes > _READ_AHEAD_BYTES
        ):
            self.read_paused = True
            self.transport.pause_reading()

    async def receive(self) -> Any:
        if self._sink is not None and not self._pushing and self.queue.empty():
            self._pushing = True  # everything queued has been read: push again
            if self.read_paused:
                self.read_paused = False
                self.transport.resume_reading()
        message: dict[str, Any] = await self.queue.get()  # type: ignore[assignment]
        data = message.get("text") or message.get("bytes")
        if data:
            self._waiting_bytes -= len(data)
        if (
            self.read_paused
            and self.queue.qsize() <= _READ_AHEAD // 2
            and self._waiting_bytes <= _READ_AHEAD_BYTES // 2
        ):
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: Any) -> None:
        if message["type"] == frames.PUSH:
            self._sink = message["sink"]
            self._pushing = self.queue.empty()
            return
        if message["type"] != frames.SEND_MANY:
            await super().send(message)
            return
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if self.close_sent or not self.handshake_complete or self.initial_response is not None:
            raise RuntimeError("frames sent to a stream that is not open")
        conn = self.conn
        if conn.extensions or conn.expect_continuation_frame or conn.state is not State.OPEN:
            try:  # websockets frames them (compression, or an error to raise)
                for is_text, data in message["frames"]:
                    if is_text:
                        conn.send_text(data)
                    else:
                        conn.send_binary(data)
            except InvalidState:
                raise ClientDisconnected() from None
            self.transport.write(b"".join(conn.data_to_send()))
            return
        # Open, no extension: a server's data frame is a header and the payload
        # (RFC 6455 5.2: FIN, opcode, unmasked length), framed here for less
        # than websockets' Frame objects cost, after whatever websockets queued.
        out = conn.data_to_send()
        for is_text, data in message["frames"]:
            out.append(frame_head(is_text, len(data)))
            out.append(data)
        self.transport.write(b"".join(out))
