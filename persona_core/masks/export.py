"""Export an FFN-channel-pruned model physically smaller (Persona-Pruner's deliverable).

An ``ffn-channels`` mask removes the same number of MLP intermediate channels in
every layer: whole rows of the input projections (gate/up) and the matching columns
of the output projection (down). `export_pruned` slices those weights out and saves
a model whose config has the reduced ``intermediate_size``: it loads with plain
``AutoModelForCausalLM.from_pretrained`` and computes exactly what the masked dense
model computes (a removed channel contributes nothing: its down column is zero).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from persona_core.models.layers import linear_groups

from persona_core.models.loading import LoadedModel

log = logging.getLogger(__name__)


def kept_channels(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per layer, the indices of the MLP channels an ffn-channels mask keeps.

    Checks that the mask really is channel-structured: every gate/up row and every
    down column is all kept or all removed, the projections agree, and attention
    is untouched.
    """
    kept: dict[int, torch.Tensor] = {}
    by_layer: dict[int, dict[str, tuple[str, ...]]] = {}
    for g in linear_groups(model):
        by_layer.setdefault(g.layer, {})[g.name] = g.modules
    for layer, groups in sorted(by_layer.items()):
        for name in groups.get("attn_in", ()) + groups.get("attn_out", ()):
            if name in masks and not bool(masks[name].all()):
                raise ValueError(f"{name}: an ffn-channels export needs attention untouched")
        channel_sets = []
        for name in groups.get("mlp_in", ()):
            m = _mask(masks, name)
            rows = m.all(1)
            if not torch.equal(rows, m.any(1)):
                raise ValueError(f"{name}: rows are partly pruned; not an ffn-channels mask")
            channel_sets.append(rows)
        (down,) = groups.get("mlp_out", (None,))
        if down is None or not channel_sets:
            raise ValueError(f"layer {layer}: no gate/up/down MLP projections found")
        m = _mask(masks, down)
        cols = m.all(0)
        if not torch.equal(cols, m.any(0)):
            raise ValueError(f"{down}: columns are partly pruned; not an ffn-channels mask")
        channel_sets.append(cols)
        if any(not torch.equal(c, channel_sets[0]) for c in channel_sets):
            raise ValueError(f"layer {layer}: gate/up rows and down columns keep different channels")
        kept[layer] = channel_sets[0].nonzero().squeeze(1).cpu()
    sizes = {int(v.numel()) for v in kept.values()}
    if len(sizes) != 1:
        raise ValueError(f"layers keep different numbers of MLP channels {sorted(sizes)}; "
                         "one intermediate_size cannot describe them")
    return kept


def _mask(masks: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in masks:
        raise ValueError(f"no mask for {name}")
    return masks[name].bool()


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    w = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach()[index.to(w.device)])
    return new


def prune_channels(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` with the masked MLP channels removed (the original is untouched)."""
    kept = kept_channels(model, masks)
    size = int(next(iter(kept.values())).numel())
    pruned = copy.deepcopy(model)
    for g in linear_groups(pruned):
        if g.name not in ("mlp_in", "mlp_out"):
            continue
        for name in g.modules:
            parent_name, _, leaf = name.rpartition(".")
            parent = pruned.get_submodule(parent_name)
            dim = 0 if g.name == "mlp_in" else 1
            setattr(parent, leaf, _slice_linear(getattr(parent, leaf), kept[g.layer], dim))
            if hasattr(parent, "intermediate_size"):
                parent.intermediate_size = size
    pruned.config.intermediate_size = size
    return pruned


def export_pruned(model: nn.Module | LoadedModel, masks: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Save the FFN-channel-pruned model (and tokenizer, for a `LoadedModel`) to `out_dir`."""
    tokenizer = model.tokenizer if isinstance(model, LoadedModel) else None
    model = model.model if isinstance(model, LoadedModel) else model
    pruned = prune_channels(model, masks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    before = model.config.intermediate_size
    log.info("exported %s: intermediate_size %d -> %d (%.1f%% of MLP channels removed)",
             out, before, pruned.config.intermediate_size, 100 * (1 - pruned.config.intermediate_size / before))
    return out
