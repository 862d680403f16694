"""The low-sparsity method that protects general capability: general-gated."""

from __future__ import annotations

import pytest
import torch

from persona_core.masks.build import build_pair_masks

from persona_core.masks.inputs import LinearWeights

from persona_core.masks.methods import METHODS

from persona_core.masks.select import n_pruned

from persona_core.masks.spec import MaskSpec
from persona_core.calib.stats import GroupStats

from test_masks import random_stats, reference_keep

NEW = ("general-gated",)


@pytest.fixture(scope="module")
def lw(tiny):
    return LinearWeights.from_model(tiny)


@pytest.fixture(scope="module")
def stats(lw):
    return [random_stats(lw.groups, 1), random_stats(lw.groups, 2), random_stats(lw.groups, 3)]


def scaled(stats: dict, channels: slice, factor: float) -> dict:
    """The same statistics with the RMS of `channels` multiplied by `factor` in every group."""
    out = {}
    for key, g in stats.items():
        f = torch.ones(g.width, dtype=torch.float64)
        f[channels] = factor
        out[key] = GroupStats(g.tokens, g.sum * f, g.sumsq * f * f, g.sumabs * f, g.samples, g.norm_sum * f,
                              g.norm_sumsq * f * f)
    return out


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("sparsity", [0.01, 0.05, 0.1, 0.6])
def test_exact_sparsity_per_row(lw, stats, method, sparsity):
    for masks in build_pair_masks(lw, *stats, spec=MaskSpec(method, sparsity)):
        for name, mask in masks.items():
            n = mask.shape[1]
            assert ((~mask).sum(1) == n_pruned(n, sparsity)).all(), name


def test_gated_prunes_only_unprotected_weights_in_contrast_order(lw, stats):
    protect, sparsity = 0.7, 0.2
    gated = build_pair_masks(lw, *stats, spec=MaskSpec("general-gated", sparsity, params={"protect": protect}))
    plain = build_pair_masks(lw, *stats[:2], spec=MaskSpec("contrastive-penalty", sparsity))
    contrast = METHODS["contrastive-penalty"]
    for g in lw.groups:
        key = (g.layer, g.name)
        for name in g.modules:
            absw = lw.weight(name).abs()
            general = absw * stats[2][key].rms.float()
            n = absw.shape[1]
            protected = reference_keep(general, absw, n - n_pruned(n, 1 - protect))
            scores = contrast.fn(absw, [stats[0][key], stats[1][key]], contrast.defaults)
            for side, score in enumerate(scores):
                mask = gated[side][name]
                assert mask[protected].all(), name  # nothing general text needs most is pruned
                # the pruned ones are the lowest contrast scores among the unprotected (ties by |W|, index)
                ref = reference_keep(torch.where(protected, torch.inf, score), absw, n - n_pruned(n, sparsity))
                assert torch.equal(mask, ref), name
            assert not torch.equal(gated[0][name], plain[0][name]) or g.in_features < 8


def test_gated_without_protection_is_the_plain_contrast(lw, stats):
    gated = build_pair_masks(lw, *stats, spec=MaskSpec("general-gated", 0.1, params={"protect": 0.0}))
    plain = build_pair_masks(lw, *stats[:2], spec=MaskSpec("contrastive-penalty", 0.1))
    for a, b in zip(gated, plain):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_gated_beyond_the_unprotected_share_prunes_least_general_first(lw, stats):
    protect, sparsity = 0.7, 0.5  # 30% open, 20% more must come from the protected, least general first
    masks = build_pair_masks(lw, *stats, spec=MaskSpec("general-gated", sparsity, params={"protect": protect}))
    for g in lw.groups:
        for name in g.modules:
            absw = lw.weight(name).abs()
            general = absw * stats[2][(g.layer, g.name)].rms.float()
            n = absw.shape[1]
            keep_general = reference_keep(general, absw, n - n_pruned(n, sparsity))
            # the weights kept are exactly the top (1 - sparsity) by general importance
            for side in masks:
                assert torch.equal(side[name], keep_general), name


@pytest.mark.parametrize("method", NEW)
def test_opposing_masks_differ_where_statistics_differ(lw, stats, method):
    base = stats[0]
    opposite = scaled(base, slice(0, 8), 3.0)
    pos, neg = build_pair_masks(lw, base, opposite, stats[2], spec=MaskSpec(method, 0.05))
    differs = 0
    for name in pos:
        diff = pos[name] ^ neg[name]
        differs += int(diff.any())
        # where the statistics are equal the two sides score alike: every difference sits in a row
        # that prunes something in channels 0..7, and the persona side prunes more there
        assert (~pos[name][:, :8]).sum() >= (~neg[name][:, :8]).sum(), name
    assert differs > 0
    same = build_pair_masks(lw, base, base, stats[2], spec=MaskSpec(method, 0.05))
    assert all(torch.equal(same[0][n], same[1][n]) for n in same[0])  # identical statistics, identical masks


@pytest.mark.parametrize("method", NEW)
def test_deterministic_ties(lw, method):
    # every statistic equal: all contrast and general scores tie within a channel; |W| then position decide
    flat = {(g.layer, g.name): GroupStats(10, torch.zeros(g.in_features, dtype=torch.float64),
                                          torch.full((g.in_features,), 10.0, dtype=torch.float64),
                                          torch.full((g.in_features,), 10.0, dtype=torch.float64), 2,
                                          torch.ones(g.in_features, dtype=torch.float64),
                                          torch.ones(g.in_features, dtype=torch.float64)) for g in lw.groups}
    a = build_pair_masks(lw, flat, flat, flat, spec=MaskSpec(method, 0.1))
    b = build_pair_masks(lw, flat, flat, flat, spec=MaskSpec(method, 0.1))
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name]) and torch.equal(a[0][name], a[1][name])
    # every score ties within a channel: |W| decides, then position (general-gated = magnitude pruning)
    for g in lw.groups:
        for name in g.modules:
            absw = lw.weight(name).abs()
            n = absw.shape[1]
            assert torch.equal(a[0][name], reference_keep(absw, absw, n - n_pruned(n, 0.1))), name
