"""carpool's HTTP side: the ASGI app, protocol codecs, model kinds, metrics."""

__version__ = "0.1.0"
