"""Attribution statistics (group ``mlp_attr``): each MLP channel's first-order share of the
log-likelihood of the calibration texts, recorded when `CalibConfig.attribution` is on and read
by the ``contrastive-attribution`` mask method.
"""

from __future__ import annotations

from typing import Sequence

import torch

from persona_core.calib.config import CalibConfig
from persona_core.calib.stats import GroupKey, GroupStats
from persona_core.calib.texts import batches
from persona_core.models.layers import linear_groups
from persona_core.models.loading import LoadedModel

ATTRIBUTION = "mlp_attr"  # group name of the MLP channels' attribution to the log-likelihood


def attribution(loaded: LoadedModel, texts: Sequence[str], config: CalibConfig = CalibConfig()
                ) -> dict[GroupKey, GroupStats]:
    """Per decoder layer, group ``mlp_attr``: each MLP intermediate channel's attribution to the
    log-likelihood of `texts` (first-order: removing channel c changes sum log p by about -sum).

    For the input x of the MLP's output projection and L = sum of the log-probabilities of every
    real token given the ones before it, the per-token products a = x * dL/dx are accumulated:
    ``sum`` (the attribution), ``sumsq``, ``sumabs``; ``tokens`` counts positions. The weights are
    never changed and their gradients never computed (only dL/dx is asked for).
    """
    model = loaded.model
    outs = {g.layer: g for g in linear_groups(model) if g.name == "mlp_out"}
    if not outs:
        raise ValueError("attribution: the model has no MLP output projections")
    acc = {layer: torch.zeros(3, g.in_features, dtype=torch.float64, device=loaded.device) for layer, g in outs.items()}
    seen: dict[int, torch.Tensor] = {}
    handles = [model.get_submodule(g.modules[0]).register_forward_pre_hook(
        lambda m, args, layer=layer: seen.__setitem__(layer, args[0])) for layer, g in outs.items()]
    tokens = samples = 0
    try:
        for input_ids, attention_mask in batches(loaded, texts, config):
            seen.clear()
            with torch.inference_mode(False), torch.enable_grad():  # callers may hold inference mode
                input_ids, attention_mask = input_ids.clone(), attention_mask.clone()  # normal tensors
                real = attention_mask.bool()
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
                embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).logits[:, :-1]
                target = (real[:, 1:] & real[:, :-1]).float()  # a real token predicted from a real one
                logp = torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
                layers = sorted(seen)
                grads = torch.autograd.grad((logp * target).sum(), [seen[i] for i in layers])
            w = real.to(torch.float32).unsqueeze(-1)
            for layer, g in zip(layers, grads):
                a = seen[layer].detach().float() * g.float() * w
                acc[layer][0] += a.sum((0, 1)).double()
                acc[layer][1] += (a * a).sum((0, 1)).double()
                acc[layer][2] += a.abs().sum((0, 1)).double()
            tokens += int(target.sum())
            samples += int(real.any(-1).sum())
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    out = {}
    for layer, a in acc.items():
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"non-finite attribution at layer {layer}")
        zero = torch.zeros_like(a[0])
        out[(layer, ATTRIBUTION)] = GroupStats(tokens, a[0].clone(), a[1].clone(), a[2].clone(), samples, zero,
                                               zero.clone())
    return out
