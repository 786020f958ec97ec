"""carpool's /metrics, read around each point: how big its batches were and
how much of each forward pass was padding.

Counters are cumulative, so a point's figures are the difference between a
scrape just before it and one just after.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Prometheus text format -> {(name, labels): value}."""
    samples: Samples = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        labels = frozenset(_LABEL.findall(match.group(3) or ""))
        try:
            samples[(match.group(1), labels)] = float(match.group(4))
        except ValueError:
            continue
    return samples


@dataclass(frozen=True, slots=True)
class ModelFigures:
    """One model's cumulative counters at one scrape."""

    batches: float
    items: float
    size_buckets: dict[str, float]  # le -> cumulative count of batches
    tokens: float
    padded_tokens: float

    @classmethod
    def of(cls, samples: Samples, model: str) -> ModelFigures:
        def value(name: str, **labels: str) -> float:
            key = frozenset({("model", model), *labels.items()})
            return samples.get((name, key), 0.0)

        buckets = {
            dict(labels)["le"]: v
            for (name, labels), v in samples.items()
            if name == "carpool_batch_size_bucket" and ("model", model) in labels
        }
        return cls(
            batches=value("carpool_batches_total"),
            items=value("carpool_items_total"),
            size_buckets=buckets,
            tokens=value("carpool_model_total", figure="tokens"),
            padded_tokens=value("carpool_model_total", figure="padded_tokens"),
        )


@dataclass(frozen=True, slots=True)
class BatchFigures:
    """What one point's batches looked like."""

    batches: int
    items: int
    histogram: dict[str, int]  # "<=le" bucket -> batches in it, for this point
    tokens: int
    padded_tokens: int

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else math.nan

    @property
    def padding_waste(self) -> float:
        """Share of the computed tokens that were padding (0 = none)."""
        if not self.padded_tokens:
            return math.nan
        return 1 - self.tokens / self.padded_tokens


def difference(before: ModelFigures, after: ModelFigures) -> BatchFigures:
    """The batches run between two scrapes; the histogram per bucket, not cumulative."""

    def bound(le: str) -> float:
        return math.inf if le == "+Inf" else float(le)

    edges = sorted(after.size_buckets, key=bound)
    histogram: dict[str, int] = {}
    below = 0.0
    for le in edges:
        cumulative = after.size_buckets[le] - before.size_buckets.get(le, 0.0)
        label = "inf" if le == "+Inf" else f"{bound(le):g}"
        histogram[label] = round(cumulative - below)
        below = cumulative
    return BatchFigures(
        batches=round(after.batches - before.batches),
        items=round(after.items - before.items),
        histogram=histogram,
        tokens=round(after.tokens - before.tokens),
        padded_tokens=round(after.padded_tokens - before.padded_tokens),
    )
