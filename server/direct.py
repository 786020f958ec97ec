"""The direct lane: ``POST /v2/models/{name}/infer`` answered by the HTTP
protocol itself, without ASGI.

uvicorn gives every request a scope, a task, a receive and a send
coroutine, and checks every response header against two regular
expressions; the infer route then adds a disconnect watch and the
middleware stack. For a tiny request that is most of what it costs. Here
the protocol (``server/uvicorn_internals/http.py``) hands a plain infer request,
once its headers are in, to ``DirectLane.take``; the request reads its body
from the protocol's callbacks, runs the same transaction as every transport
(``server/infer.py``), waits on its future's done-callback (no task), and
leaves as one write.

Only requests that need nothing else take the lane: a known model, a
``Content-Length`` body within the limit, no ``Expect: 100-continue``,
headers within the header limit, a valid inference token when tokens are
configured, no access log. Anything else takes uvicorn's ASGI way, whose
answer (404, 413, 431, 401, ...) is the one the tests pin. Every protection
holds: the body deadline is the protocol's, the queue deadline and the
overload refusals are the transaction's, and a client that disconnects
withdraws its queued items at once (``lose``), where the ASGI route needs a
watch task for that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from batching import Cancelled, Completion, Pending
from server import auth
from server.asgi import int_value
from server.errors import answer
from server.infer import Infer, Job
from server.kinds import Result
from server.metrics import Metrics
from server.models import ServedModel
from server.settings import Settings

Headers = list[tuple[bytes, bytes]]

_PREFIX = b"/v2/models/"
_SUFFIX = b"/infer"
_JSON_HEAD = b"content-type: application/json\r\ncontent-length: %d\r\n"
_OCTETS_HEAD = b"content-type: application/octet-stream\r\ncontent-length: %d\r\n"
_TIMINGS = b"x-carpool-queue-ms: %.3f\r\nx-carpool-compute-ms: %.3f\r\nx-carpool-batch-size: %d\r\n"


class Connection(Protocol):
    """What a direct request needs of the HTTP connection it came on."""

    def finish_direct(self, request: DirectRequest, status: int, head: bytes, body: bytes) -> None:
        """Write the status line, the server's own headers, ``head`` (this
        answer's header lines) and ``body`` in one write; end the request."""


class _NoEvent:
    """Stands in for uvicorn's per-request ``asyncio.Event``, which the
    protocol's timeout and disconnect paths set: nothing waits on it here."""

    __slots__ = ()

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


class DirectRequest:
    """One infer request on the direct lane, from its last header to its
    answer. It has the attributes uvicorn's protocol reads off a request
    cycle (``keep_alive``, ``response_started``, ``response_complete``,
    ``disconnected``, ``message_event``), so the protocol's pipelining and
    shutdown work with either kind."""

    __slots__ = (
        "_body",
        "_conn",
        "_header_length",
        "_job",
        "_lane",
        "_pending",
        "_timeout_ms",
        "complete",
        "disconnected",
        "keep_alive",
        "message_event",
        "model",
        "name",
        "response_complete",
        "response_started",
        "started",
    )

    def __init__(
        self,
        lane: DirectLane,
        conn: Connection,
        model: ServedModel,
        name: str,
        keep_alive: bool,
        timeout_ms: bytes | None,
        header_length: bytes | None,
    ) -> None:
        self._lane = lane
        self._conn = conn
        self.model = model
        self.name = name
        self.keep_alive = keep_alive
        self._timeout_ms = timeout_ms
        self._header_length = header_length
        self._body: bytes | bytearray = b""
        self._job: Job | None = None
        self._pending: Pending[Any, Result] | None = None
        self.complete = False  # the whole body is in
        self.started = False  # nothing ahead of it on its connection
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.message_event = _NO_EVENT

    # -- from the protocol -------------------------------------------------------

    def add_body(self, chunk: bytes) -> None:
        body = self._body
        if not body:
            self._body = chunk
        elif isinstance(body, bytearray):
            body += chunk
        else:
            self._body = bytearray(body) + chunk

    def body_complete(self) -> None:
        self.complete = True
        if self.started:
            self._run()

    def begin(self) -> None:
        """The requests ahead of this one on its connection are answered."""
        self.started = True
        if self.complete:
            self._run()

    def lose(self) -> None:
        """The client is gone: withdraw what is still queued, answer nothing."""
        if self.response_complete or self.disconnected:
            return
        self.disconnected = True
        pending = self._pending
        if pending is not None and not pending.future.done():
            self.model.batcher.withdraw(pending)
            self._lane.metrics.count(self.name, "cancelled")

    # -- the transaction ---------------------------------------------------------

    def _run(self) -> None:
        if self.disconnected or self.response_started:
            return
        lane = self._lane
        infer = lane.infer
        model = self.model
        try:
            model.batcher.admit(1)
            body = self._body
            request = infer.decode(
                model,
                body if isinstance(body, bytes) else bytes(body),
                int_value(b"inference-header-content-length", self._header_length),
            )
            timeout_ms = int_value(b"x-carpool-timeout-ms", self._timeout_ms)
            job = self._job = infer.prepare(model, request, timeout_ms)
            pending = self._pending = infer.enqueue(job)
        except Exception as exc:
            self._refuse(exc)
            return
        self._body = b""
        pending.future.add_done_callback(self._answered)

    def _answered(self, future: asyncio.Future[Completion[Result]]) -> None:
        if self.disconnected:
            return  # counted as cancelled when the client left
        job = self._job
        assert job is not None
        if future.cancelled():  # only lose() withdraws; anything else is a shutdown
            self._refuse(Cancelled("the server shut down before this request finished"))
            return
        try:
            completion = future.result()
            payload, header_length = self._lane.infer.encode(job, completion)
        except Exception as exc:
            self._refuse(exc)
            return
        head = _TIMINGS % (
            completion.queue_seconds * 1000,
            completion.compute_seconds * 1000,
            completion.batch_size,
        )
        if header_length is None:
            head = _JSON_HEAD % len(payload) + head
        else:
            head = (
                _OCTETS_HEAD % len(payload)
                + head
                + b"inference-header-content-length: %d\r\n" % header_length
            )
        self._lane.metrics.count(self.name, "ok")
        self._finish(200, head, payload)

    def _refuse(self, exc: BaseException) -> None:
        told = answer(exc)
        self._lane.metrics.count(self.name, told.reason)
        body = told.body
        head = [_JSON_HEAD % len(body), *[b"%s: %s\r\n" % pair for pair in told.headers]]
        self._finish(told.status, b"".join(head), body)

    def _finish(self, status: int, head: bytes, body: bytes) -> None:
        self.response_started = True
        self.response_complete = True
        self._job = self._pending = None  # an idle connection keeps its last request
        self._conn.finish_direct(self, status, head, body)


class DirectLane:
    """Decides which requests take the direct lane, and starts them."""

    __slots__ = ("infer", "max_body_bytes", "max_header_bytes", "metrics", "tokens")

    def __init__(
        self,
        infer: Infer,
        metrics: Metrics,
        settings: Settings,
    ) -> None:
        self.infer = infer
        self.metrics = metrics
        self.max_body_bytes = settings.max_body_bytes
        self.max_header_bytes = settings.max_header_bytes
        self.tokens: Callable[[Headers], bool] | None = auth.inference_gate(settings)

    @classmethod
    def for_app(cls, app: object, settings: Settings) -> DirectLane | None:
        """The lane for a carpool app, or None: for another ASGI app (the
        benchmark's floor), or when the access log is on (it logs from the
        ASGI middleware)."""
        infer = getattr(app, "infer", None)
        metrics = getattr(app, "metrics", None)
        if settings.access_log or not isinstance(infer, Infer) or not isinstance(metrics, Metrics):
            return None
        return cls(infer, metrics, settings)

    def take(
        self, conn: Connection, method: bytes, url: bytes, headers: Headers, keep_alive: bool
    ) -> DirectRequest | None:
        """A direct request for this request head, or None for the ASGI way."""
        if method != b"POST" or not url.startswith(_PREFIX) or not url.endswith(_SUFFIX):
            return None
        raw = url[11:-6]
        if not raw or b"/" in raw or b"%" in raw or b"?" in raw:
            return None
        model = self.infer.models.get(raw.decode("latin-1"))
        if model is None:
            return None
        size = 0
        declared = timeout_ms = header_length = None
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"content-length":
                declared = value
            elif name == b"x-carpool-timeout-ms":
                timeout_ms = value if timeout_ms is None else timeout_ms
            elif name == b"inference-header-content-length":
                header_length = value if header_length is None else header_length
            elif name == b"transfer-encoding" or name == b"expect":
                return None
        if declared is None or size > self.max_header_bytes:
            return None
        try:
            if int(declared) > self.max_body_bytes:
                return None
        except ValueError:
            return None
        if self.tokens is not None and not self.tokens(headers):
            return None
        return DirectRequest(
            self, conn, model, model.config.name, keep_alive, timeout_ms, header_length
        )
