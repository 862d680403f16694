"""How sparsity is spread over decoder layers: OWL's outlier-weighted allocation, or a focus
allocation; `resolve_allocation` fills a spec's per-layer sparsities at build time.

OWL (Yin et al., 2024): layers with more outlier scores keep more weights; M and lambda are
OWL's defaults. Focus: the whole budget goes to the layers where a persona's and its
opposite's statistics differ most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import reduce

import torch
from torch import nn

from persona_core.calib.stats import GroupStats
from persona_core.masks.inputs import LinearWeights, StatsLike, group_stats
from persona_core.masks.spec import MaskSpec
from persona_core.models.layers import LinearGroup
from persona_core.models.loading import LoadedModel

OWL_M, OWL_LAMBDA = 5.0, 0.08
FOCUS_SHARE = 0.25  # the share of layers a focus allocation prunes (those where the two sides differ most)


def owl_sparsities(weights: nn.Module | LoadedModel | LinearWeights, stats: Sequence[StatsLike], sparsity: float,
                   m: float = OWL_M, lam: float = OWL_LAMBDA, device: torch.device | str | None = None
                   ) -> tuple[float, ...]:
    """OWL's layer sparsities: more outliers in a layer's Wanda scores, fewer weights pruned there.

    A layer's outlier ratio D is the share of its scores |W| * rms(x) above `m` times the
    layer's mean score (rms over every side's statistics together, so a contrastive pair
    gets one allocation; |W| alone without statistics). The ratios are scaled to
    [0, 2 lam], centred, and subtracted from `sparsity`: the mean over layers stays
    `sparsity`, each layer within `sparsity` +- lam (clipped to [0, 0.99]).
    """
    lw = LinearWeights.of(weights)
    by_layer: dict[int, list[LinearGroup]] = {}
    for g in lw.groups:
        by_layer.setdefault(g.layer, []).append(g)
    ratios = []
    for layer in sorted(by_layer):
        scores = []
        for g in by_layer[layer]:
            rms = reduce(GroupStats.merge, group_stats(stats, (g.layer, g.name), device or "cpu")).rms.float() \
                if stats else None
            for name in g.modules:
                absw = lw.weight(name, device).abs()
                scores.append((absw * rms if rms is not None else absw).flatten())
        flat = torch.cat(scores)
        ratios.append(float((flat > m * flat.mean()).double().mean()))
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    d = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    return tuple(float(s) for s in (sparsity - (d - d.mean())).clamp(0.0, 0.99))


def layer_divergence(lw: LinearWeights, a: StatsLike, b: StatsLike) -> list[float]:
    """Per decoder layer: how far two sides' input statistics differ, the mean over the layer's
    groups of sum|rms_a - rms_b| / sum(rms_a + rms_b) over input channels (0: identical, 1: disjoint)."""
    by_layer: dict[int, list[float]] = {}
    for g in lw.groups:
        ga, gb = group_stats([a, b], (g.layer, g.name), "cpu")
        ra, rb = ga.rms.double(), gb.rms.double()
        by_layer.setdefault(g.layer, []).append(float((ra - rb).abs().sum() / (ra + rb).sum().clamp_min(1e-12)))
    return [sum(v) / len(v) for _, v in sorted(by_layer.items())]


def focus_sparsities(weights: nn.Module | LoadedModel | LinearWeights, stats: Sequence[StatsLike], sparsity: float,
                     share: float = FOCUS_SHARE) -> tuple[float, ...]:
    """A focus allocation: the whole pruning budget goes to the ``share`` of layers where the
    persona's and the opposite's statistics differ most (`layer_divergence`); the other layers
    stay dense. The focused layers get ``sparsity * layers / focused`` each (at most 0.99), so the
    mean over layers is `sparsity` unless that cap binds. Ties: the earlier layer first.
    Needs both sides of a pair (a contrastive method)."""
    if len(stats) < 2:
        raise ValueError("allocation 'focus' compares a persona with its opposite: use it with a contrastive method")
    lw = LinearWeights.of(weights)
    d = layer_divergence(lw, stats[0], stats[1])
    n = max(1, round(share * len(d)))
    chosen = set(sorted(range(len(d)), key=lambda i: (-d[i], i))[:n])
    per = min(0.99, sparsity * len(d) / n)
    return tuple(per if i in chosen else 0.0 for i in range(len(d)))


def resolve_allocation(weights: nn.Module | LoadedModel | LinearWeights, stats: Sequence[StatsLike], spec: MaskSpec,
                       device: torch.device | str | None = None) -> MaskSpec:
    """`spec` with its per-layer sparsities filled in for a non-uniform allocation (else as is)."""
    if spec.layer_sparsity is not None or spec.allocation == "uniform":
        return spec
    if spec.allocation == "owl":
        return replace(spec, layer_sparsity=owl_sparsities(weights, stats, spec.sparsity, device=device))
    return replace(spec, layer_sparsity=focus_sparsities(weights, stats, spec.sparsity))
