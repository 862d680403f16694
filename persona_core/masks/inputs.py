"""What a mask build reads: the prunable linear weights detached from the model, and the
statistics of their inputs (a `PersonaStats`, or its groups by key, one per role a method needs).

`WeightSource` names a model's weights without holding them: what a build-masks driver hands its
workers. Each worker opens it on its own node (`WeightSource.open`): the model's layout comes from
its config alone (a model built on the meta device), and every weight is read from the model's
safetensors files (`SafetensorsWeights`) only when a build asks for it, one module at a time.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from persona_core.calib.stats import GroupKey, GroupStats, PersonaStats
from persona_core.models.layers import LinearGroup, linear_groups
from persona_core.models.loading import LoadedModel, load_model, model_folder, model_key

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's tensor -> file map


@dataclass
class LinearWeights:
    """The prunable linear weights of a model and how they group, detached from the model.

    `tensors` maps full module names to weights (torch tensors, numpy arrays, or a
    `SafetensorsWeights` that reads each one from the model's files when asked). Picklable.
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
    def of(cls, weights: nn.Module | LoadedModel | LinearWeights | WeightSource) -> LinearWeights:
        """`weights` itself when it already is `LinearWeights`, a `WeightSource` opened on this node,
        else the model's, read once."""
        if isinstance(weights, WeightSource):
            return weights.open()
        return weights if isinstance(weights, LinearWeights) else cls.from_model(weights)

    def weight(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        w = self.tensors[name]
        if isinstance(w, np.ndarray):
            w = _as_tensor(w)
        return w.to(device=device or w.device, dtype=torch.float32)

    @property
    def num_layers(self) -> int:
        return max(g.layer for g in self.groups) + 1

    def shape(self, name: str) -> tuple[int, ...]:
        """A weight's shape, without reading it when the weights are read on demand."""
        shapes = self.tensors.shapes if isinstance(self.tensors, SafetensorsWeights) else None
        return tuple(shapes[name]) if shapes is not None else tuple(self.tensors[name].shape)

    @property
    def numel(self) -> int:
        return sum(int(np.prod(self.shape(n))) for g in self.groups for n in g.modules)


class SafetensorsWeights(Mapping):
    """Module name -> its weight, read from a safetensors file on each access (nothing is kept).

    `where` maps every module to (file, tensor name); `shapes` gives each weight's shape without a
    read. A read returns the stored dtype; `LinearWeights.weight` makes it float32, exactly what
    loading the model in float32 gives. Plain data: picklable."""

    def __init__(self, where: Mapping[str, tuple[str, str]], shapes: Mapping[str, tuple[int, ...]]):
        self.where = dict(where)
        self.shapes = dict(shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        path, key = self.where[name]
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


@dataclass(frozen=True)
class WeightSource:
    """A model's prunable linear weights by reference: a model spec (what `load_model` takes) and the
    model key the driver planned with. Small and picklable: a driver hands this to its workers
    instead of the weights, and never loads the model itself.

    `open` (on a worker) resolves the spec on that node: a built-in model converted and checked in
    the node's model cache, a Hugging Face snapshot, a local folder. The layout (groups, shapes)
    comes from the model's config, and each weight is read from the safetensors files when a build
    asks for it (`SafetensorsWeights`). Where the files cannot be read so (no safetensors, tensor
    names or shapes that differ from the modules'), the worker loads the model itself, with a
    warning naming why; the tiny random model has no files and is built on the worker."""

    spec: str
    key: str | None = None  # the model key the driver planned with; checked on the worker when given

    def open(self) -> LinearWeights:
        """The weights on this node (the layout is read once per process; weights on every access)."""
        known = _OPENED.get(self)
        if known is not None:
            return known
        if self.key is not None:
            here = model_key(self.spec)
            if here != self.key:
                raise RuntimeError(f"model {self.spec!r} is {here} on this node, the driver planned with {self.key}")
        folder = model_folder(self.spec)
        if folder is None:  # the tiny random model: built in code (kilobytes), no files to read
            lw = LinearWeights.from_model(load_model(self.spec, device="cpu", dtype="float32"))
            _OPENED[self] = lw
            return lw
        lw, problem = read_layout(folder)
        if lw is None:
            log.warning("model %s (%s): %s; loading the whole model on this worker instead", self.spec, folder, problem)
            return LinearWeights.from_model(load_model(self.spec, device="cpu", dtype="float32"))
        _OPENED[self] = lw
        return lw


# WeightSource -> its LinearWeights in this process (a Ray worker runs many tasks: the layout is read once)
_OPENED: dict[WeightSource, LinearWeights] = {}


def model_layout(folder: Path | str) -> tuple[list[LinearGroup], dict[str, tuple[int, ...]]]:
    """The prunable groups and every weight's shape of the model in `folder`, from its config alone
    (the model is built on the meta device: no weight is allocated or read)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy: only when a layout is read

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups = linear_groups(model)
    return groups, {n: tuple(model.get_submodule(n).weight.shape) for g in groups for n in g.modules}


def tensor_files(folder: Path | str) -> dict[str, str]:
    """Every tensor name of the safetensors checkpoint in `folder` -> the file that holds it
    (a sharded checkpoint's index, else every ``*.safetensors`` file's own list); {} when none."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: unreadable safetensors index ({type(err).__name__}: {err})") from err
        return {key: str(folder / name) for key, name in weight_map.items()}
    out: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out.update((key, str(path)) for key in f.keys())
    return out


def read_layout(folder: Path | str) -> tuple[LinearWeights | None, str]:
    """(`LinearWeights` reading the model in `folder` on demand, "") when every prunable module's
    ``<module>.weight`` is in its safetensors files with the module's shape; else (None, what differs)."""
    files = tensor_files(folder)
    if not files:
        return None, "no safetensors files"
    groups, shapes = model_layout(folder)
    where: dict[str, tuple[str, str]] = {}
    problems = []
    with ExitStack() as stack:
        handles: dict[str, object] = {}
        for name, shape in shapes.items():
            key = f"{name}.weight"
            if key not in files:
                problems.append(f"no tensor {key}")
                continue
            path = files[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            stored = tuple(handles[path].get_slice(key).get_shape())
            if stored != shape:
                problems.append(f"{key} is {list(stored)} in the file, {list(shape)} in the model")
            where[name] = (path, key)
    if problems:
        return None, f"{len(problems)} weight(s) not readable by name ({'; '.join(problems[:3])})"
    return LinearWeights(groups, SafetensorsWeights(where, shapes)), ""


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
