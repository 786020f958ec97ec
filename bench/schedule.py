"""The open-loop schedule: when each request is meant to be sent.

Arrivals are a Poisson process (independent exponential gaps), drawn from a
seeded generator so that every server sees exactly the same arrival times.
"""

from __future__ import annotations

import random


def poisson_schedule(rate: float, duration: float, seed: int) -> list[float]:
    """Intended send times in seconds from the start, in ``[0, duration)``."""
    if rate <= 0 or duration <= 0:
        raise ValueError("an open-loop schedule needs a positive rate and duration")
    draw = random.Random(seed)
    times: list[float] = []
    t = draw.expovariate(rate)
    while t < duration:
        times.append(t)
        t += draw.expovariate(rate)
    return times
