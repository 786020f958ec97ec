"""The one rule every load generator here obeys: loopback targets only.

A benchmark sends a lot of traffic, so it may only ever reach this machine:
an IP literal in 127.0.0.0/8, ``::1``, or the name ``localhost``. Names are
not resolved, because a name can point anywhere.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

HOST = "127.0.0.1"


class NotLoopback(ValueError):
    """A target outside this machine's loopback range."""


def require_loopback(host: str) -> str:
    """``host`` itself if it is a loopback address, else ``NotLoopback``."""
    bare = host.strip().removeprefix("[").removesuffix("]")
    if bare.lower() == "localhost":
        return host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise NotLoopback(
            f"refusing to load {host!r}: the benchmark targets loopback addresses only "
            "(127.0.0.0/8, ::1, localhost)"
        ) from None
    if not address.is_loopback:
        raise NotLoopback(
            f"refusing to load {host!r}: it is not a loopback address (127.0.0.0/8, ::1)"
        )
    return host


def require_loopback_url(url: str) -> str:
    """``url`` itself if its host is a loopback address, else ``NotLoopback``."""
    host = urlsplit(url).hostname
    if not host:
        raise NotLoopback(f"refusing to load {url!r}: it names no host")
    require_loopback(host)
    return url
