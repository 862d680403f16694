"""Bootstrap intervals over statements, and win / tie / loss verdicts from paired differences.

A pair (A, B) is scored on A's held-out statements S_A and B's S_B. Under A's
condition every statement gets a score (mean token log-prob); AUC_A is the
share of (s in S_A, t in S_B) pairs where s scores higher (ties half), AUC_B
the same under B's condition with the roles swapped, and

    separation = AUC_A + AUC_B - 1.

A bootstrap replicate resamples S_A and S_B with replacement (multinomial
counts w_A, w_B) and recomputes both AUCs on the same resampled statements:
AUC_A = w_A' M_A w_B / (|S_A| |S_B|) with M_A[i, j] = [a_i > b_j] + [a_i = b_j] / 2,
so R replicates cost two small matrix products. The 95% interval is the
2.5 / 97.5 percentile of the replicates.

Comparing two conditions on the same pair (a mask against a baseline), the
*same* replicates are applied to both (a paired bootstrap): the difference of
separations gets a percentile interval, and the verdict is ``win`` when the
interval lies above zero, ``loss`` when below, else ``tie``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from persona_core.eval.estimates import win_matrix

REPLICATES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class PairScores:
    """One condition's per-statement scores for a pair: A's condition on (S_A, S_B), B's on (S_B, S_A)."""

    a_own: np.ndarray  # A's condition, A's statements
    a_other: np.ndarray  # A's condition, B's statements
    b_own: np.ndarray  # B's condition, B's statements
    b_other: np.ndarray  # B's condition, A's statements

    def __post_init__(self):
        for f in ("a_own", "a_other", "b_own", "b_other"):
            object.__setattr__(self, f, np.asarray(getattr(self, f), dtype=np.float64))
        if len(self.a_own) != len(self.b_other) or len(self.a_other) != len(self.b_own):
            raise ValueError(f"pair scores do not cover the same statements on both sides ({len(self.a_own)} vs "
                             f"{len(self.b_other)} of A's, {len(self.a_other)} vs {len(self.b_own)} of B's)")
        if not len(self.a_own) or not len(self.b_own):
            raise ValueError("pair scores need statements on both sides")

    @classmethod
    def from_items(cls, items_a, own_a: int, items_b, own_b: int) -> "PairScores":
        """From the results' ``items`` of A's and B's rows (own statements first, ``items_own`` of them)."""
        a, b = np.asarray(items_a, dtype=np.float64), np.asarray(items_b, dtype=np.float64)
        return cls(a[:own_a], a[own_a:], b[:own_b], b[own_b:])

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.a_own), len(self.b_own)

    def swapped(self) -> "PairScores":
        """The same scores with B as the first pole (another analysis may name the pair the other way round)."""
        return PairScores(self.b_own, self.b_other, self.a_own, self.a_other)

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        return win_matrix(self.a_own, self.a_other), win_matrix(self.b_own, self.b_other)  # (nA, nB), (nB, nA)

    def separation(self) -> float:
        ma, mb = self.matrices()
        return float(ma.mean() + mb.mean() - 1)


def resamples(sizes: tuple[int, int], replicates: int = REPLICATES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial resampling counts (R, nA) and (R, nB), seeded."""
    rng = np.random.default_rng(seed)
    na, nb = sizes
    wa = rng.multinomial(na, np.full(na, 1.0 / na), size=replicates).astype(np.float64)
    wb = rng.multinomial(nb, np.full(nb, 1.0 / nb), size=replicates).astype(np.float64)
    return wa, wb


def replicate_separations(scores: PairScores, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    ma, mb = scores.matrices()
    na, nb = scores.sizes
    auc_a = np.einsum("ri,ij,rj->r", wa, ma, wb) / (na * nb)
    auc_b = np.einsum("rj,ji,ri->r", wb, mb, wa) / (na * nb)
    return auc_a + auc_b - 1


def _interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Interval:
    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


def separation_interval(scores: PairScores, replicates: int = REPLICATES, seed: int = 0) -> Interval:
    """The pair's separation and its 95% bootstrap interval over statements."""
    wa, wb = resamples(scores.sizes, replicates, seed)
    return Interval(scores.separation(), *_interval(replicate_separations(scores, wa, wb)))


@dataclass(frozen=True)
class Verdict:
    difference: Interval  # separation(method) - separation(baseline), paired bootstrap interval
    verdict: str  # win / tie / loss


def compare(method: PairScores, baseline: PairScores, replicates: int = REPLICATES, seed: int = 0) -> Verdict:
    """Paired bootstrap of separation(method) - separation(baseline) on the same statements."""
    if method.sizes != baseline.sizes:
        raise ValueError(f"conditions scored different statement sets ({method.sizes} vs {baseline.sizes})")
    wa, wb = resamples(method.sizes, replicates, seed)
    diff = replicate_separations(method, wa, wb) - replicate_separations(baseline, wa, wb)
    lo, hi = _interval(diff)
    verdict = "win" if lo > 0 else "loss" if hi < 0 else "tie"
    return Verdict(Interval(method.separation() - baseline.separation(), lo, hi), verdict)


def mean_interval(values, replicates: int = REPLICATES, seed: int = 0) -> Interval:
    """Mean over pairs with a bootstrap interval over pairs (for 'mean separation' lines)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return Interval(float("nan"), float("nan"), float("nan"))
    if len(v) == 1:
        return Interval(float(v[0]), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(replicates, len(v)))
    return Interval(float(v.mean()), *_interval(v[idx].mean(1)))


def mean_separation_interval(pairs: list[PairScores], replicates: int = REPLICATES, seed: int = 0) -> Interval:
    """Mean separation over pairs with a 95% interval from resampling each pair's statements
    (the pairs themselves held fixed): the uncertainty of this mean on these pairs."""
    if not pairs:
        return Interval(float("nan"), float("nan"), float("nan"))
    reps = np.zeros(replicates)
    for k, sc in enumerate(pairs):
        wa, wb = resamples(sc.sizes, replicates, seed + k)
        reps += replicate_separations(sc, wa, wb)
    reps /= len(pairs)
    return Interval(float(np.mean([sc.separation() for sc in pairs])), *_interval(reps))
