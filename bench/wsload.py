"""Closed-loop points over carpool's WebSocket stream.

Connections to ``WS /v2/models/{name}/stream`` keep ``window`` requests in
flight between them: each text message is a v2 infer request with an ``id``
unique on its connection, each answer names that id, and every answer frees
a slot for the next request. The server reads at most ``PER_CONNECTION``
messages per connection ahead of its answers, so a window beyond that is
spread over several connections. Answers are judged like HTTP ones; an
``error`` answer is a failure. If the endpoint is not there, the point is
reported unavailable, not failed.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from bench.loopback import require_loopback_url
from bench.stats import Latency
from bench.workloads import FAILED, OK, Workload

PER_CONNECTION = 64  # carpool's CARPOOL_WS_MAX_IN_FLIGHT default
_KEEP_REASONS = 5


class Unavailable(Exception):
    """The server has no WebSocket stream endpoint (yet)."""


@dataclass(frozen=True, slots=True)
class WsResult:
    requests: int
    duration_s: float
    ok: int
    ok_in_window: int
    failed: int
    wrong: int
    timeouts: int
    connections: int
    latency: Latency
    reasons: tuple[str, ...]

    @property
    def rps(self) -> float:
        return self.ok_in_window / self.duration_s if self.duration_s > 0 else 0.0


@dataclass
class _Tally:
    sent: int = 0
    ok: int = 0
    in_window: int = 0
    failed: int = 0
    wrong: int = 0
    timeouts: int = 0
    latencies: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def reason(self, why: str) -> None:
        if len(self.reasons) < _KEEP_REASONS:
            self.reasons.append(why)


async def _open(url: str) -> ClientConnection:
    try:
        return await connect(
            url, compression=None, proxy=None, max_size=2**24, open_timeout=10, ping_interval=None
        )
    except InvalidStatus as exc:
        raise Unavailable(f"{url}: HTTP {exc.response.status_code} on the upgrade") from None
    except (InvalidHandshake, OSError, TimeoutError) as exc:
        raise Unavailable(f"{url}: {exc}") from None


async def _drive(
    ws: ClientConnection, workload: Workload, window: int, end: float, tally: _Tally, first: int
) -> None:
    """Keep ``window`` requests in flight on ``ws`` until ``end``, then collect."""
    items = len(workload.items)
    sent: dict[str, tuple[int, float]] = {}
    sequence = first

    async def send_one() -> None:
        nonlocal sequence
        request_id, index = str(sequence), sequence % items
        sequence += 1
        tally.sent += 1
        sent[request_id] = (index, time.perf_counter())
        await ws.send(workload.body(index, request_id), text=True)

    try:
        for _ in range(window):
            await send_one()
        async for message in ws:
            at = time.perf_counter()
            doc = orjson.loads(message)
            request_id = doc.get("id") if type(doc) is dict else None
            entry = sent.pop(request_id, None) if type(request_id) is str else None
            if entry is None or type(request_id) is not str:
                tally.wrong += 1
                tally.reason(f"an answer with an unknown id: {message[:160]!r}")
            else:
                index, started = entry
                if "error" in doc:
                    verdict, why = FAILED, f"status {doc.get('status')}: {doc['error']}"
                else:
                    verdict, why = workload.judge_doc(index, request_id, doc)
                if verdict == OK:
                    tally.ok += 1
                    tally.in_window += at < end
                    tally.latencies.append(at - started)
                else:
                    tally.failed += verdict == FAILED
                    tally.wrong += verdict != FAILED
                    tally.latencies.append(math.inf)
                    tally.reason(why)
            if at < end:
                await send_one()
            elif not sent:
                break
    except ConnectionClosed as exc:
        tally.reason(f"the connection closed: {exc}")
    finally:
        tally.timeouts += len(sent)
        tally.latencies.extend([math.inf] * len(sent))


async def closed_loop(
    url: str, workload: Workload, window: int, seconds: float, timeout: float
) -> WsResult:
    """Keep ``window`` requests in flight for ``seconds``, then collect the last
    answers (at most ``timeout`` more seconds)."""
    require_loopback_url(url)
    count = max(1, math.ceil(window / PER_CONNECTION))
    shares = [window // count + (k < window % count) for k in range(count)]
    sockets: list[ClientConnection] = []
    tally = _Tally()
    try:
        for _ in range(count):
            sockets.append(await _open(url))
        began = time.perf_counter()
        end = began + seconds
        try:
            async with asyncio.timeout(seconds + timeout):
                async with asyncio.TaskGroup() as group:
                    for k, (ws, share) in enumerate(zip(sockets, shares, strict=True)):
                        group.create_task(_drive(ws, workload, share, end, tally, k << 40))
        except TimeoutError:
            pass
    finally:
        for ws in sockets:
            await ws.close()
    elapsed = min(time.perf_counter(), end) - began
    return WsResult(
        requests=tally.sent,
        duration_s=elapsed,
        ok=tally.ok,
        ok_in_window=tally.in_window,
        failed=tally.failed,
        wrong=tally.wrong,
        timeouts=tally.timeouts,
        connections=count,
        latency=Latency.of(tally.latencies),
        reasons=tuple(tally.reasons),
    )
