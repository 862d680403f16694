"""Small estimates the metrics, validation, the engine and the report's bootstrap share: seeded subsets,
mean +- stderr, AUC (the one home of its win matrix)."""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import numpy as np


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


def win_matrix(pos: Sequence[float], neg: Sequence[float]) -> np.ndarray:
    """[pos_i > neg_j] + [pos_i = neg_j] / 2 for every (pos, neg) pair, shape (len(pos), len(neg)):
    its mean is the AUC."""
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    return (p[:, None] > n[None, :]) + 0.5 * (p[:, None] == n[None, :])


def pairwise_auc(pos: Sequence[float], neg: Sequence[float]) -> tuple[float, float]:
    """P(pos > neg) over all pairs (ties count half) and its Hanley-McNeil standard error."""
    if not pos or not neg:
        return float("nan"), float("nan")
    auc = float(win_matrix(pos, neg).mean())
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (len(pos) - 1) * (q1 - auc**2) + (len(neg) - 1) * (q2 - auc**2)) / (len(pos) * len(neg))
    return auc, math.sqrt(max(var, 0.0))
