"""What a mask build reads: the prunable linear weights detached from the model, and the
statistics of their inputs (a `PersonaStats`, or its groups by key, one per role a method needs)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from persona_core.calib.stats import GroupKey, GroupStats, PersonaStats
from persona_core.models.layers import LinearGroup, linear_groups
from persona_core.models.loading import LoadedModel


@dataclass
class LinearWeights:
    """The prunable linear weights of a model and how they group, detached from the model.

    `tensors` maps full module names to weights (torch tensors or numpy arrays: what
    a Ray worker gets from the object store, zero-copy). Picklable.
    """

    groups: list[LinearGroup]
    tensors: dict

    @classmethod
    def from_model(cls, model: nn.Module | LoadedModel, numpy: bool = False) -> LinearWeights:
        model = model.model if isinstance(model, LoadedModel) else model
        groups = linear_groups(model)
        tensors = {}
        for g in groups:
            for name in g.modules:
                w = model.get_submodule(name).weight.detach()
                tensors[name] = w.float().cpu().numpy() if numpy else w
        return cls(groups, tensors)

    @classmethod
    def of(cls, weights: nn.Module | LoadedModel | LinearWeights) -> LinearWeights:
        """`weights` itself when it already is `LinearWeights`, else the model's, read once."""
        return weights if isinstance(weights, LinearWeights) else cls.from_model(weights)

    def weight(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        w = self.tensors[name]
        if isinstance(w, np.ndarray):
            w = _as_tensor(w)
        return w.to(device=device or w.device, dtype=torch.float32)

    @property
    def num_layers(self) -> int:
        return max(g.layer for g in self.groups) + 1

    @property
    def numel(self) -> int:
        return sum(int(np.prod(self.tensors[n].shape)) for g in self.groups for n in g.modules)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """A read-only numpy array (Ray's zero-copy object) as a tensor we promise not to write."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


StatsLike = PersonaStats | Mapping[GroupKey, GroupStats]


def group_stats(stats: Sequence[StatsLike], key: GroupKey, device) -> list[GroupStats]:
    """Each side's statistics of one group (``(layer, group name)``) on `device`."""
    out = []
    for s in stats:
        groups = s.groups if isinstance(s, PersonaStats) else s
        if key not in groups:
            hint = ("calibrate with attribution: true (calibrate.options.attribution)" if key[1] == "mlp_attr"
                    else "were they recorded on this model?")
            raise KeyError(f"statistics have no group {key} ({hint})")
        out.append(groups[key].to(device))
    return out
