"""A model whose prunable weights are swapped to a mask and back, bit-exactly: `MaskedModel`.

Masks are applied in place: the first time a module is masked its dense weight is copied
once, so no model is reloaded per persona, and restoring is one `copy_` per module.
`mask_content_hash` identifies a mask set built in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch
from torch import nn


def _check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bool mask) per module; every problem is reported before anything changes."""
    problems, out = [], {}
    for name, mask in masks.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module in {type(model).__name__}")
            continue
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor):
            problems.append(f"{name}: module has no weight")
            continue
        if tuple(mask.shape) != tuple(weight.shape):
            problems.append(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
            continue
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point or mask.dtype.is_complex:
                problems.append(f"{name}: mask dtype {mask.dtype} (expected bool, True = keep)")
                continue
            mask = mask.bool()
        out[name] = (weight, mask)
    if problems:
        raise ValueError("masks do not fit the model:\n  " + "\n  ".join(problems))
    return out


class MaskedModel:
    """A model whose prunable weights can be swapped to a mask and back, cheaply.

    The first time a module is masked its dense weight is copied once (on
    `snapshot_device`, default: the weight's own device). `apply` then writes
    ``dense * keep`` into the weight in one pass (no restore needed between two
    masks), and `restore` is one `copy_` per module: bit-exact.
    """

    def __init__(self, model: nn.Module, snapshot_device: str | torch.device | None = None):
        self.model = model
        self.snapshot_device = snapshot_device
        self._dense: dict[str, torch.Tensor] = {}
        self.active: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def apply(self, masks: dict[str, torch.Tensor]) -> None:
        checked = _check_masks(self.model, masks)
        for name, (weight, _) in checked.items():
            if name not in self._dense:
                if self.active is not None and name in self.active:
                    raise RuntimeError(f"{name}: masked without a snapshot")
                dev = self.snapshot_device or weight.device
                self._dense[name] = weight.detach().to(dev, copy=True)
        stale = {n: w for n, w in (self.active or {}).items() if n not in checked}
        for name, weight in stale.items():  # masked before, not by this mask: back to dense
            weight.copy_(self._dense[name], non_blocking=True)
        for name, (weight, mask) in checked.items():
            # dense * keep in one pass (a uint8 view of the bool mask: the fastest kernel on CPU)
            keep = mask.to(weight.device, non_blocking=True).view(torch.uint8)
            torch.mul(self._dense[name].to(weight.device, non_blocking=True), keep, out=weight)
        self.active = {n: w for n, (w, _) in checked.items()}

    @torch.no_grad()
    def restore(self) -> None:
        if self.active is None:
            return
        for name, weight in self.active.items():
            weight.copy_(self._dense[name], non_blocking=True)
        self.active = None

    @contextlib.contextmanager
    def masked(self, masks: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """Inside the block the model is masked (or dense for None); always restored after."""
        if masks is None:
            yield
            return
        self.apply(masks)
        try:
            yield
        finally:
            self.restore()


def mask_content_hash(masks: dict[str, torch.Tensor]) -> str:
    """A stable hash of a mask set (names, shapes, bits), for masks built in memory."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].detach().to("cpu", torch.bool).contiguous()
        h.update(f"{name}:{tuple(m.shape)}\x00".encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()[:16]
