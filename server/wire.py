"""WebSocket frames on the wire (RFC 6455 5.2), for the common case only.

A stream's traffic is small final data frames: the client's masked, the
server's not. websockets' parser costs about 4.2 µs a frame here (a
generator, a ``Frame`` object and its checks; timeit, 128 frames of a tiny
request in one buffer); ``data_frames`` reads the same frames for 0.9 µs.
It reads only what it is sure of - final, masked text and binary frames
with no reserved bits, within the size limit - and stops at anything else
(a control frame, a fragment, an unmasked or oversized frame), which the
protocol then hands to websockets, whose rules apply to it.
``frame_head`` writes the header of a server's data frame.
"""

from __future__ import annotations

import struct

try:  # websockets' C unmasking, as websockets.frames picks it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without the extension
    from websockets.utils import apply_mask

_TEXT, _BINARY = 0x1, 0x2
_FIN = 0x80
_MASKED = 0x80
# a partial frame larger than this goes to websockets, whose reader buffers it
# without copying it again on every read
HOLD_BYTES = 64 * 1024

_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")

DataFrame = tuple[int, bool, bytes]
"""(the offset where the frame ends, a text frame?, its unmasked payload)."""


def data_frames(buf: bytes, max_size: int | None) -> tuple[list[DataFrame], int, bool]:
    """The whole final, masked data frames at the start of ``buf``.

    Returns them, the offset where reading stopped, and whether what follows
    it must go to websockets (a frame this does not read, or a large partial
    one) rather than wait here for more bytes (a small partial frame).
    """
    found: list[DataFrame] = []
    view = memoryview(buf)
    start, size = 0, len(buf)
    while size - start >= 2:
        first, second = buf[start], buf[start + 1]
        opcode = first & 0x0F
        if first & 0x70 or not first & _FIN or not second & _MASKED or opcode not in (1, 2):
            return found, start, True  # reserved bits, a fragment, unmasked, or control
        length = second & 0x7F
        at = start + 2
        if length == 126:
            if size - at < 2:
                break
            length = (buf[at] << 8) | buf[at + 1]
            at += 2
        elif length == 127:
            if size - at < 8:
                break
            length = int.from_bytes(buf[at : at + 8], "big")
            at += 8
        if max_size is not None and length > max_size:
            return found, start, True  # websockets closes with 1009
        end = at + 4 + length
        if end > size:
            return found, start, end - start > HOLD_BYTES
        payload = apply_mask(view[at + 4 : end], buf[at : at + 4])
        found.append((end, opcode == _TEXT, payload))
        start = end
    return found, start, False


def frame_head(is_text: bool, length: int) -> bytes:
    """The header of a final, unmasked text or binary frame of ``length`` bytes."""
    first = _FIN | (_TEXT if is_text else _BINARY)
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return _HEAD_16.pack(first, 126, length)
    return _HEAD_64.pack(first, 127, length)
