"""Flask, served by gunicorn: one forward pass per request.

BENCH_MODEL=digits gunicorn -w 1 -k gthread --threads 8 bench.peers.flask_app:app
"""

from __future__ import annotations

from flask import Flask, Response, request

from bench.peers.v2 import Served

served = Served.from_env()
app = Flask(__name__)


@app.post(served.path)
def infer() -> Response:
    status, body = served.infer(request.get_data())
    return Response(body, status=status, mimetype="application/json")
