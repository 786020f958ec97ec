"""FastAPI, served by uvicorn (uvloop, httptools): one forward pass per request.

The endpoint is ``async`` and reads the raw body: no pydantic model and no
thread pool hop, the fastest way FastAPI can serve a model on one core.

    BENCH_MODEL=digits uvicorn bench.peers.fastapi_app:app --loop uvloop --http httptools
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

from bench.peers.v2 import Served

served = Served.from_env()
app = FastAPI()


@app.post(served.path)
async def infer(request: Request) -> Response:
    status, body = served.infer(await request.body())
    return Response(body, status_code=status, media_type="application/json")
