"""The straight-through top-k: a hard 0/1 channel mask forward, a sigmoid's gradient backward,
and the hooks that apply a mask to module inputs (`InputGate`; `ChannelGate`: every layer's MLP)."""

from __future__ import annotations

from typing import Self, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

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


class InputGate:
    """Forward pre-hooks that multiply each target module's input by its part of a mask.

    `targets`: (module, index) pairs; the hook multiplies the module's input by
    ``values[index]`` (an int picks a row of a [L, C] mask, a slice a segment of a flat [N]
    one). `values` is set before a forward; None leaves the model dense. Use it as a context
    manager: the hooks exist only inside ``with``, and leaving it clears `values`.
    """

    def __init__(self, targets: Sequence[tuple[nn.Module, int | slice]]):
        self.targets = list(targets)
        self.values: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Self:
        for mod, index in self.targets:
            self._handles.append(mod.register_forward_pre_hook(self._hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.values = None

    def _hook(self, index: int | slice):
        def hook(module, args):
            if self.values is None:
                return None
            return (args[0] * self.values[index].to(args[0].dtype),) + tuple(args[1:])

        return hook


class ChannelGate(InputGate):
    """An `InputGate` on every layer's MLP down projection; `values` is [L, C].

    Zeroing a channel's input to the down projection is what removing its gate/up rows and
    its down column computes (act(0) * 0 = 0 either way).
    """

    def __init__(self, model: nn.Module):
        by_layer = {g.layer: g for g in linear_groups(model) if g.name == "mlp_out"}
        downs: list[nn.Module] = []
        for layer in range(len(decoder_layers(model)[1])):
            g = by_layer.get(layer)
            if g is None or len(g.modules) != 1:
                raise ValueError(f"layer {layer}: learned channel masks need one MLP down projection")
            downs.append(model.get_submodule(g.modules[0]))
        super().__init__([(mod, layer) for layer, mod in enumerate(downs)])
        self.downs = downs

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.downs), self.downs[0].in_features
