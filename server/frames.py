"""The messages of a WebSocket stream, as bytes.

A client message is one v2 infer request with an ``id``: a text frame holds
its JSON body; a binary frame holds the binary tensor extension's body (JSON
header, then raw little-endian tensors) behind a 4-byte little-endian length
of the header. An answer is a text frame for a text request and a binary
frame in the same layout for a binary one, with the timings the HTTP route
sends as ``x-carpool-*`` headers in its v2 ``parameters``. An error is a
text frame ``{"id", "error", "status", "reason"}`` with the HTTP status the
same fault would get (``server/errors.py`` writes it).
"""

from __future__ import annotations

import struct

import orjson

from batching import Completion
from server.asgi import Message
from server.errors import BadRequest
from server.kinds import Result

HEADER = struct.Struct("<I")


def body_of(frame: bytes, binary: bool) -> tuple[bytes, int | None]:
    """A message's infer body, and its JSON header's length when binary."""
    if not binary:
        return frame, None
    if len(frame) < HEADER.size:
        raise BadRequest(
            "a binary message starts with the 4-byte little-endian length of its JSON header"
        )
    (header_length,) = HEADER.unpack_from(frame)
    return frame[HEADER.size :], header_length


def id_of(frame: bytes, binary: bool) -> str | None:
    """The id of a message that failed validation, when it can be read."""
    try:
        if binary:
            (length,) = HEADER.unpack_from(frame)
            frame = frame[HEADER.size : HEADER.size + length]
        doc = orjson.loads(frame)
    except (struct.error, orjson.JSONDecodeError):
        return None
    value = doc.get("id") if type(doc) is dict else None
    return value if type(value) is str else None


Frame = tuple[bool, bytes]
"""An answer as it goes out: (a text frame?, its bytes)."""

SEND_MANY = "carpool.websocket.send_many"
"""The ASGI extension (and message type) of carpool's stream protocol
(``server/stream_protocol.py``): ``{"type": SEND_MANY, "frames": [Frame, ...]}``
sends many frames in one write."""


PUSH = "carpool.websocket.push"
"""The ASGI extension (and message type) with which a stream takes its
messages straight from carpool's stream protocol: ``{"type": PUSH, "sink":
feed}``, where ``feed(data, binary) -> bool`` takes one message's bytes, or
says False (it has no room) and the protocol queues that message and the
next ones for ``receive()`` until the app has read them all."""


def message(frame: Frame) -> Message:
    """A frame as the standard ASGI ``websocket.send`` message."""
    is_text, data = frame
    if is_text:
        return {"type": "websocket.send", "text": data.decode()}
    return {"type": "websocket.send", "bytes": data}


def result(
    payload: bytes, header_length: int | None, completion: Completion[Result], binary: bool
) -> Frame:
    """The message answering a request with ``payload`` (as the infer
    transaction encoded it), its timings added to the JSON."""
    # orjson's object ends with its "}": the timings go in before it
    timings = b',"parameters":{"queue_ms":%.3f,"compute_ms":%.3f,"batch_size":%d}}' % (
        completion.queue_seconds * 1000,
        completion.compute_seconds * 1000,
        completion.batch_size,
    )
    if binary:
        end = len(payload) if header_length is None else header_length
        header = payload[: end - 1] + timings
        return False, b"".join((HEADER.pack(len(header)), header, payload[end:]))
    return True, payload[:-1] + timings


def text(data: bytes) -> Frame:
    return True, data


def close(code: int, reason: str) -> Message:
    return {"type": "websocket.close", "code": code, "reason": reason}
