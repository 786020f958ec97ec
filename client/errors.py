"""What the client raises.

    ClientError
     ├── InferenceError    the server answered a request with an error status
     └── StreamClosed      a stream closed with requests still unanswered

Transport failures (connection refused, timeouts) come from httpx and
websockets as they are.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base class of the client's own errors."""


class InferenceError(ClientError):
    """The server refused or failed a request.

    ``status`` is the HTTP status (on a stream, the status the same fault
    would get over HTTP), ``reason`` the server's short label (``invalid``,
    ``overloaded``, ``deadline_exceeded``, ...), ``retry_after`` its hint in
    seconds for 503s, and ``id`` the request's id on a stream.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: str | None = None,
        retry_after: float | None = None,
        id: str | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason
        self.retry_after = retry_after
        self.id = id


class StreamClosed(ClientError):
    """The WebSocket closed before every request on it was answered.

    ``code`` 1001 means the server is shutting down: what it had accepted it
    answered first, so the unanswered requests were never run and may be
    sent again elsewhere.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"the stream closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason
