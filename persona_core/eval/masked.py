"""A model whose prunable weights are swapped to a mask and back, bit-exactly: `MaskedModel`.

Masks are applied in place: the first time a module is masked its dense weight is copied
once, so no model is reloaded per persona, and restoring is one `copy_` per module.
`apply_masks(model, masks)` is the reversible call user code gets (through
`persona_core.api.apply_mask`): it returns an `AppliedMask` handle, a context manager, over the
one `MaskedModel` kept per model (`masked_model_of`), so masks swap into one another as they do
in the evaluator, and nested handles restore in order.
`mask_content_hash` identifies a mask set built in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
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


# one MaskedModel per model, so every caller shares its dense snapshot and sees what is applied
_MASKED: "weakref.WeakKeyDictionary[nn.Module, MaskedModel]" = weakref.WeakKeyDictionary()


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
        self._handles: list[AppliedMask] = []  # `push`ed masks, innermost last
        if model not in _MASKED:  # the first one over a model is the one `apply_masks` shares
            _MASKED[model] = self

    @torch.no_grad()
    def apply(self, masks: dict[str, torch.Tensor]) -> None:
        shared = _MASKED.get(self.model)
        if shared is not None and shared is not self and shared.active is not None:
            raise RuntimeError("another MaskedModel has a mask on this model (its dense snapshot would be taken "
                               "of masked weights): restore that one first")
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
        """The dense weights back, bit-exact (every `push`ed handle is released too)."""
        self._handles.clear()
        if self.active is None:
            return
        for name, weight in self.active.items():
            weight.copy_(self._dense[name], non_blocking=True)
        self.active = None

    def push(self, masks: dict[str, torch.Tensor]) -> "AppliedMask":
        """Apply `masks` over whatever is applied now and return the handle that takes them off again
        (back to the mask pushed before, or to the dense weights). A bad mask changes nothing."""
        self.apply(masks)
        handle = AppliedMask(self, masks)
        self._handles.append(handle)
        return handle

    def release(self, handle: "AppliedMask") -> None:
        """Take `handle`'s mask off (a handle already released, or cleared by `restore`, is a no-op)."""
        if not any(h is handle for h in self._handles):
            return
        if self._handles[-1] is not handle:
            raise RuntimeError("a mask applied after this one is still on: restore that one first")
        self._handles.pop()
        if self._handles:
            rest = list(self._handles)
            self.apply(rest[-1].masks)  # apply() leaves the handle list alone
        else:
            self.restore()

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


class AppliedMask:
    """A mask applied to a model: `restore()` (or leaving its ``with`` block) takes it off again,
    bit-exactly. Handles nest: restoring the inner one brings back the outer one's mask."""

    def __init__(self, owner: MaskedModel, masks: dict[str, torch.Tensor]):
        self.owner, self.masks = owner, masks

    @property
    def applied(self) -> bool:
        return any(h is self for h in self.owner._handles)

    def restore(self) -> None:
        self.owner.release(self)

    def __enter__(self) -> "AppliedMask":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def masked_model_of(model: nn.Module, snapshot_device: str | torch.device | None = None) -> MaskedModel:
    """The `MaskedModel` over `model`: the first one made for it (e.g. an evaluator's), else a new one."""
    return _MASKED.get(model) or MaskedModel(model, snapshot_device)


def apply_masks(model: nn.Module | MaskedModel, masks: dict[str, torch.Tensor]) -> AppliedMask:
    """Mask `model` in place now; the handle (a context manager) restores it, bit-exactly."""
    owner = model if isinstance(model, MaskedModel) else masked_model_of(model)
    return owner.push(masks)


def mask_content_hash(masks: dict[str, torch.Tensor]) -> str:
    """A stable hash of a mask set (names, shapes, bits), for masks built in memory."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].detach().to("cpu", torch.bool).contiguous()
        h.update(f"{name}:{tuple(m.shape)}\x00".encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()[:16]
