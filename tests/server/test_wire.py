"""``server/wire.py``: the client frames carpool reads itself are read as
websockets reads them, and anything else is left to websockets; through a
real server, messages split anywhere and pings between them are answered."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from server import wire
from tests.scenarios.test_stream_abuse import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    RawStream,
    frame,
    request,
    serving,
    ys,
)
from tests.servers import Running

messages = st.lists(  # (text?, payload size): small frames, and ones around 2**16
    st.tuples(st.booleans(), st.one_of(st.integers(0, 300), st.integers(65530, 65545))),
    max_size=6,
)


def payload(size: int, salt: int) -> bytes:
    return bytes((salt + i) % 251 for i in range(size))


def websockets_reads(data: bytes) -> list[tuple[bool, bytes]]:
    """Every whole frame websockets parses from ``data`` as a server."""
    reader = StreamReader()
    reader.feed_data(data)
    read = []
    while True:
        parser = Frame.parse(reader.read_exact, mask=True)
        try:
            next(parser)
        except StopIteration as done:
            parsed: Frame = done.value
            read.append((parsed.opcode is Opcode.TEXT, bytes(parsed.data)))
            continue
        return read  # it waits for more bytes


@settings(max_examples=100, deadline=None)
@given(messages, st.floats(0, 1))
def test_data_frames_reads_what_websockets_reads_and_holds_a_partial_frame(
    sizes: list[tuple[bool, int]], cut: float
) -> None:
    sent = [(is_text, payload(size, salt)) for salt, (is_text, size) in enumerate(sizes)]
    encoded = [frame(TEXT if is_text else BINARY, body) for is_text, body in sent]
    data = b"".join(encoded)
    head = data[: int(len(data) * cut)]
    found, stop, foreign = wire.data_frames(head, None)
    assert [(is_text, body) for _, is_text, body in found] == websockets_reads(head)
    assert [end for end, _, _ in found][-1:] == ([stop] if found else [])
    # what is left is a partial frame: held here when small, else websockets'
    if stop == len(head):
        assert not foreign
    else:
        partial = encoded[len(found)]
        length_known = len(head) - stop >= {126: 4, 127: 10}.get(partial[1] & 0x7F, 2)
        assert foreign == (length_known and len(partial) > wire.HOLD_BYTES)
    whole, stop, _ = wire.data_frames(data, None)
    assert [(t, p) for _, t, p in whole] == sent
    assert stop == len(data)


@pytest.mark.parametrize(
    "other",
    [
        frame(PING, b"p"),
        frame(PONG, b"p"),
        frame(CLOSE, b"\x03\xe8"),
        frame(TEXT, b"start", fin=False),
        frame(0x0, b"more"),
        frame(TEXT, b"x", rsv=0b100),
        frame(TEXT, b"x", key=b""),  # unmasked
        frame(0x3, b"x"),  # an unknown opcode
        frame(BINARY, b"x" * 101),  # over the size limit
    ],
    ids=["ping", "pong", "close", "fragment", "continuation", "rsv", "unmasked", "opcode", "big"],
)
def test_data_frames_stops_at_a_frame_it_leaves_to_websockets(other: bytes) -> None:
    before = frame(TEXT, b"first")
    found, stop, foreign = wire.data_frames(before + other + frame(TEXT, b"after"), 100)
    assert [body for _, _, body in found] == [b"first"]
    assert (stop, foreign) == (len(before), True)


# -- through a real server ---------------------------------------------------------


@pytest.fixture(scope="module")
def stream_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with serving(tmp_path_factory.mktemp("wire")) as running:
        yield running


def _chunks(data: bytes, rng: random.Random) -> Iterator[bytes]:
    at = 0
    while at < len(data):
        size = rng.choice([1, 2, 3, 7, 60, 200, 4096])
        yield data[at : at + size]
        at += size


async def test_messages_split_anywhere_with_pings_between_are_all_answered(
    stream_server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = 0
    original = wire.data_frames

    def counted(buf: bytes, max_size: int | None) -> tuple[list[wire.DataFrame], int, bool]:
        nonlocal reads
        reads += 1
        return original(buf, max_size)

    monkeypatch.setattr(wire, "data_frames", counted)  # the server runs in this process
    raw = RawStream(stream_server.port)
    raw.request("first", 0.5)  # after the handshake: the first message goes to websockets
    assert ys(await asyncio.to_thread(raw.answer)) == [1.0]
    count, pings = 40, {5, 17, 18, 31}
    data = b"".join(
        (frame(PING, b"ping%d" % i) if i in pings else b"")
        + frame(TEXT, request(f"m{i}", float(i)).encode())
        for i in range(count)
    )
    for chunk in _chunks(data, random.Random(11)):
        raw.send(chunk)
    got: dict[str, list[float]] = {}
    pongs: list[bytes] = []
    while len(got) < count:
        answer = await asyncio.to_thread(raw.read)
        assert answer is not None, "the server closed the stream"
        if answer.opcode == PONG:
            pongs.append(answer.payload)
        else:
            assert answer.opcode == TEXT, answer
            doc = orjson.loads(answer.payload)
            got[doc["id"]] = ys(doc)
    raw.close()
    assert got == {f"m{i}": [2.0 * i] for i in range(count)}
    assert sorted(pongs) == sorted(b"ping%d" % i for i in pings)
    assert reads > 0  # carpool's reader read them, not websockets alone
