"""Activation steering (contrastive activation addition): the `dense+steer` baseline.

A persona's steering vector at decoder layer L is the mean of the residual
stream entering L over its calibration tokens minus the same mean of its
opposite (or of the `general` reference set for a persona without one), both
read from the ``residual`` group of the calibration statistics (sums / tokens).
While scoring, ``alpha * v`` is added to the residual stream entering layer L at
every position (`steer`, a forward pre-hook removed on exit).

L and alpha are chosen per opposing pair (`choose`): on a validation split of
the pair's *calibration* statements (never the evaluation statements) the
pair's separation is measured with A steered by +v and B by -v, and the
setting with the largest validation separation is kept among those whose
perplexity ratio on general text (WikiText-2 *validation* windows; see
`persona_core.eval.validation`) stays within the budget for both directions. For
each layer, alphas are tried in increasing order and the search stops at the
first one over budget (perplexity grows with alpha), so a layer costs at most
one setting beyond its feasible ones.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from persona_core.calib.recorder import RESIDUAL
from persona_core.eval.objective import adam_step, pad_sequences
from persona_core.models.layers import decoder_layers
from persona_core.calib.stats import PersonaStats

log = logging.getLogger(__name__)


class MissingResidualStats(ValueError):
    """Statistics recorded before the residual-stream group existed (or of another model)."""


def residual_means(stats: PersonaStats) -> dict[int, torch.Tensor]:
    """Per decoder layer, the mean residual activation entering it (float64, CPU)."""
    out = {layer: (g.sum / max(g.tokens, 1)).detach().to("cpu", torch.float64)
           for (layer, name), g in stats.groups.items() if name == RESIDUAL}
    if not out:
        raise MissingResidualStats(
            f"statistics of persona {stats.persona_id!r} (model {stats.model_key}, calib hash "
            f"{stats.calib_hash or '?'}) hold no '{RESIDUAL}' group: they were recorded before residual-stream "
            f"statistics existed. Recompute them: delete stats/model={stats.model_key}/persona={stats.persona_id}/ "
            "in the store (or run calibration with --force) and calibrate again")
    return out


def steering_vectors(persona: PersonaStats, reference: PersonaStats) -> dict[int, torch.Tensor]:
    """mean(persona) - mean(reference) per layer: `reference` is the opposite persona, or `general`."""
    a, b = residual_means(persona), residual_means(reference)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise MissingResidualStats(f"residual statistics of {persona.persona_id!r} and {reference.persona_id!r} "
                                   "cover different layers or widths (different models?)")
    return {k: a[k] - b[k] for k in sorted(a)}


@contextlib.contextmanager
def steer(model: nn.Module, layer: int, vector: torch.Tensor, alpha: float) -> Iterator[None]:
    """Inside the block, ``alpha * vector`` is added to the residual stream entering `layer`.

    The hook is always removed on exit (also on error), so later conditions see the dense model.
    """
    target = _layer(model, layer)
    ref = next(target.parameters())
    delta = (float(alpha) * vector.detach().to(torch.float64)).to(ref.device, ref.dtype)
    with _adding(target, delta):
        yield


def _layer(model: nn.Module, layer: int) -> nn.Module:
    _, layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"steering layer {layer} outside 0..{len(layers) - 1}")
    return layers[layer]


@contextlib.contextmanager
def _adding(target: nn.Module, delta: torch.Tensor) -> Iterator[None]:
    """`delta` added to the input hidden states of `target` (gradients flow into `delta` if it has any)."""
    def hook(module, args, kwargs):
        if args:
            return (args[0] + delta.to(args[0].dtype), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] + delta.to(kwargs["hidden_states"].dtype)
        return args, kwargs

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- choosing L and alpha


@dataclass(frozen=True)
class SteerSettings:
    """The search space and budget of the steering baseline (part of `EvalConfig`)."""

    layers: tuple[float, ...] = (0.25, 0.4, 0.55, 0.7)  # fractions of depth (or ints >= 1: layer indices)
    alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # tried in increasing order per layer
    budget: float = 1.10  # max general-text perplexity ratio (validation windows) of either direction
    halvings: int = 6  # when no grid setting is within budget: the smallest alpha halved up to this many times
    refine: int = 0  # bisections per layer between its largest alpha within budget and the next one over it

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "alphas", tuple(sorted(float(a) for a in self.alphas)))
        if not self.layers or not self.alphas:
            raise ValueError("steering needs at least one layer and one alpha")
        if any(a <= 0 for a in self.alphas):
            raise ValueError(f"steering alphas must be > 0, got {self.alphas}")
        if self.budget <= 1.0:
            raise ValueError(f"steering perplexity budget must be > 1, got {self.budget}")
        for name in ("halvings", "refine"):
            if getattr(self, name) < 0:
                raise ValueError(f"steering {name} must be >= 0, got {getattr(self, name)}")

    def layer_indices(self, n_layers: int) -> list[int]:
        out = []
        for x in self.layers:
            i = int(x) if float(x) >= 1 else int(round(float(x) * n_layers))
            if not 0 <= i < n_layers:
                raise ValueError(f"steering layer {x} outside 0..{n_layers - 1}")
            out.append(i)
        return list(dict.fromkeys(out))


@dataclass
class SteerChoice:
    layer: int
    alpha: float
    separation: float  # on the validation split
    ppl_ratio: float  # the larger of the two directions, on validation windows
    tried: list[dict] = field(default_factory=list)
    within_budget: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def choose(n_layers: int, settings: SteerSettings,
           evaluate: Callable[[int, float], tuple[float, float]]) -> SteerChoice:
    """The (layer, alpha) with the largest validation separation within the perplexity budget.

    `evaluate(layer, alpha)` returns (validation separation, perplexity ratio) of that setting;
    it is the only thing that looks at data, so the choice depends on nothing else.
    When no setting of the grid is within budget, each layer's smallest alpha is halved (up to
    ``settings.halvings`` times) until it is: the baseline is held to the budget at the strength
    it can afford there, never compared at a perplexity the mask was refused. Only when even that
    fails is the smallest alpha at the layer with the lowest perplexity ratio returned, with
    ``within_budget=False`` (and a warning). With ``settings.refine`` > 0, every layer whose climb
    stopped between an alpha within budget and one over it bisects that gap ``refine`` times (the
    grid's steps are coarse: x2 for plain steering), so the baseline reaches the budget's edge.
    """
    tried: list[dict] = []
    best: SteerChoice | None = None

    def trial(layer: int, alpha: float) -> bool:
        nonlocal best
        sep, ratio = evaluate(layer, alpha)
        ok = ratio <= settings.budget
        tried.append({"layer": layer, "alpha": alpha, "separation": sep, "ppl_ratio": ratio, "ok": ok})
        if ok and (best is None or sep > best.separation):
            best = SteerChoice(layer, alpha, sep, ratio)
        return ok

    layers = settings.layer_indices(n_layers)
    bounds: dict[int, tuple[float, float]] = {}  # layer -> (largest alpha within budget, next alpha over it)
    for layer in layers:
        below = None
        for alpha in settings.alphas:
            if not trial(layer, alpha):
                if below is not None:
                    bounds[layer] = (below, alpha)
                break  # larger alphas only move the residual stream further
            below = alpha
    if best is None:
        for layer in layers:
            alpha = settings.alphas[0]
            for _ in range(settings.halvings):
                alpha /= 2
                if trial(layer, alpha):
                    bounds[layer] = (alpha, alpha * 2)
                    break  # the largest halved alpha within budget at this layer
        if best is not None:
            log.info("steering: no grid setting within the perplexity budget x%.2f; alpha halved to %g at layer %d",
                     settings.budget, best.alpha, best.layer)
    for layer, (lo, hi) in bounds.items():  # the strongest alpha the budget allows, to 2^-refine of the gap
        for _ in range(settings.refine):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if trial(layer, mid) else (lo, mid)
    if best is None:
        first = [t for t in tried if t["alpha"] == settings.alphas[0]]
        t = min(first, key=lambda t: t["ppl_ratio"])
        log.warning("steering: no setting within the perplexity budget x%.2f (best x%.3f at layer %d alpha %g)",
                    settings.budget, t["ppl_ratio"], t["layer"], t["alpha"])
        best = SteerChoice(t["layer"], t["alpha"], t["separation"], t["ppl_ratio"], within_budget=False)
    best.tried = tried
    return best


def layers_of(model: nn.Module) -> int:
    return len(decoder_layers(model)[1])


# ---------------------------------------------------------------------------- the learned steering vector


@dataclass(frozen=True)
class LearnedSteer:
    """How ``dense+steer-learned`` learns its vector: the contrastive objective of the learned masks
    (`persona_core.eval.objective`), Adam on one residual-stream vector per pair and layer.

    The vector starts at zero; pole A is steered by +v and pole B by -v, and the step minimises the
    sum of both poles' losses (margin on training statements + `general_weight` x general-text KL).
    `lr` is in units of the dense residual stream's RMS at that layer (scale-free across models).
    `alphas` scale the learned vector when the budget search picks (layer, alpha).
    """

    steps: int = 24
    lr: float = 0.05
    batch: int = 12
    general_weight: float = 1.0
    general_batch: int = 2
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5)
    seed: int = 0


def residual_rms(model: nn.Module, layer: int, seqs: Sequence[Sequence[int]], pad: int) -> float:
    """RMS of the dense residual stream entering `layer` over the tokens of `seqs` (no padding counted)."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().float())

    device = next(model.parameters()).device
    ids, att = pad_sequences(seqs, pad, device)
    handle = _layer(model, layer).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=att, use_cache=False)
    finally:
        handle.remove()
    h = seen[0][att.bool()]
    return float(h.pow(2).mean().sqrt()) or 1.0


def learn_vector(model: nn.Module, layer: int, objectives, knobs: LearnedSteer, scale: float,
                 name: str = "dense+steer-learned") -> tuple[torch.Tensor, list[dict]]:
    """(the learned vector [hidden] float64, per-step figures): +v for pole A's objective, -v for B's."""
    target = _layer(model, layer)
    ref = next(target.parameters())
    width = model.get_input_embeddings().weight.shape[1]
    v = torch.zeros(width, dtype=torch.float64, device=ref.device)
    m, s2 = torch.zeros_like(v), torch.zeros_like(v)
    history = []
    for step in range(knobs.steps):
        vv = v.detach().requires_grad_(True)
        total, info = None, {"step": step + 1}
        for side, sign in ((0, 1.0), (1, -1.0)):
            with _adding(target, (sign * vv).to(ref.dtype)):
                loss, figures = objectives[side](model, step, side)
            total = loss if total is None else total + loss
            info.update({f"{k}_{side}": x for k, x in figures.items()})
        if not torch.isfinite(total.detach()):
            raise FloatingPointError(f"{name} learner at layer {layer}: the loss is not finite at step {step + 1} "
                                     f"({info}); lower its lr (now {knobs.lr:g})")
        (g,) = torch.autograd.grad(total, vv)
        adam_step(v, g.detach().to(v.dtype), m, s2, step + 1, knobs.lr * scale)
        history.append(info)
    return v.detach().cpu(), history


__all__: Sequence[str] = ("LearnedSteer", "MissingResidualStats", "SteerChoice", "SteerSettings", "choose",
                          "learn_vector", "residual_means", "residual_rms", "steer", "steering_vectors", "layers_of")
