"""carpool's Python client: the v2 HTTP API and WebSocket streams.

    import asyncio
    from client import AsyncClient

    async def main(images):
        async with AsyncClient("http://127.0.0.1:8000") as carpool:
            async for outputs in carpool.stream("digits", images):
                print(outputs["label"])

``Client`` is the blocking counterpart for the HTTP API (no streams).
"""

from client.errors import ClientError, InferenceError, StreamClosed
from client.http import AsyncClient, Client
from client.stream import Stream

__all__ = ["AsyncClient", "Client", "ClientError", "InferenceError", "Stream", "StreamClosed"]
