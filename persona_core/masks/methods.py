"""Mask methods: how a method scores the weights of a linear module, and the registry of them.

A *method* scores every weight of a linear module from |W| and the activation statistics of
the module's input (one `GroupStats` per side it needs); a granularity (`persona_core.masks.spec`)
and the selection (`persona_core.masks.select`) then turn scores into a keep-mask.

Adding a method is one function and one line::

    @register("my-method", needs=(PERSONA,), alpha=1.0)
    def my_method(absw, stats, p):
        return (absw * stats[0].rms.float() ** p["alpha"],)

The function gets |W| (float32, [out, in]), the `GroupStats` of the module's input
for each role in ``needs`` (in that order), and the resolved parameters; it
returns one non-negative score tensor per side: one, or two for a method whose
``needs`` is (persona, opposite) — the persona's side, then the opposite's.
Every method is in `METHODS` (``METHODS["wanda"]``; an unknown name raises a ValueError that
lists the known ones).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from persona_core.calib.stats import GroupStats
from persona_core.errors import UserError
from persona_core.masks.select import keep_top, n_pruned
from persona_core.registry import Registry

# Roles a method can need statistics for.
PERSONA, OPPOSITE, GENERAL = "persona", "opposite", "general"

ScoreFn = Callable[[torch.Tensor, Sequence[GroupStats], dict], tuple[torch.Tensor, ...]]


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Method:
    name: str
    fn: ScoreFn
    needs: tuple[str, ...]
    defaults: dict
    strength: tuple[str, tuple[float, ...]] | None = None  # (parameter, values a budget search tries)
    reads: str | None = None  # a per-channel statistics group scored instead of module inputs (ffn-channels only)
    learned: bool = False  # its masks are learned (`persona_core.learn.contrastive`); `fn` gives the starting scores

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


METHODS: Registry[Method] = Registry("mask method")


def parse_params(items: Iterable[str]) -> dict[str, dict]:
    """``METHOD.KEY=VALUE`` items -> {method: {key: value}}, values read as JSON where they parse
    (``0.5`` a number, ``softplus`` a string); a malformed item raises `UserError`."""
    out: dict[str, dict] = {}
    for item in items:
        lhs, eq, value = item.partition("=")
        method, dot, key = lhs.partition(".")
        if not (eq and dot and method and key):
            raise UserError(f"--param {item!r}: expected METHOD.KEY=VALUE")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(method, {})[key] = parsed
    return out


def register(name: str, needs: tuple[str, ...] = (), strength: tuple[str, Sequence[float]] | None = None,
             reads: str | None = None, learned: bool = False, **defaults) -> Callable[[ScoreFn], ScoreFn]:
    """Register a scoring function under `name` in `METHODS` (see the module docstring).

    `strength` names the parameter that sets how hard the method contrasts, and the values a
    capability-budget search tries for it (`persona_core.masks.budget`), e.g. ``("lam", (1, 4, 16))``.
    `reads` names a per-MLP-channel statistics group (e.g. ``mlp_attr``): such a method scores
    channels, not weights (its function gets the group's `GroupStats` per role and returns one
    score per channel and side), so it builds ``ffn-channels`` masks only.
    `learned` marks a method whose masks a learner optimises (weights frozen) from the scores its
    function gives: build-masks hands its units to the learner pool (`persona_jobs.learn_masks`).
    """
    bad = [r for r in needs if r not in (PERSONA, OPPOSITE, GENERAL)]
    if bad or (OPPOSITE in needs and needs[:2] != (PERSONA, OPPOSITE)):
        raise ValueError(f"method {name!r}: needs must be drawn from persona, opposite, general (got {needs})")
    if strength is not None and (strength[0] not in defaults or not strength[1]):
        raise ValueError(f"method {name!r}: strength parameter {strength[0]!r} needs a default and values")

    def deco(fn: ScoreFn) -> ScoreFn:
        st = (strength[0], tuple(float(v) for v in strength[1])) if strength else None
        METHODS.add(name, Method(name, fn, tuple(needs), dict(defaults), st, reads, learned))
        return fn

    return deco


# ---------------------------------------------------------------------------- methods


def _f(z: torch.Tensor, p: dict) -> torch.Tensor:
    """The contrast function. softplus(z / tau) is the default: with relu every channel with
    z <= 0 scores 0, so at 30% sparsity whole channels fall to |W| order alone and the
    default model's perplexity grows ~20x (softplus: ~1.8x, see results/2026-11-22-issue5-first-study.md)."""
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


@register("contrastive-importance", needs=(PERSONA, OPPOSITE), strength=("beta", (0.5, 1.0, 2.0)), beta=1.0,
          eps=1e-8)
def contrastive_importance(absw, stats, p):
    """Importance first, contrast second: S+- = |W| r exp(+-beta tanh(z)), r the RMS input over both poles'
    texts pooled (Wanda on the pair's text) and z contrastive-wanda's standardised difference. The weights a
    pole's mask drops are those little text needs that lean to the opposite (the tilt is at most e^beta),
    a cheap start for `learned-contrastive` (issue 26)."""
    a, b = stats
    r = ((a.sumsq + b.sumsq) / max(a.tokens + b.tokens, 1)).sqrt()
    z = (a.norm_mean - b.norm_mean) / (a.norm_var + b.norm_var + p["eps"]).sqrt()
    tilt = p["beta"] * torch.tanh(z)
    return absw * (r * tilt.exp()).float(), absw * (r * (-tilt).exp()).float()


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
    inner = METHODS[p["contrast"]]
    if inner.sides != 2 or GENERAL in inner.needs:
        raise ValueError(f"{p['contrast']!r} is not a persona/opposite contrastive method")
    return inner.fn(absw, stats[:2], inner.resolve(p["options"]))


def _tiered(score: torch.Tensor, protected: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """One score where every protected weight outranks every other one.

    Unprotected weights keep the order of `score` (scaled per row into [0, 1]); protected ones
    score 2 + their `importance` (scaled per row into [0, 1]), so if a sparsity asks for more
    than the unprotected weights, the least important protected ones go first.
    """
    unit = lambda x: x / x.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
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
    inner = METHODS[p["contrast"]]
    if inner.sides != 2:
        raise ValueError(f"persona-vs-general: {p['contrast']!r} is not a contrastive method")
    return inner.fn(absw, stats, inner.resolve(p["options"]))[:1]


LEARNED_UNITS = ("ffn-channels", "input-channels")  # what a learned mask selects (the `unit` parameter)


def learned_granularity(params: Mapping) -> str:
    """The granularity a learned mask's spec and key carry for its `unit`: ``ffn-channels`` for MLP
    channels; ``unstructured`` for input channels of every linear (no other granularity names them;
    the `unit` parameter, in the key's parameter hash and the metadata, says which)."""
    return "ffn-channels" if params.get("unit") == "ffn-channels" else "unstructured"


@register("learned-contrastive", needs=(PERSONA, OPPOSITE), learned=True, init="contrastive-importance",
          unit="ffn-channels", steps=2, warmup=8, lr=0.05, batch=8, general_weight=1.0, general_batch=2, temperature=0.5,
          seed=0, precision="fp32")
def learned_contrastive(absw, stats, p):
    """One mask per pole learned with the weights frozen: the statement-preference margin (own calibration
    statements over the opposite's) plus a general-text KL to the dense model, straight-through top-k over
    `unit` scores (``ffn-channels`` or ``input-channels`` of every linear) started from `init`'s
    training-free scores (this function: what a zero learning rate keeps). See docs/learned-masks.md."""
    if p["unit"] not in LEARNED_UNITS:
        raise ValueError(f"learned-contrastive: unit {p['unit']!r} (use {', '.join(LEARNED_UNITS)})")
    return _contrast({"contrast": p["init"], "options": {}}, absw, stats)
