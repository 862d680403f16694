"""Small numeric helpers the evaluator and the metrics share: seeded subsets and mean +- stderr.

Kept apart so that `evaluate` and `metrics` never import each other for them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence


def take(items: Sequence[str], k: int, seed: int) -> list[str]:
    """At most k items, chosen by a seeded hash of each text (stable as items are added)."""
    items = list(dict.fromkeys(items))
    if len(items) <= k:
        return items
    rank = lambda s: hashlib.sha256(f"{seed}\x00{s}".encode()).hexdigest()  # noqa: E731
    keep = set(sorted(items, key=rank)[:k])
    return [s for s in items if s in keep]


def mean_stderr(values: Iterable[float]) -> tuple[float, float]:
    """The mean and its standard error (nan where undefined: no values, or one)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var / len(vals))
