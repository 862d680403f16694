"""A mask exported as a Hugging Face model folder: plain ``AutoModelForCausalLM.from_pretrained``.

`export_model(model, masks, out_dir)` is the one code path for every mask (any method, any
granularity, budgeted or learned): the masked weights (``dense * keep``) are saved as safetensors
with the tokenizer (and its chat template), a model card (README.md) and an ``export.json``
manifest holding the mask's digest and a sha256 of every file, written last. Where the mask is
structured the model is physically smaller: an ``ffn-channels`` mask that removes the same
number of MLP intermediate channels in every layer loses whole rows of the input projections
(gate/up) and the matching columns of the output projection (down), and the config gets the
reduced ``intermediate_size`` (a removed channel contributes nothing: its down column is zero).
Any other mask (unstructured, 2:4, 4:8, or channels that differ in number per layer, which one
``intermediate_size`` cannot describe) keeps the shapes and stores its zeros.

`publish_export(local_dir, dest)` copies a finished folder to a local path or any fsspec URL with
nothing half-written (a local folder appears by one rename; on an object store the manifest is
written last and replaced first), and `verify_export(dest)` checks a published folder against
its manifest (a truncated or edited file fails), which is how a stored export counts as current.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from persona_core.models.layers import linear_groups
from persona_core.models.loading import LoadedModel
from persona_core.store.store import Store, StoreError, open_store

log = logging.getLogger(__name__)

MANIFEST = "export.json"  # the last file written: a folder without it (or failing it) is no export
EXPORT_FORMAT = "persona-export/v1"


class ExportError(StoreError):
    """An exported folder that is missing, incomplete or does not match its manifest."""


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
            channel_sets.append(_whole_channels(masks, name, 1))
        (down,) = groups.get("mlp_out", (None,))
        if down is None or not channel_sets:
            raise ValueError(f"layer {layer}: no gate/up/down MLP projections found")
        channel_sets.append(_whole_channels(masks, down, 0))
        if any(not torch.equal(c, channel_sets[0]) for c in channel_sets):
            raise ValueError(f"layer {layer}: gate/up rows and down columns keep different channels")
        kept[layer] = channel_sets[0].nonzero().squeeze(1).cpu()
    sizes = {int(v.numel()) for v in kept.values()}
    if len(sizes) != 1:
        raise ValueError(f"layers keep different numbers of MLP channels {sorted(sizes)}; "
                         "one intermediate_size cannot describe them")
    return kept


def _whole_channels(masks: Mapping[str, torch.Tensor], name: str, dim: int) -> torch.Tensor:
    """The channels `name`'s mask keeps whole: its rows (dim 1: gate/up) or columns (dim 0: down);
    a partly pruned one is not an ffn-channels mask."""
    m = _mask(masks, name)
    kept = m.all(dim)
    if not torch.equal(kept, m.any(dim)):
        raise ValueError(f"{name}: {'rows' if dim == 1 else 'columns'} are partly pruned; not an ffn-channels mask")
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


def masked_copy(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` with every masked weight set to ``dense * keep`` (the original is untouched)."""
    out = copy.deepcopy(model)
    problems = []
    with torch.no_grad():
        for name, mask in masks.items():
            try:
                weight = out.get_submodule(name).weight
            except AttributeError:
                problems.append(f"{name}: no such module with a weight in {type(model).__name__}")
                continue
            if tuple(mask.shape) != tuple(weight.shape):
                problems.append(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
                continue
            weight.mul_(mask.to(weight.device).bool().to(weight.dtype))
    if problems:
        raise ValueError("masks do not fit the model:\n  " + "\n  ".join(problems))
    return out


def structure(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> str | None:
    """Why the mask cannot be exported smaller (None: it removes whole MLP channels, one width everywhere)."""
    try:
        kept_channels(model, masks)
    except ValueError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class ExportInfo:
    """What `export_model` wrote: the folder, whether it is smaller, and the sizes before and after."""

    path: Path
    smaller: bool
    parameters: int  # parameters of the exported model
    dense_parameters: int
    intermediate_size: int | None  # after the export (None: the config has none)
    dense_intermediate_size: int | None
    reason: str | None  # why it keeps the dense shapes (None when smaller)


def export_model(model: nn.Module | LoadedModel, masks: Mapping[str, torch.Tensor], out_dir: str | Path, *,
                 card: str | Callable[[ExportInfo], str] | None = None, manifest: Mapping[str, Any] | None = None,
                 require_smaller: bool = False) -> ExportInfo:
    """Save the masked model (and the tokenizer of a `LoadedModel`) to the local folder `out_dir`.

    Physically smaller where the mask removes whole MLP channels (`kept_channels`), else the
    masked weights in their dense shapes (`require_smaller` refuses that case). `card` (text, or a
    function of the `ExportInfo`) becomes the folder's README.md; `manifest` (e.g. the mask's key and digest) goes into ``export.json``
    with every file's size and sha256, written last.
    """
    tokenizer = model.tokenizer if isinstance(model, LoadedModel) else None
    model = model.model if isinstance(model, LoadedModel) else model
    reason = structure(model, masks)
    if reason is not None and require_smaller:
        raise ValueError(reason)
    exported = prune_channels(model, masks) if reason is None else masked_copy(model, masks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    before, after = (getattr(m.config, "intermediate_size", None) for m in (model, exported))
    info = ExportInfo(out, reason is None, count(exported), count(model), after, before, reason)
    if card is not None:
        (out / "README.md").write_text(card(info) if callable(card) else card)
    write_manifest(out, {**dict(manifest or {}), "smaller": info.smaller, "parameters": info.parameters,
                         "dense_parameters": info.dense_parameters, "intermediate_size": after,
                         "dense_intermediate_size": before})
    if info.smaller:
        log.info("exported %s: intermediate_size %s -> %s (%.1f%% of parameters removed)", out, before, after,
                 100 * (1 - info.parameters / info.dense_parameters))
    else:
        log.info("exported %s with the dense shapes (masked weights are zeros): %s", out, reason)
    return info


def export_pruned(model: nn.Module | LoadedModel, masks: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """`export_model` of an ffn-channels mask, refusing any mask that cannot make the model smaller."""
    return export_model(model, masks, out_dir, require_smaller=True).path


# ---------------------------------------------------------------------------- manifest, publish, verify


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, fields: Mapping[str, Any]) -> dict:
    """``export.json`` in `folder`: `fields`, and the size and sha256 of every other file in it."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    doc = {"format": EXPORT_FORMAT, **dict(fields), "files": files, "written": time.time()}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return doc


def _at(dest: str | Store, prefix: str) -> tuple[Store, str]:
    store = dest if isinstance(dest, Store) else open_store(str(dest))
    return store, prefix.strip("/")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def read_manifest(dest: str | Store, prefix: str = "") -> dict | None:
    """The manifest of the export at `dest` (a local path or fsspec URL; or a `Store` and the export's
    `prefix` in it); None when there is none."""
    store, prefix = _at(dest, prefix)
    try:
        doc = store.read_json(_key(prefix, MANIFEST))
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT or not isinstance(doc.get("files"), dict):
        raise ExportError(f"{store.uri(_key(prefix, MANIFEST))}: not an export manifest ({EXPORT_FORMAT})")
    return doc


def verify_export(dest: str | Store, prefix: str = "") -> dict:
    """Check every file of the export at `dest` (`prefix`) against its manifest (size, then sha256);
    returns the manifest. ExportError names the first file that is missing, truncated or changed."""
    store, prefix = _at(dest, prefix)
    doc = read_manifest(store, prefix)
    if doc is None:
        raise ExportError(f"{store.uri(prefix)}: no export there (no {MANIFEST}: unfinished or never written)")
    for name, want in sorted(doc["files"].items()):
        key = _key(prefix, name)
        try:
            size = int(store.fs.size(store.path(key)))
        except FileNotFoundError:
            raise ExportError(f"{store.uri(key)}: missing from the export") from None
        if size != int(want["bytes"]):
            raise ExportError(f"{store.uri(key)}: {size} bytes, the manifest says {want['bytes']} (truncated?)")
        h = hashlib.sha256()
        with store.fs.open(store.path(key), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != want["sha256"]:
            raise ExportError(f"{store.uri(key)}: content differs from the manifest's sha256 (changed or corrupt)")
    return doc


def export_is_current(dest: str | Store, prefix: str = "", **fields: Any) -> bool:
    """Whether `dest` (`prefix`) holds a verified export whose manifest has these `fields`
    (e.g. ``mask_digest=...``); a missing, truncated or edited export is not."""
    try:
        doc = verify_export(dest, prefix)
    except (ExportError, StoreError, OSError, ValueError) as err:
        log.info("export at %s is not current: %s", _at(dest, prefix)[0].uri(prefix), err)
        return False
    return all(doc.get(k) == v for k, v in fields.items())


def publish_export(local_dir: str | Path, dest: str | Store, prefix: str = "", *, replace: bool = False) -> str:
    """Copy the finished export folder `local_dir` to `dest` (`prefix`), with nothing half-written.

    A local folder given by path appears by one rename of a sibling temporary folder (an existing,
    non-empty one is replaced only with `replace`). Anywhere else (any fsspec URL, or a prefix in
    a `Store`) an existing manifest is deleted first, every file is put whole, and the manifest
    is written last: until then no reader takes the folder for an export. Returns its URL.
    """
    src = Path(local_dir)
    if not (src / MANIFEST).is_file():
        raise ExportError(f"{src}: no {MANIFEST}; export_model writes it")
    store, prefix = _at(dest, prefix)
    if store.is_local and not isinstance(dest, Store):
        target = Path(store.path(prefix))
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and not replace:
            raise FileExistsError(f"{target} exists and is not empty (replace it with --force)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(src, tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        return str(target)
    if store.exists(_key(prefix, MANIFEST)):
        if not replace:
            raise FileExistsError(f"{store.uri(prefix)} already holds an export (replace it with --force)")
        store.delete(_key(prefix, MANIFEST))  # from here on no reader takes it for an export until the new manifest
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            store.write_bytes(_key(prefix, f.name), f.read_bytes())
    store.write_bytes(_key(prefix, MANIFEST), (src / MANIFEST).read_bytes())
    return store.uri(prefix)
