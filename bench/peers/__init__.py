"""The peers carpool is measured against, each serving the same models
behind the same v2 request and answer bodies: Flask under gunicorn and
FastAPI under uvicorn with one forward pass per request, and mosec with its
dynamic batching. ``BENCH_MODEL`` (digits or minilm) picks the one model a
peer serves; ``BENCH_TORCH_THREADS`` its torch threads. ``floor_app`` is no
peer but the floor: a bare ASGI app on carpool's own uvicorn configuration."""
