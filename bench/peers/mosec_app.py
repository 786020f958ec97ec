"""mosec with its dynamic batching: a Rust HTTP front and one Python worker
that gets up to ``max_batch_size`` requests per forward pass, waiting at most
``max_wait_time`` for a batch to fill (carpool's batch sizes, mosec's
default timer).

    BENCH_MODEL=digits python -m bench.peers.mosec_app --address 127.0.0.1 --port 8000
"""

from __future__ import annotations

import os
from typing import Any

from mosec import Server, Worker
from mosec.errors import DecodingError

from bench.peers.v2 import BadRequest, Request, Served

MAX_BATCH_SIZE = {"digits": 128, "minilm": 64}
MAX_WAIT_MS = 10


class Infer(Worker):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.served = Served.from_env()

    def deserialize(self, data: bytes) -> Any:
        try:
            return self.served.decode(data)
        except BadRequest as exc:
            raise DecodingError(str(exc)) from None

    def forward(self, data: list[Request]) -> list[bytes]:
        return self.served.run(data)

    def serialize(self, data: Any) -> bytes:
        answer: bytes = data
        return answer


def main() -> None:
    model = os.environ.get("BENCH_MODEL", "digits")
    server = Server()  # type: ignore[no-untyped-call]
    server.append_worker(
        Infer,
        num=1,
        max_batch_size=MAX_BATCH_SIZE[model],
        max_wait_time=MAX_WAIT_MS,
        route=f"/v2/models/{model}/infer",
    )
    server.run()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
