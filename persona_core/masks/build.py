"""Building masks: from weights, statistics and a `MaskSpec` to one keep-mask per module and side.

`build_masks` / `build_pair_masks` give whole masks; `iter_masks` streams them one decoder
layer at a time. ``ffn-channels`` masks score every MLP intermediate channel
(`ffn_channel_scores`, also the learned masks' starting point) and expand the kept channels
to module masks (`channel_module_masks`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from persona_core.calib.stats import GroupStats
from persona_core.masks.allocation import resolve_allocation
from persona_core.masks.inputs import LinearWeights, StatsLike, group_stats
from persona_core.masks.methods import METHODS, Method
from persona_core.masks.select import keep_top, n_pruned, select_nm, select_unstructured
from persona_core.masks.spec import MaskSpec
from persona_core.models.layers import LinearGroup
from persona_core.models.loading import LoadedModel


def _scores(method: Method, params: dict, absw: torch.Tensor, gstats: list[GroupStats]) -> tuple[torch.Tensor, ...]:
    scores = method.fn(absw, gstats, params)
    if len(scores) != method.sides:
        raise ValueError(f"method {method.name!r} returned {len(scores)} score tensors, expected {method.sides}")
    return scores


def _method_for(spec: MaskSpec, stats: Sequence[StatsLike]) -> Method:
    """The spec's method, checked against the statistics given (one per role it needs)."""
    method = METHODS[spec.method]
    if len(stats) != len(method.needs):
        raise ValueError(f"method {spec.method!r} needs statistics for {', '.join(method.needs) or 'nothing'} "
                         f"({len(method.needs)}), got {len(stats)}")
    return method


def iter_masks(weights: nn.Module | LoadedModel | LinearWeights, stats: Sequence[StatsLike], spec: MaskSpec,
               device: torch.device | str | None = None) -> Iterator[tuple[str, tuple[torch.Tensor, ...]]]:
    """Yield (module name, one keep-mask per side), streaming one decoder layer at a time."""
    method = _method_for(spec, stats)
    lw = LinearWeights.of(weights)
    spec = resolve_allocation(lw, stats, spec, device)
    if spec.layer_sparsity and len(spec.layer_sparsity) != lw.num_layers:
        raise ValueError(f"layer_sparsity has {len(spec.layer_sparsity)} values for {lw.num_layers} layers")
    params = spec.resolved_params
    if spec.granularity == "ffn-channels":
        yield from _ffn_channel_masks(lw, stats, spec, device)
        return
    if method.reads:
        raise ValueError(f"method {method.name!r} scores MLP channels (statistics group {method.reads!r}): "
                         "use granularity ffn-channels")
    nm = spec.nm
    for g in lw.groups:
        gstats = group_stats(stats, (g.layer, g.name), device or "cpu")
        for name in g.modules:
            absw = lw.weight(name, device).abs()
            masks = []
            for score in _scores(method, params, absw, gstats):
                if nm:
                    masks.append(select_nm(score, absw, *nm))
                else:
                    masks.append(select_unstructured(score, absw, spec.sparsity_of(g.layer)))
            yield name, tuple(masks)


def _mlp_layers(lw: LinearWeights) -> dict[int, dict[str, LinearGroup]]:
    by_layer: dict[int, dict[str, LinearGroup]] = {}
    for g in lw.groups:
        by_layer.setdefault(g.layer, {})[g.name] = g
    for layer, groups in by_layer.items():
        if "mlp_in" not in groups or "mlp_out" not in groups or len(groups["mlp_out"].modules) != 1:
            raise ValueError(f"layer {layer}: ffn-channels needs one MLP output projection and its input projections")
    return dict(sorted(by_layer.items()))


def ffn_channel_scores(lw: LinearWeights, stats: Sequence[StatsLike], spec: MaskSpec,
                       device: torch.device | str | None = None
                       ) -> Iterator[tuple[int, tuple[torch.Tensor, ...], torch.Tensor]]:
    """Per decoder layer: (layer, one channel score per side, tiebreak), the training-free importance
    of every MLP intermediate channel.

    Channel c scores sum_i S(down)[i, c]: its estimated output contribution (S the method's
    score of the down projection). The tiebreak is the column's |W| sum.
    """
    method = _method_for(spec, stats)
    params = spec.resolved_params
    for layer, groups in _mlp_layers(lw).items():
        absw = lw.weight(groups["mlp_out"].modules[0], device).abs()
        gstats = group_stats(stats, (layer, method.reads or "mlp_out"), device or "cpu")
        scores = _scores(method, params, absw, gstats)
        if method.reads:  # already one score per channel
            if any(s.shape != (absw.shape[1],) for s in scores):
                raise ValueError(f"method {method.name!r}: channel scores of shape {[tuple(s.shape) for s in scores]}"
                                 f", expected ({absw.shape[1]},) at layer {layer}")
            scores = tuple(s.float() for s in scores)
        else:
            scores = tuple(s.sum(0, dtype=torch.float64).float() for s in scores)
        yield layer, scores, absw.sum(0)


def channel_module_masks(lw: LinearWeights, channels: Mapping[int, torch.Tensor]
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Module keep-masks of a per-layer channel keep-vector: gate/up rows and down columns of the
    kept channels; attention all True."""
    for layer, groups in _mlp_layers(lw).items():
        keep = channels[layer].bool()
        width = keep.numel()
        for gname in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            for name in groups.get(gname, LinearGroup(layer, gname, (), 0)).modules:
                shape = lw.shape(name)
                if gname.startswith("attn"):
                    yield name, torch.ones(shape, dtype=torch.bool, device=keep.device)
                elif gname == "mlp_in":
                    if shape[0] != width:
                        raise ValueError(f"{name}: {shape[0]} output rows, but the MLP has {width} channels")
                    yield name, keep.unsqueeze(1).expand(shape).contiguous()
                else:
                    if shape[1] != width:
                        raise ValueError(f"{name}: {shape[1]} input columns, but the MLP has {width} channels")
                    yield name, keep.unsqueeze(0).expand(shape).contiguous()


def _ffn_channel_masks(lw: LinearWeights, stats, spec: MaskSpec, device):
    """Keep the top channels of `ffn_channel_scores` in every layer (ties: |W| column sum, then index)."""
    per_side: list[dict[int, torch.Tensor]] = []
    for layer, scores, tiebreak in ffn_channel_scores(lw, stats, spec, device):
        width = tiebreak.numel()
        k = width - n_pruned(width, spec.sparsity_of(layer))
        for side, score in enumerate(scores):
            if len(per_side) <= side:
                per_side.append({})
            per_side[side][layer] = keep_top(score, k, tiebreak)
    streams = [channel_module_masks(lw, channels) for channels in per_side]
    for items in zip(*streams):
        yield items[0][0], tuple(mask for _, mask in items)


def build_pair_masks(weights, *stats: StatsLike, spec: MaskSpec,
                     device: torch.device | str | None = None) -> tuple[dict[str, torch.Tensor], ...]:
    """Every side's masks from one pass over the weights (two for a persona/opposite contrast)."""
    out: tuple[dict[str, torch.Tensor], ...] = tuple({} for _ in range(METHODS[spec.method].sides))
    for name, masks in iter_masks(weights, stats, spec, device):
        for side, mask in zip(out, masks):
            side[name] = mask
    return out


def build_masks(weights, *stats: StatsLike, spec: MaskSpec, device: torch.device | str | None = None
                ) -> dict[str, torch.Tensor]:
    """Keep-masks (bool, True = keep, the weight's shape) by full module name.

    `weights`: a model, a `LoadedModel` or `LinearWeights`; `stats`: one per role the
    method needs, in order (see `METHODS[name].needs`). For a contrastive method
    this is the persona's side; `build_pair_masks` gives both.
    """
    return build_pair_masks(weights, *stats, spec=spec, device=device)[0]
