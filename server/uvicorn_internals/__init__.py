"""Every place carpool relies on uvicorn's internals, and nothing else.

Written against uvicorn 0.54 (pinned to <0.55 in pyproject.toml): read it
again before moving the pin. ``DeadlineProtocol`` is uvicorn's httptools
protocol with what uvicorn lacks: deadlines for receiving a request
(slowloris, uvicorn #157: ``header_timeout`` to the last header,
``body_timeout`` to the body's last byte; 408, or 431 past a cap on an
unfinished head, then a lingering close), answers that leave in one write,
the hand-over of plain infer requests to the direct lane (``server/direct.py``:
no ASGI scope, task or cycle for them), and one keep-alive timer per
connection instead of one per answer. ``server/limits.py`` applies the exact
header limit (431) on the ASGI way. ``Server`` is uvicorn's, with carpool's
drain (``server/lifecycle.py``) first and the GC settings for serving. The
WebSocket protocol's changes are in ``server/stream_protocol.py``.

``receipt.py`` has the deadlines, the head cap and the lingering close
(``ReceiptDeadlines``); ``http.py`` builds ``DeadlineProtocol`` on it;
``serving.py`` has ``Server``.
"""

from server.uvicorn_internals.http import DeadlineProtocol
from server.uvicorn_internals.receipt import (
    _BODY,
    _IDLE,
    HEAD_SLACK,
    ReceiptDeadlines,
    _ResponseTransport,
)
from server.uvicorn_internals.serving import YOUNG_GC_THRESHOLD, Server

__all__ = [
    "HEAD_SLACK",
    "YOUNG_GC_THRESHOLD",
    "_BODY",
    "_IDLE",
    "DeadlineProtocol",
    "ReceiptDeadlines",
    "Server",
    "_ResponseTransport",
]
