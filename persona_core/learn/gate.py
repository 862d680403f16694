"""The straight-through top-k: a hard 0/1 channel mask forward, a sigmoid's gradient backward,
and the hooks that apply it to every layer's MLP (`ChannelGate`)."""

from __future__ import annotations

import torch
from torch import nn

from persona_core.masks.select import keep_top, n_pruned
from persona_core.models.layers import decoder_layers, linear_groups


def channels_kept(width: int, sparsity: float) -> int:
    return width - n_pruned(width, sparsity)


def hard_topk(scores: torch.Tensor, k: int, tiebreak: torch.Tensor) -> torch.Tensor:
    """Bool [L, C]: exactly the k highest scores of every row (ties: tiebreak, then lower index)."""
    return keep_top(scores.detach().cpu().double(), k, tiebreak.detach().cpu()).to(scores.device)


def straight_through(scores: torch.Tensor, k: int, tiebreak: torch.Tensor, temperature: float) -> torch.Tensor:
    """The hard top-k mask (0/1 values) whose gradient is that of sigmoid((scores - t) / T),
    t halfway between each row's k-th and k+1-th score."""
    hard = hard_topk(scores, k, tiebreak).to(scores.dtype)
    n = scores.shape[-1]
    if k in (0, n):
        return hard
    with torch.no_grad():
        top = scores.topk(k + 1, dim=-1).values
        t = (top[:, k - 1: k] + top[:, k: k + 1]) / 2
    soft = torch.sigmoid((scores - t) / temperature)
    return hard + (soft - soft.detach())  # exactly the hard values forward (x - x == 0)


class ChannelGate:
    """Forward pre-hooks that multiply every layer's down-projection input by a channel mask.

    Zeroing a channel's input to the down projection is what removing its gate/up rows and
    its down column computes (act(0) * 0 = 0 either way). `values` is [L, C] (set it before
    a forward); None leaves the model dense.
    """

    def __init__(self, model: nn.Module):
        self.downs: list[nn.Module] = []
        by_layer = {g.layer: g for g in linear_groups(model) if g.name == "mlp_out"}
        for layer in range(len(decoder_layers(model)[1])):
            g = by_layer.get(layer)
            if g is None or len(g.modules) != 1:
                raise ValueError(f"layer {layer}: learned channel masks need one MLP down projection")
            self.downs.append(model.get_submodule(g.modules[0]))
        self.values: torch.Tensor | None = None
        self._handles: list = []

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.downs), self.downs[0].in_features

    def __enter__(self) -> "ChannelGate":
        for i, mod in enumerate(self.downs):
            self._handles.append(mod.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.values = None

    def _hook(self, layer: int):
        def hook(module, args):
            if self.values is None:
                return None
            return (args[0] * self.values[layer].to(args[0].dtype),) + tuple(args[1:])

        return hook
