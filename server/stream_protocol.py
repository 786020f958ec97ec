"""carpool's WebSocket protocol: uvicorn's websockets-sansio protocol with the
reading and writing a stream of many small messages needs.

Like ``server/uvicorn_internals/``, this relies on uvicorn's internals
(uvicorn 0.54, pinned to <0.55 in pyproject.toml) and websockets' (17):
read both again before moving a pin. The stream (``server/stream.py``)
finds what it offers in the scope's extensions (``server/frames.py``).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.protocol import State

from server import frames, wire

_READ_AHEAD = 16  # messages read ahead of the app, at most
_READ_AHEAD_BYTES = 1024 * 1024  # and their bytes (text counted in characters)


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
        # reading: data frames are read here (server/wire.py) while websockets
        # has nothing buffered; a partial small frame waits in _held
        self._reading = False
        self._held = b""
        # frames.PUSH: the stream's sink, and whether messages go to it (else
        # to the queue, until the app has read the queue empty)
        self._sink: Any = None
        self._pushing = False

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            super().data_received(data)
            self._reading = self._may_read()
            return
        if self._held:
            data = self._held + data
            self._held = b""
        conn = self.conn
        limits = [x for x in (conn.max_message_size, conn.max_fragment_size) if x is not None]
        found, stop, foreign = wire.data_frames(data, min(limits) if limits else None)
        for end, is_text, payload in found:
            self.curr_msg_data_type = "text" if is_text else "bytes"
            self.frames = [payload]
            self.send_receive_event_to_app()
            if not self._may_read():  # closing now (a 1007 or 1009, or the app's close)
                stop = end
                foreign = True
                break
        if foreign:
            self._reading = False
            if stop < len(data):
                self.data_received(data[stop:])  # websockets' rules apply from here
        elif stop < len(data):
            self._held = data[stop:]

    def _may_read(self) -> bool:
        """Whether the next bytes can be read here: an open stream with no
        extension, and websockets mid-way through nothing."""
        conn = self.conn
        return (
            self.handshake_complete
            and not self.close_sent
            and conn.state is State.OPEN
            and not conn.extensions
            and not conn.expect_continuation_frame
            and conn.parser_exc is None
            and not conn.reader.buffer
            and not self.transport.is_closing()
        )

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
            out.append(wire.frame_head(is_text, len(data)))
            out.append(data)
        self.transport.write(b"".join(out))
