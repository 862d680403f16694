"""Mask methods: from weights and persona statistics to keep-masks.

A *method* scores every weight of a linear module from |W| and the activation
statistics of the module's input (one `GroupStats` per side it needs); a
*granularity* turns scores into a keep-mask:

* ``unstructured``  exactly the requested sparsity in every output row (Wanda's group)
* ``2:4``, ``4:8``  exactly N zeros in every group of M consecutive inputs (sparsity N/M)
* ``ffn-channels``  the same fraction of MLP intermediate channels removed in every
                    layer (rows of gate/up, columns of down); attention untouched

Ties never decide a mask: equal scores are ordered by |W|, then by position
(lower index kept first), so a mask is a pure function of its inputs.

Adding a method is one function and one line::

    @register("my-method", needs=(PERSONA,), alpha=1.0)
    def my_method(absw, stats, p):
        return (absw * stats[0].rms.float() ** p["alpha"],)

The function gets |W| (float32, [out, in]), the `GroupStats` of the module's input
for each role in ``needs`` (in that order), and the resolved parameters; it
returns one non-negative score tensor per side: one, or two for a method whose
``needs`` is (persona, opposite) — the persona's side, then the opposite's.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from functools import reduce
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from persona_core.masks.budget import Budget
from persona_core.catalog import REFERENCE_PERSONA_ID
from persona_core.store.hashing import content_hash
from persona_core.versions import MASKS_VERSION
from persona_core.models import LinearGroup, LoadedModel, linear_groups
from persona_core.calib.stats import GroupKey, GroupStats, PersonaStats

log = logging.getLogger(__name__)

GRANULARITIES = ("unstructured", "2:4", "4:8", "ffn-channels")
DEFAULT_GRANULARITY = "unstructured"
# How sparsity is spread over layers: the same in each, or OWL's outlier-weighted allocation
# (Yin et al., 2024): layers with more outlier scores keep more weights. M and lambda are OWL's defaults.
ALLOCATIONS = ("uniform", "owl", "focus")
OWL_M, OWL_LAMBDA = 5.0, 0.08
FOCUS_SHARE = 0.25  # the share of layers a focus allocation prunes (those where the two sides differ most)

# Roles a method can need statistics for.
PERSONA, OPPOSITE, GENERAL = "persona", "opposite", "general"

ScoreFn = Callable[[torch.Tensor, Sequence[GroupStats], dict], tuple[torch.Tensor, ...]]


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Method:
    name: str
    fn: ScoreFn
    needs: tuple[str, ...]
    defaults: dict
    strength: tuple[str, tuple[float, ...]] | None = None  # (parameter, values a budget search tries)
    reads: str | None = None  # a per-channel statistics group scored instead of module inputs (ffn-channels only)

    @property
    def sides(self) -> int:
        """Masks one build gives: 2 for a persona/opposite contrast, else 1."""
        return 2 if OPPOSITE in self.needs else 1

    @property
    def per_persona(self) -> bool:
        """False for masks that are the same for every persona (magnitude, wanda-general)."""
        return PERSONA in self.needs

    def resolve(self, params: Mapping | None) -> dict:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"method {self.name!r}: unknown parameter(s) {', '.join(unknown)} (known: {known})")
        return {**self.defaults, **params}


REGISTRY: dict[str, Method] = {}


def register(name: str, needs: tuple[str, ...] = (), strength: tuple[str, Sequence[float]] | None = None,
             reads: str | None = None, **defaults) -> Callable[[ScoreFn], ScoreFn]:
    """Register a scoring function under `name` (see the module docstring).

    `strength` names the parameter that sets how hard the method contrasts, and the values a
    capability-budget search tries for it (`persona_core.masks.budget`), e.g. ``("lam", (1, 4, 16))``.
    `reads` names a per-MLP-channel statistics group (e.g. ``mlp_attr``): such a method scores
    channels, not weights (its function gets the group's `GroupStats` per role and returns one
    score per channel and side), so it builds ``ffn-channels`` masks only.
    """
    bad = [r for r in needs if r not in (PERSONA, OPPOSITE, GENERAL)]
    if bad or (OPPOSITE in needs and needs[:2] != (PERSONA, OPPOSITE)):
        raise ValueError(f"method {name!r}: needs must be drawn from persona, opposite, general (got {needs})")
    if strength is not None and (strength[0] not in defaults or not strength[1]):
        raise ValueError(f"method {name!r}: strength parameter {strength[0]!r} needs a default and values")

    def deco(fn: ScoreFn) -> ScoreFn:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        st = (strength[0], tuple(float(v) for v in strength[1])) if strength else None
        REGISTRY[name] = Method(name, fn, tuple(needs), dict(defaults), st, reads)
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mask method {name!r} (known: {', '.join(REGISTRY)})") from None


# ---------------------------------------------------------------------------- methods


def _f(z: torch.Tensor, p: dict) -> torch.Tensor:
    """The contrast function. softplus(z / tau) is the default: with relu every channel with
    z <= 0 scores 0, so at 30% sparsity whole channels fall to |W| order alone and the
    default model's perplexity grows ~20x (softplus: ~1.8x, see README)."""
    if p["f"] == "relu":
        return torch.relu(z)
    if p["f"] == "softplus":
        return F.softplus(z / p["tau"])
    raise ValueError(f"unknown contrast function f={p['f']!r} (use relu or softplus)")


def _both(absw: torch.Tensor, z: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return absw * _f(z, p).float(), absw * _f(-z, p).float()


@register("magnitude")
def magnitude(absw, stats, p):
    return (absw,)


@register("wanda", needs=(PERSONA,))
def wanda(absw, stats, p):
    """|W| * sqrt(sum x^2 / tokens): Wanda's score on the persona's texts."""
    return (absw * stats[0].rms.float(),)


@register("wanda-general", needs=(GENERAL,))
def wanda_general(absw, stats, p):
    """Wanda on the general reference set: plain pruning, the same for every persona."""
    return wanda(absw, stats, p)


@register("contrastive-wanda", needs=(PERSONA, OPPOSITE), strength=("tau", (0.25, 1.0, 4.0)), f="softplus", tau=1.0,
          eps=1e-8)
def contrastive_wanda(absw, stats, p):
    """z = (mu+ - mu-) / sqrt(var+ + var- + eps) of the per-sample input norms; S+- = |W| f(+-z)."""
    a, b = stats
    z = (a.norm_mean - b.norm_mean) / (a.norm_var + b.norm_var + p["eps"]).sqrt()
    return _both(absw, z, p)


@register("contrastive-mean", needs=(PERSONA, OPPOSITE), f="softplus", tau=1.0, eps=1e-8)
def contrastive_mean(absw, stats, p):
    """As contrastive-wanda, from the mean and variance of the raw input values."""
    a, b = stats
    z = (a.mean - b.mean) / (a.var + b.var + p["eps"]).sqrt()
    return _both(absw, z, p)


@register("contrastive-penalty", needs=(PERSONA, OPPOSITE), strength=("lam", (1.0, 4.0, 16.0)), lam=4.0)
def contrastive_penalty(absw, stats, p):
    """S+ = |W| relu(a - lam relu(b - a)), a and b the two sides' RMS input (and vice versa)."""
    a, b = stats[0].rms, stats[1].rms
    lam = p["lam"]
    plus = torch.relu(a - lam * torch.relu(b - a))
    minus = torch.relu(b - lam * torch.relu(a - b))
    return absw * plus.float(), absw * minus.float()


@register("contrastive-attribution", needs=(PERSONA, OPPOSITE, GENERAL), strength=("lam", (0.25, 1.0, 4.0)),
          reads="mlp_attr", lam=1.0)
def contrastive_attribution(absw, stats, p):
    """MLP channels whose removal moves the log-likelihood toward the persona, and not general text.

    From the ``mlp_attr`` statistics (calibrate with ``attribution: true``): per channel, the mean
    per-token attribution to the log-likelihood of the persona's texts (a) and its opposite's (b).
    Removing the channel changes their mean log-prob by about -a and -b, so the persona's mask gains
    (b - a) of contrast. Its cost is read on general text as the mean *absolute* per-token
    attribution |g| (a channel some general tokens need a lot and others not at all costs
    perplexity even when its mean attribution cancels out). Channels are pruned in order of
    gain - lam |g| (the opposite's mask: a - b - lam |g|); keep-scores are the negation, shifted
    to be non-negative.
    """
    a, b = stats[0].mean, stats[1].mean
    cost = p["lam"] * stats[2].mean_abs
    drop_plus, drop_minus = (b - a) - cost, (a - b) - cost
    return tuple((d.max() - d).float() for d in (drop_plus, drop_minus))


def _contrast(p: dict, absw: torch.Tensor, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' scores of the contrastive method named by `p["contrast"]` (with `p["options"]`)."""
    inner = get_method(p["contrast"])
    if inner.sides != 2 or GENERAL in inner.needs:
        raise ValueError(f"{p['contrast']!r} is not a persona/opposite contrastive method")
    return inner.fn(absw, stats[:2], inner.resolve(p["options"]))


def _tiered(score: torch.Tensor, protected: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """One score where every protected weight outranks every other one.

    Unprotected weights keep the order of `score` (scaled per row into [0, 1]); protected ones
    score 2 + their `importance` (scaled per row into [0, 1]), so if a sparsity asks for more
    than the unprotected weights, the least important protected ones go first.
    """
    unit = lambda x: x / x.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)  # noqa: E731
    return torch.where(protected, 2.0 + unit(importance), unit(score))


def _protected(general: torch.Tensor, absw: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row, the top `fraction` of weights by general importance (ties by |W|, then position)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"protect must be in [0, 1], got {fraction}")
    n = general.shape[-1]
    return keep_top(general, n - n_pruned(n, 1.0 - fraction), absw)


@register("general-gated", needs=(PERSONA, OPPOSITE, GENERAL), strength=("protect", (0.9, 0.7, 0.5)),
          contrast="contrastive-penalty", options={}, protect=0.7)
def general_gated(absw, stats, p):
    """A contrast pruned only among the weights general text needs least.

    Per output row, the top `protect` fraction of weights by the `general` Wanda score |W| rms_general
    is protected; the rest are ranked by `contrast`'s scores (both sides). protect=0 is the plain
    contrast; protect=1 - sparsity prunes exactly the weights wanda-general would, re-ranked by persona.
    """
    general = absw * stats[2].rms.float()
    keep = _protected(general, absw, p["protect"])
    return tuple(_tiered(s, keep, general) for s in _contrast(p, absw, stats))


@register("persona-vs-general", needs=(PERSONA, GENERAL), contrast="contrastive-wanda", options={})
def persona_vs_general(absw, stats, p):
    """Any contrastive method (`contrast`, with its `options`) against the general set; the persona's side."""
    inner = get_method(p["contrast"])
    if inner.sides != 2:
        raise ValueError(f"persona-vs-general: {p['contrast']!r} is not a contrastive method")
    return inner.fn(absw, stats, inner.resolve(p["options"]))[:1]


# ---------------------------------------------------------------------------- specs and keys


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
        method = get_method(self.method)
        method.resolve(self.params)  # unknown method or parameter: fail now
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
        return get_method(self.method).resolve(self.params)

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

    def with_setting(self, sparsity: float, params: Mapping | None = None) -> "MaskSpec":
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
    from persona_core.store import layout

    m = get_method(method)
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


# ---------------------------------------------------------------------------- weights


@dataclass
class LinearWeights:
    """The prunable linear weights of a model and how they group, detached from the model.

    `tensors` maps full module names to weights (torch tensors or numpy arrays: what
    a Ray worker gets from the object store, zero-copy). Picklable.
    """

    groups: list[LinearGroup]
    tensors: dict

    @classmethod
    def from_model(cls, model: nn.Module | LoadedModel, numpy: bool = False) -> "LinearWeights":
        model = model.model if isinstance(model, LoadedModel) else model
        groups = linear_groups(model)
        tensors = {}
        for g in groups:
            for name in g.modules:
                w = model.get_submodule(name).weight.detach()
                tensors[name] = w.float().cpu().numpy() if numpy else w
        return cls(groups, tensors)

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
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


# ---------------------------------------------------------------------------- selection


def _kth_smallest(x: torch.Tensor, j: int) -> torch.Tensor:
    """Per row, the j-th smallest value (0-based): numpy's introselect on CPU, kthvalue elsewhere."""
    if x.device.type == "cpu":
        a = x.contiguous().numpy()
        return torch.from_numpy(np.partition(a, j, axis=-1)[..., j].copy())
    return torch.kthvalue(x, j + 1, dim=-1).values


def _count(mask: torch.Tensor) -> torch.Tensor:
    """True values per row (numpy's sum of bools is many times faster than torch's on CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(mask.numpy().sum(-1, dtype=np.int64))
    return mask.sum(-1)


def _at_least(x: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """x >= cut, cut broadcast per row (numpy's comparison is ~3x torch's on CPU)."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy() >= cut.numpy())
    return x >= cut


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x[rows]


def keep_top(score: torch.Tensor, k: int, tiebreak: torch.Tensor) -> torch.Tensor:
    """Keep exactly the `k` largest scores in every row (last dim), deterministically.

    Ties in `score` are ordered by `tiebreak` (larger first), then by index (lower
    first); both must be non-negative. Vectorised: one selection pass over all rows,
    a second only over rows with a tie at the cut, a cumulative count only over rows
    tied in both keys.
    """
    n = score.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n}")
    if k == 0 or k == n:
        return torch.full(score.shape, k == n, dtype=torch.bool, device=score.device)
    flat = score.reshape(-1, n).float()
    cut = _kth_smallest(flat, n - k).unsqueeze(-1)
    if torch.isnan(cut).any():
        raise ValueError("scores contain NaN (check the statistics)")
    keep = _at_least(flat, cut)
    ambiguous = _count(keep) > k  # more than k at or above the cut: a tie there
    if ambiguous.any():
        rows = None if ambiguous.all() else ambiguous.nonzero().squeeze(-1)
        sub, sub_cut = _rows(flat, rows), _rows(cut, rows)
        tb = _rows(tiebreak.reshape(-1, n), rows).float()
        # Above the cut: always kept (+inf); at the cut: ranked by tiebreak; below: never (-1).
        key = torch.where(sub > sub_cut, torch.inf, torch.where(sub == sub_cut, tb, -1.0))
        if rows is None:
            keep = _keep_top_exact(key, k)
        else:
            keep[rows] = _keep_top_exact(key, k)
    return keep.reshape(score.shape)


def _keep_top_exact(key: torch.Tensor, k: int) -> torch.Tensor:
    """Top k per row; remaining ties go to the lowest indices."""
    n = key.shape[-1]
    cut = _kth_smallest(key, n - k).unsqueeze(-1)
    keep = _at_least(key, cut)
    ambiguous = _count(keep) > k
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(-1)
        sub, sub_cut = key[rows], cut[rows]
        above = sub > sub_cut
        at = sub == sub_cut
        need = (k - _count(above)).unsqueeze(-1)
        keep[rows] = above | (at & (at.cumsum(-1) <= need))
    return keep


def n_pruned(n: int, sparsity: float) -> int:
    """How many of `n` a sparsity removes (floor, as Wanda; robust to float noise)."""
    return int(math.floor(n * sparsity + 1e-9))


def select_unstructured(score: torch.Tensor, absw: torch.Tensor, sparsity: float) -> torch.Tensor:
    n = score.shape[1]
    return keep_top(score, n - n_pruned(n, sparsity), absw)


def select_nm(score: torch.Tensor, absw: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out, width = score.shape
    if width % m:
        raise ValueError(f"N:M {n}:{m} needs the input width ({width}) to be a multiple of {m}")
    keep = keep_top(score.reshape(out, width // m, m), m - n, absw.reshape(out, width // m, m))
    return keep.reshape(out, width)


# ---------------------------------------------------------------------------- building


StatsLike = PersonaStats | Mapping[GroupKey, GroupStats]


def _group_stats(stats: Sequence[StatsLike], key: GroupKey, device) -> list[GroupStats]:
    out = []
    for s in stats:
        groups = s.groups if isinstance(s, PersonaStats) else s
        if key not in groups:
            hint = ("calibrate with attribution: true (calibrate.options.attribution)" if key[1] == "mlp_attr"
                    else "were they recorded on this model?")
            raise KeyError(f"statistics have no group {key} ({hint})")
        out.append(groups[key].to(device))
    return out


def _scores(method: Method, params: dict, absw: torch.Tensor, gstats: list[GroupStats]) -> tuple[torch.Tensor, ...]:
    scores = method.fn(absw, gstats, params)
    if len(scores) != method.sides:
        raise ValueError(f"method {method.name!r} returned {len(scores)} score tensors, expected {method.sides}")
    return scores


def owl_sparsities(weights: nn.Module | LoadedModel | LinearWeights, stats: Sequence[StatsLike], sparsity: float,
                   m: float = OWL_M, lam: float = OWL_LAMBDA, device: torch.device | str | None = None
                   ) -> tuple[float, ...]:
    """OWL's layer sparsities: more outliers in a layer's Wanda scores, fewer weights pruned there.

    A layer's outlier ratio D is the share of its scores |W| * rms(x) above `m` times the
    layer's mean score (rms over every side's statistics together, so a contrastive pair
    gets one allocation; |W| alone without statistics). The ratios are scaled to
    [0, 2 lam], centred, and subtracted from `sparsity`: the mean over layers stays
    `sparsity`, each layer within `sparsity` +- lam (clipped to [0, 0.99]).
    """
    lw = weights if isinstance(weights, LinearWeights) else LinearWeights.from_model(weights)
    by_layer: dict[int, list[LinearGroup]] = {}
    for g in lw.groups:
        by_layer.setdefault(g.layer, []).append(g)
    ratios = []
    for layer in sorted(by_layer):
        scores = []
        for g in by_layer[layer]:
            rms = reduce(GroupStats.merge, _group_stats(stats, (g.layer, g.name), device or "cpu")).rms.float() \
                if stats else None
            for name in g.modules:
                absw = lw.weight(name, device).abs()
                scores.append((absw * rms if rms is not None else absw).flatten())
        flat = torch.cat(scores)
        ratios.append(float((flat > m * flat.mean()).double().mean()))
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    d = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    return tuple(float(s) for s in (sparsity - (d - d.mean())).clamp(0.0, 0.99))


def layer_divergence(lw: LinearWeights, a: StatsLike, b: StatsLike) -> list[float]:
    """Per decoder layer: how far two sides' input statistics differ, the mean over the layer's
    groups of sum|rms_a - rms_b| / sum(rms_a + rms_b) over input channels (0: identical, 1: disjoint)."""
    by_layer: dict[int, list[float]] = {}
    for g in lw.groups:
        ga, gb = _group_stats([a, b], (g.layer, g.name), "cpu")
        ra, rb = ga.rms.double(), gb.rms.double()
        by_layer.setdefault(g.layer, []).append(float((ra - rb).abs().sum() / (ra + rb).sum().clamp_min(1e-12)))
    return [sum(v) / len(v) for _, v in sorted(by_layer.items())]


def focus_sparsities(weights: nn.Module | LoadedModel | LinearWeights, stats: Sequence[StatsLike], sparsity: float,
                     share: float = FOCUS_SHARE) -> tuple[float, ...]:
    """A focus allocation: the whole pruning budget goes to the ``share`` of layers where the
    persona's and the opposite's statistics differ most (`layer_divergence`); the other layers
    stay dense. The focused layers get ``sparsity * layers / focused`` each (at most 0.99), so the
    mean over layers is `sparsity` unless that cap binds. Ties: the earlier layer first.
    Needs both sides of a pair (a contrastive method)."""
    if len(stats) < 2:
        raise ValueError("allocation 'focus' compares a persona with its opposite: use it with a contrastive method")
    lw = weights if isinstance(weights, LinearWeights) else LinearWeights.from_model(weights)
    d = layer_divergence(lw, stats[0], stats[1])
    n = max(1, round(share * len(d)))
    chosen = set(sorted(range(len(d)), key=lambda i: (-d[i], i))[:n])
    per = min(0.99, sparsity * len(d) / n)
    return tuple(per if i in chosen else 0.0 for i in range(len(d)))


def resolve_allocation(weights: nn.Module | LoadedModel | LinearWeights, stats: Sequence[StatsLike], spec: MaskSpec,
                       device: torch.device | str | None = None) -> MaskSpec:
    """`spec` with its per-layer sparsities filled in for a non-uniform allocation (else as is)."""
    if spec.layer_sparsity is not None or spec.allocation == "uniform":
        return spec
    if spec.allocation == "owl":
        return replace(spec, layer_sparsity=owl_sparsities(weights, stats, spec.sparsity, device=device))
    return replace(spec, layer_sparsity=focus_sparsities(weights, stats, spec.sparsity))


def iter_masks(weights: nn.Module | LoadedModel | LinearWeights, stats: Sequence[StatsLike], spec: MaskSpec,
               device: torch.device | str | None = None) -> Iterator[tuple[str, tuple[torch.Tensor, ...]]]:
    """Yield (module name, one keep-mask per side), streaming one decoder layer at a time."""
    method = get_method(spec.method)
    if len(stats) != len(method.needs):
        raise ValueError(f"method {spec.method!r} needs statistics for {', '.join(method.needs) or 'nothing'} "
                         f"({len(method.needs)}), got {len(stats)}")
    lw = weights if isinstance(weights, LinearWeights) else LinearWeights.from_model(weights)
    spec = resolve_allocation(lw, stats, spec, device)
    if spec.layer_sparsity and len(spec.layer_sparsity) != lw.num_layers:
        raise ValueError(f"layer_sparsity has {len(spec.layer_sparsity)} values for {lw.num_layers} layers")
    params = spec.resolved_params
    if spec.granularity == "ffn-channels":
        yield from _ffn_channel_masks(lw, stats, spec, device)
        return
    if method.reads:
        raise ValueError(f"method {method.name!r} scores MLP channels (statistics group {method.reads!r}): "
                         "use granularity ffn-channels")
    nm = spec.nm
    for g in lw.groups:
        gstats = _group_stats(stats, (g.layer, g.name), device or "cpu")
        for name in g.modules:
            absw = lw.weight(name, device).abs()
            masks = []
            for score in _scores(method, params, absw, gstats):
                if nm:
                    masks.append(select_nm(score, absw, *nm))
                else:
                    masks.append(select_unstructured(score, absw, spec.sparsity_of(g.layer)))
            yield name, tuple(masks)


def _mlp_layers(lw: LinearWeights) -> dict[int, dict[str, LinearGroup]]:
    by_layer: dict[int, dict[str, LinearGroup]] = {}
    for g in lw.groups:
        by_layer.setdefault(g.layer, {})[g.name] = g
    for layer, groups in by_layer.items():
        if "mlp_in" not in groups or "mlp_out" not in groups or len(groups["mlp_out"].modules) != 1:
            raise ValueError(f"layer {layer}: ffn-channels needs one MLP output projection and its input projections")
    return dict(sorted(by_layer.items()))


def ffn_channel_scores(lw: LinearWeights, stats: Sequence[StatsLike], spec: MaskSpec,
                       device: torch.device | str | None = None
                       ) -> Iterator[tuple[int, tuple[torch.Tensor, ...], torch.Tensor]]:
    """Per decoder layer: (layer, one channel score per side, tiebreak), the training-free importance
    of every MLP intermediate channel.

    Channel c scores sum_i S(down)[i, c]: its estimated output contribution (S the method's
    score of the down projection). The tiebreak is the column's |W| sum.
    """
    method = get_method(spec.method)
    if len(stats) != len(method.needs):
        raise ValueError(f"method {spec.method!r} needs statistics for {', '.join(method.needs) or 'nothing'} "
                         f"({len(method.needs)}), got {len(stats)}")
    params = spec.resolved_params
    for layer, groups in _mlp_layers(lw).items():
        absw = lw.weight(groups["mlp_out"].modules[0], device).abs()
        gstats = _group_stats(stats, (layer, method.reads or "mlp_out"), device or "cpu")
        scores = _scores(method, params, absw, gstats)
        if method.reads:  # already one score per channel
            if any(s.shape != (absw.shape[1],) for s in scores):
                raise ValueError(f"method {method.name!r}: channel scores of shape {[tuple(s.shape) for s in scores]}"
                                 f", expected ({absw.shape[1]},) at layer {layer}")
            scores = tuple(s.float() for s in scores)
        else:
            scores = tuple(s.sum(0, dtype=torch.float64).float() for s in scores)
        yield layer, scores, absw.sum(0)


def channel_module_masks(lw: LinearWeights, channels: Mapping[int, torch.Tensor]
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Module keep-masks of a per-layer channel keep-vector: gate/up rows and down columns of the
    kept channels; attention all True."""
    for layer, groups in _mlp_layers(lw).items():
        keep = channels[layer].bool()
        width = keep.numel()
        for gname in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            for name in groups.get(gname, LinearGroup(layer, gname, (), 0)).modules:
                shape = tuple(lw.tensors[name].shape)
                if gname.startswith("attn"):
                    yield name, torch.ones(shape, dtype=torch.bool, device=keep.device)
                elif gname == "mlp_in":
                    if shape[0] != width:
                        raise ValueError(f"{name}: {shape[0]} output rows, but the MLP has {width} channels")
                    yield name, keep.unsqueeze(1).expand(shape).contiguous()
                else:
                    if shape[1] != width:
                        raise ValueError(f"{name}: {shape[1]} input columns, but the MLP has {width} channels")
                    yield name, keep.unsqueeze(0).expand(shape).contiguous()


def _ffn_channel_masks(lw: LinearWeights, stats, spec: MaskSpec, device):
    """Keep the top channels of `ffn_channel_scores` in every layer (ties: |W| column sum, then index)."""
    per_side: list[dict[int, torch.Tensor]] = []
    for layer, scores, tiebreak in ffn_channel_scores(lw, stats, spec, device):
        width = tiebreak.numel()
        k = width - n_pruned(width, spec.sparsity_of(layer))
        for side, score in enumerate(scores):
            if len(per_side) <= side:
                per_side.append({})
            per_side[side][layer] = keep_top(score, k, tiebreak)
    streams = [channel_module_masks(lw, channels) for channels in per_side]
    for items in zip(*streams):
        yield items[0][0], tuple(mask for _, mask in items)


def build_pair_masks(weights, *stats: StatsLike, spec: MaskSpec,
                     device: torch.device | str | None = None) -> tuple[dict[str, torch.Tensor], ...]:
    """Every side's masks from one pass over the weights (two for a persona/opposite contrast)."""
    out: tuple[dict[str, torch.Tensor], ...] = tuple({} for _ in range(get_method(spec.method).sides))
    for name, masks in iter_masks(weights, stats, spec, device):
        for side, mask in zip(out, masks):
            side[name] = mask
    return out


def build_masks(weights, *stats: StatsLike, spec: MaskSpec, device: torch.device | str | None = None
                ) -> dict[str, torch.Tensor]:
    """Keep-masks (bool, True = keep, the weight's shape) by full module name.

    `weights`: a model, a `LoadedModel` or `LinearWeights`; `stats`: one per role the
    method needs, in order (see `get_method(name).needs`). For a contrastive method
    this is the persona's side; `build_pair_masks` gives both.
    """
    return build_pair_masks(weights, *stats, spec=spec, device=device)[0]
