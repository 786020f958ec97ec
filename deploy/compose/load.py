"""deploy/local's steady load, with every answer's result checked: a 200
counts only when its label is the digit the request shows (a 0)."""

from __future__ import annotations

import httpx
import orjson

from deploy.local.load import SteadyLoad


class WrongAnswer(httpx.HTTPError):
    """A 200 whose body is not the right infer result."""


class CheckedLoad(SteadyLoad):
    """SteadyLoad whose 200s must carry label 0 for the digit-zero body;
    any other answer is one of ``failures``."""

    def __init__(
        self, url: str, clients: int = 4, pause: float = 0.01, limit: int = 20_000
    ) -> None:
        super().__init__(url, clients, pause, limit)
        self._http.event_hooks = {"response": [_check]}


async def _check(response: httpx.Response) -> None:
    if response.status_code != 200:
        return  # SteadyLoad counts it as failed
    await response.aread()
    try:
        (output,) = orjson.loads(response.content)["outputs"]
        right = output["name"] == "label" and output["data"] == [0]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        right = False
    if not right:
        raise WrongAnswer(f"wrong answer: {response.content[:200]!r}")
