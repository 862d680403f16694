"""What a mask is and where it lives: `MaskSpec` (method, parameters, sparsity, granularity,
allocation, budget) and its store key (`mask_key`, `spec_key`).

Granularities, how scores become a keep-mask:

* ``unstructured``  exactly the requested sparsity in every output row (Wanda's group)
* ``2:4``, ``4:8``  exactly N zeros in every group of M consecutive inputs (sparsity N/M)
* ``ffn-channels``  the same fraction of MLP intermediate channels removed in every
                    layer (rows of gate/up, columns of down); attention untouched

Allocations, how sparsity is spread over layers: ``uniform`` (the same in each), ``owl``
(OWL's outlier-weighted allocation) or ``focus`` (see `persona_core.masks.allocation`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from persona_core.catalog import REFERENCE_PERSONA_ID
from persona_core.masks.budget import Budget
from persona_core.masks.methods import METHODS, learned_granularity
from persona_core.store import layout
from persona_core.store.hashing import content_hash
from persona_core.versions import MASKS_VERSION

GRANULARITIES = ("unstructured", "2:4", "4:8", "ffn-channels")
DEFAULT_GRANULARITY = "unstructured"
ALLOCATIONS = ("uniform", "owl", "focus")


@dataclass(frozen=True)
class MaskSpec:
    """What a mask is: method, its parameters, sparsity and granularity.

    `layer_sparsity` (one value per decoder layer) overrides the uniform sparsity
    for unstructured and ffn-channels masks. ``allocation="owl"`` fills it from the
    weights and statistics at build time (`resolve_allocation`), with the same mean.

    A `budget` asks for the sparsity (and strength) a capability-budget search picks per
    persona or pair (`persona_core.masks.budget`); `sparsity` is then only a placeholder until
    the search fills it in (`with_setting`), and the hash names the budget instead.
    """

    method: str
    sparsity: float = 0.5
    granularity: str = DEFAULT_GRANULARITY
    params: dict = field(default_factory=dict)
    layer_sparsity: tuple[float, ...] | None = None
    allocation: str = "uniform"
    budget: Budget | None = None

    def __post_init__(self):
        method = METHODS[self.method]
        resolved = method.resolve(self.params)  # unknown method or parameter: fail now
        if method.learned:  # the unit a learned mask selects is its `unit` parameter; the granularity names it
            object.__setattr__(self, "granularity", learned_granularity(resolved))
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r} (use {', '.join(GRANULARITIES)})")
        if method.reads and self.granularity != "ffn-channels":
            raise ValueError(f"method {self.method!r} scores MLP channels (statistics group {method.reads!r}): "
                             f"use granularity ffn-channels, not {self.granularity}")
        for s in (self.sparsity, *(self.layer_sparsity or ())):
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity must be in [0, 1), got {s}")
        nm = self.nm
        if nm and not math.isclose(self.sparsity, nm[0] / nm[1]):
            raise ValueError(f"granularity {self.granularity} fixes sparsity at {nm[0] / nm[1]:g}, got {self.sparsity:g}")
        if nm and (self.layer_sparsity or self.allocation != "uniform"):
            raise ValueError("per-layer sparsity (layer_sparsity, allocation) does not apply to N:M masks")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r} (use {', '.join(ALLOCATIONS)})")
        if self.budget is not None and (nm or self.layer_sparsity):
            raise ValueError("a capability budget searches the sparsity: it does not apply to N:M masks or a fixed "
                             "layer_sparsity")

    @property
    def nm(self) -> tuple[int, int] | None:
        m = re.fullmatch(r"(\d+):(\d+)", self.granularity)
        return (int(m[1]), int(m[2])) if m else None

    @property
    def resolved_params(self) -> dict:
        return METHODS[self.method].resolve(self.params)

    @property
    def hash(self) -> str:
        """What was asked for; an OWL allocation's resolved layer sparsities do not count."""
        layers = list(self.layer_sparsity) if self.layer_sparsity and self.allocation == "uniform" else None
        extra = [] if self.allocation == "uniform" else [self.allocation]  # uniform keeps the older hashes
        if self.budget is not None:  # the sparsity is the search's answer, not part of the question
            return content_hash(MASKS_VERSION, self.method, self.resolved_params, "budget", self.budget.hash,
                                self.granularity, *extra)
        return content_hash(MASKS_VERSION, self.method, self.resolved_params, round(self.sparsity, 6),
                            self.granularity, layers, *extra)

    def with_setting(self, sparsity: float, params: Mapping | None = None) -> MaskSpec:
        """The plain fixed-sparsity spec of one setting a budget search tries or chooses."""
        return replace(self, sparsity=float(sparsity), params={**self.params, **(params or {})}, budget=None)

    def sparsity_of(self, layer: int) -> float:
        return self.layer_sparsity[layer] if self.layer_sparsity else self.sparsity

    def to_dict(self) -> dict:
        return {"method": self.method, "sparsity": self.sparsity, "granularity": self.granularity,
                "params": self.resolved_params, "layer_sparsity": list(self.layer_sparsity or []) or None,
                "allocation": self.allocation, "budget": self.budget.to_dict() if self.budget else None}


def mask_key(model_key: str, method: str, sparsity: float, persona_id: str,
             granularity: str = DEFAULT_GRANULARITY, params: Mapping | None = None,
             allocation: str = "uniform", budget: Budget | None = None, calib: str | None = None) -> str:
    """Store key of a mask: ``masks/model=<k>/[calib=<c>/]method=<m>/sparsity=<s>/<persona>.safetensors``.

    ``calib=<c>`` (the calibration config's hash) is there for every mask derived from
    statistics, so the masks of two calibration configs of one persona coexist; a method
    that reads no statistics (magnitude) has none. Keys without it (written before it
    existed, or by callers passing no config) are never what a config-aware reader asks for.

    A budgeted mask replaces the sparsity segment by ``budget=<label>`` (``ppl1.1``), with
    ``-<hash>`` when the search settings are not the default ones: what was asked for, so
    a nightly rerun finds it whatever sparsity the search chose.

    The method segment carries what else tells masks apart: ``@<granularity>`` for a
    non-default granularity (``2:4`` written ``2of4``), ``~<allocation>`` for a non-uniform
    allocation and ``+<hash>`` for non-default parameters, e.g.
    ``method=contrastive-wanda@2of4+1a2b3c4d`` or ``method=wanda~owl``. Masks that are the same
    for every persona (magnitude, wanda-general) live once, under ``general``.
    """
    m = METHODS[method]
    resolved = m.resolve(params)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}")
    params_hash = content_hash(resolved)[:8] if resolved != m.defaults else None
    segment = layout.method_segment(method, granularity, allocation, params_hash)
    owner = persona_id if m.per_persona else REFERENCE_PERSONA_ID
    return layout.mask(model_key, segment, sparsity, owner, None if budget is None else budget_segment(budget),
                       calib if calib and m.needs else None)


def budget_segment(budget: Budget) -> str:
    """``ppl1.1`` for the default search settings, else ``ppl1.1-<hash8>``."""
    default = Budget(perplexity_ratio=budget.perplexity_ratio)
    return budget.label + ("" if budget == default else "-" + budget.hash[:8])


def spec_key(model_key: str, spec: MaskSpec, persona_id: str, calib: str | None = None) -> str:
    return mask_key(model_key, spec.method, spec.sparsity, persona_id, spec.granularity, spec.params,
                    spec.allocation, spec.budget, calib)
