"""``server/stream_protocol.py``: the frames it writes itself are the ones
websockets reads."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from server.wire import frame_head


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("is_text", [True, False])
def test_frame_heads_parse_as_websockets_reads_a_servers_frames(is_text: bool, length: int) -> None:
    payload = (b"a" if is_text else b"\x00") * length
    reader = StreamReader()
    reader.feed_data(frame_head(is_text, length) + payload)
    parser = Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame: Frame = done.value.value
    assert frame.opcode == (Opcode.TEXT if is_text else Opcode.BINARY)
    assert frame.fin
    assert frame.data == payload
