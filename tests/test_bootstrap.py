"""Bootstrap intervals over statements and paired win / tie / loss verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import math

from persona_core.report.bootstrap import PairScores, compare, mean_interval, separation_interval


def rigged(shift: float, n: int = 200, seed: int = 0) -> PairScores:
    """Scores where each side prefers its own statements: own ~ N(shift, 1), other ~ N(0, 1).
    The true AUC per side is Phi(shift / sqrt 2), so the true separation is 2 Phi(shift / sqrt 2) - 1."""
    rng = np.random.default_rng(seed)
    return PairScores(rng.normal(shift, 1, n), rng.normal(0, 1, n), rng.normal(shift, 1, n), rng.normal(0, 1, n))


def true_sep(shift: float) -> float:
    return 2 * (0.5 * (1 + math.erf(shift / 2))) - 1  # Phi(x / sqrt 2) = (1 + erf(x / 2)) / 2


def test_separation_by_hand():
    s = PairScores([3, 1], [2, 0, 1], [5, 0, 7], [4, 6])
    # A: (3>2, 3>0, 3>1, 1<2, 1>0, 1=1) -> 4.5/6; B: (5>4, 5<6, 0<4, 0<6, 7>4, 7>6) -> 3/6
    assert s.separation() == pytest.approx(4.5 / 6 + 3 / 6 - 1)
    with pytest.raises(ValueError, match="same statements"):
        PairScores([1, 2], [3], [4], [5])


def test_interval_covers_a_known_separation_and_difference():
    method, baseline = rigged(1.0, seed=1), rigged(0.3, seed=2)
    iv = separation_interval(method)
    assert iv.lo < true_sep(1.0) < iv.hi and iv.hi - iv.lo < 0.2
    v = compare(method, baseline)
    known = true_sep(1.0) - true_sep(0.3)
    assert v.difference.lo < known < v.difference.hi
    assert v.verdict == "win" and compare(baseline, method).verdict == "loss"


def test_identical_conditions_tie_and_small_sets_give_wide_intervals():
    s = rigged(0.5, n=30)
    v = compare(s, s)
    assert v.verdict == "tie" and v.difference.value == v.difference.lo == v.difference.hi == 0.0
    small = separation_interval(rigged(0.5, n=8))
    assert small.hi - small.lo > separation_interval(rigged(0.5, n=200)).hi - separation_interval(rigged(0.5, n=200)).lo
    with pytest.raises(ValueError, match="different statement sets"):
        compare(rigged(0.5, n=10), rigged(0.5, n=12))


def test_mean_interval_over_pairs():
    iv = mean_interval([0.1, 0.2, 0.3, float("nan")])
    assert iv.value == pytest.approx(0.2) and iv.lo < 0.2 < iv.hi
    assert np.isnan(mean_interval([0.4]).lo)


def test_mean_over_pairs_resamples_statements_within_each_pair():
    from persona_core.report.bootstrap import mean_separation_interval

    pairs = [rigged(1.0, seed=3), rigged(0.2, seed=4)]
    iv = mean_separation_interval(pairs)
    assert iv.value == pytest.approx(np.mean([p.separation() for p in pairs]))
    assert iv.lo < (true_sep(1.0) + true_sep(0.2)) / 2 < iv.hi
