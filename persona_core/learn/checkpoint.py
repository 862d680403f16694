"""Learner checkpoints that are verified before they are trusted.

A checkpoint is safetensors with string metadata: its ``format``, the owner fields the caller
names (the unit's identity, model, persona or pair, task), the ``step`` reached, and a
``digest``: sha256 over every tensor (name, dtype, shape, bytes) and every other metadata
field. `load_checkpoint` refuses (``CheckpointError``) a checkpoint whose digest does not
match (a flipped bit, negated scores, an edited step), whose owner fields differ from the
caller's, whose tensors have other names or shapes, hold a non-finite value, or whose step is
outside ``0..max_step``. The caller then deletes it (it wrote it: the key is its own) and starts
over, with a warning: a bad checkpoint costs the steps it held, never a wrong mask or a task
that fails on every rerun.
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

import torch
from safetensors.torch import load, save


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed from (the message says why)."""


def _digest(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps({k: meta[k] for k in sorted(meta) if k != "digest"}, sort_keys=True).encode())
    return h.hexdigest()


def save_checkpoint(tensors: Mapping[str, torch.Tensor], step: int, fmt: str, owner: Mapping[str, str],
                    extra: Mapping[str, str] | None = None) -> bytes:
    """Bytes of a checkpoint: `tensors`, the `step`, the `owner` fields (checked on load) and `extra` ones."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**{k: str(v) for k, v in (extra or {}).items()}, **{k: str(v) for k, v in owner.items()},
            "format": fmt, "step": str(int(step))}
    meta["digest"] = _digest(cpu, meta)
    return save(cpu, metadata=meta)


def load_checkpoint(data: bytes, fmt: str, owner: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
                    max_step: int) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """(tensors, metadata, step) of a checkpoint that passes every check, else `CheckpointError`."""
    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        meta = dict(json.loads(data[8: 8 + n]).get("__metadata__") or {})
    except Exception as err:  # safetensors raises its own errors for every kind of damage
        raise CheckpointError(f"unreadable ({type(err).__name__}: {err})") from None
    if meta.get("format") != fmt:
        raise CheckpointError(f"format {meta.get('format')!r}, expected {fmt!r}")
    if meta.get("digest") != _digest(tensors, meta):
        raise CheckpointError("content digest does not match (edited or damaged)")
    for k, v in owner.items():
        if meta.get(k) != str(v):
            raise CheckpointError(f"{k} is {meta.get(k)!r}, this learner's is {str(v)!r}")
    if set(tensors) != set(shapes):
        raise CheckpointError(f"tensors {sorted(tensors)}, expected {sorted(shapes)}")
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise CheckpointError(f"{k} has shape {tuple(tensors[k].shape)}, this model's is {tuple(shape)}")
        if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all():
            raise CheckpointError(f"{k} holds non-finite values")
    try:
        step = int(meta.get("step", ""))
    except ValueError:
        raise CheckpointError(f"step {meta.get('step')!r} is not an integer") from None
    if not 0 <= step <= max_step:
        raise CheckpointError(f"step {step} outside 0..{max_step}")
    return tensors, meta, step
