"""The ``dense+steer`` and ``dense+steer-learned`` conditions: a steering setting chosen per pair on
validation data, then scored.

The vectors and the search are `persona_core.eval.steering`'s; this module runs the search on
an evaluator (once per opposing pair, remembered in `Evaluator.steer_memo`) and scores the
condition with the chosen hook on. The choice reads only calibration statistics, validation
statements (carved from the calibration statements) and the validation general text
(`EvalConfig.val_text`).

``dense+steer-learned`` learns its vector instead (`persona_core.eval.steering.learn_vector`): per
pair and candidate layer (the `dense+steer` layers), Adam on one residual vector with the learned
masks' objective (`persona_core.eval.objective`) on the pair's calibration statements minus the
validation ones (a training statement equal to a validation or evaluation statement fails the run)
and the KL to the dense model on validation-text windows other than those the budget is measured
on; then (layer, alpha) is chosen with the same `choose` and budget as ``dense+steer``. It reads no
statistics.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from persona_core.calib.stats import PersonaStats
from persona_core.catalog import REFERENCE_PERSONA_ID, Persona
from persona_core.eval.config import EvalConfig
from persona_core.eval.engine import Evaluator
from persona_core.eval.scoring import score_condition
from persona_core.eval.objective import (Objective, StatementBatch, check_disjoint, general_examples, pad_id,
                                         training_statements)
from persona_core.eval.steering import (LearnedSteer, MissingResidualStats, SteerChoice, choose,
                                        layers_of, learn_vector, residual_rms, steer, steering_vectors)
from persona_core.eval.validation import (perplexity_ratio, statement_scores, text_windows,
                                          validation_separation, validation_statements, window_perplexity)

log = logging.getLogger(__name__)

# the rows that report the choice (condition dense+steer), besides the metrics' own
STEER_ROWS = ("steer-layer", "steer-alpha", "steer-val-separation", "steer-val-ppl-ratio", "steer-within-budget")
LEARNED = "dense+steer-learned"
LEARNED_STEER = LearnedSteer()  # its knobs (docs/evaluation.md)


def _stats_ident(stats: dict[str, PersonaStats] | None) -> tuple:
    """What identifies the statistics a steering choice was made on (per persona: hashes, tokens, groups)."""
    return tuple(sorted((pid, s.persona_hash, s.calib_hash, s.tokens, len(s.groups))
                        for pid, s in (stats or {}).items()))


def steering_choice(ev: Evaluator, persona: Persona, opposite: Persona | None, config: EvalConfig,
                    stats: dict[str, PersonaStats] | None) -> tuple[dict[int, torch.Tensor], SteerChoice]:
    """(this persona's steering vectors, the pair's `SteerChoice`), chosen once per pair."""
    ref_id = opposite.id if opposite is not None else REFERENCE_PERSONA_ID
    missing = [pid for pid in (persona.id, ref_id) if not stats or pid not in stats]
    if missing:
        raise MissingResidualStats(
            f"dense+steer for {persona.id!r} needs the calibration statistics (with the residual group) of "
            f"{', '.join(repr(m) for m in missing)}: calibrate them (the evaluate job reads them from the store)")
    if opposite is not None:
        a, b = sorted([persona, opposite], key=lambda p: p.id)
    else:
        a, b = persona, None
    ident = (a.id, b.id if b else REFERENCE_PERSONA_ID, _stats_ident(stats), config.hash)
    if ident not in ev.steer_memo:
        va = steering_vectors(stats[a.id], stats[b.id if b else REFERENCE_PERSONA_ID])
        windows = text_windows(ev.tokenizer, config.val_text or "builtin:general", config.val_window,
                               config.val_windows)
        ev.masks.restore()  # choices are made on the dense model
        reference = window_perplexity(ev, windows)
        settings = config.steer_settings
        if b is not None:
            def evaluate(layer: int, alpha: float) -> tuple[float, float]:
                plus = lambda: steer(ev.model, layer, va[layer], alpha)  # noqa: E731
                minus = lambda: steer(ev.model, layer, -va[layer], alpha)  # noqa: E731
                sep = validation_separation(ev, a, b, plus, minus, n=config.val_statements, seed=config.seed)
                ratio = max(perplexity_ratio(ev, windows, reference, plus),
                            perplexity_ratio(ev, windows, reference, minus))
                return sep, ratio
        else:  # no opposite: the gain in mean log-prob of the persona's own validation statements
            val = validation_statements(a, config.val_statements, config.seed)
            base = sum(statement_scores(ev, val)) / max(len(val), 1)

            def evaluate(layer: int, alpha: float) -> tuple[float, float]:
                with steer(ev.model, layer, va[layer], alpha):
                    gain = sum(statement_scores(ev, val)) / max(len(val), 1) - base
                return gain, perplexity_ratio(ev, windows, reference,
                                              lambda: steer(ev.model, layer, va[layer], alpha))
        choice = choose(layers_of(ev.model), settings, evaluate)
        log.info("steering %s/%s: layer %d alpha %g (validation separation %.3f, ppl x%.3f)", a.id,
                 b.id if b else REFERENCE_PERSONA_ID, choice.layer, choice.alpha, choice.separation, choice.ppl_ratio)
        ev.steer_memo[ident] = (va, choice)
    va, choice = ev.steer_memo[ident]
    sign = 1.0 if persona.id == a.id else -1.0
    return {k: sign * v for k, v in va.items()}, choice


def learned_choice(ev: Evaluator, persona: Persona, opposite: Persona | None, config: EvalConfig,
                   knobs: LearnedSteer = LEARNED_STEER) -> tuple[dict[int, torch.Tensor], SteerChoice]:
    """(this persona's learned vectors per candidate layer, the pair's `SteerChoice`), learned once per pair."""
    if opposite is None:
        raise ValueError(f"{LEARNED} for {persona.id!r}: the learned vector needs an opposing persona (its objective "
                         "is the margin over the opposite's statements)")
    a, b = sorted([persona, opposite], key=lambda p: p.id)
    ident = (LEARNED, a.id, b.id, a.content_hash, b.content_hash, a.evaluation_hash, b.evaluation_hash, config.hash,
             knobs)
    if ident not in ev.steer_memo:
        ev.masks.restore()  # learned and chosen on the dense model
        n = config.val_statements
        val = {a.id: validation_statements(a, n, config.seed, exclude=b.evaluation),
               b.id: validation_statements(b, n, config.seed, exclude=a.evaluation)}
        check_disjoint([*val[a.id], *val[b.id]], [*a.evaluation, *b.evaluation],
                       f"{LEARNED} validation statements of {a.id}/{b.id}")
        held = [*val[a.id], *val[b.id], *a.evaluation, *b.evaluation]
        train = {p.id: training_statements(p, val[p.id], held, LEARNED) for p in (a, b)}  # as learned-contrastive
        source = config.val_text or "builtin:general"
        windows = text_windows(ev.tokenizer, source, config.val_window, config.val_windows)
        taken = {tuple(w) for w in windows}
        pool = text_windows(ev.tokenizer, source, config.val_window, config.val_windows + 32)
        general = general_examples(ev.model, ev.tokenizer, [w for w in pool if tuple(w) not in taken][:16])
        pad = pad_id(ev.tokenizer)
        sa, sb = StatementBatch.of(ev, train[a.id]), StatementBatch.of(ev, train[b.id])
        common = dict(general=general, batch=knobs.batch, general_batch=knobs.general_batch,
                      general_weight=knobs.general_weight, seed=knobs.seed, pad=pad)
        objectives = (Objective(sa, sb, **common), Objective(sb, sa, **common))
        reference = window_perplexity(ev, windows)
        settings = config.steer_settings
        vectors: dict[int, torch.Tensor] = {}
        for layer in settings.layer_indices(layers_of(ev.model)):
            seqs = [sa.prefix + sa.statements[i] for i in range(min(len(sa), 16))]
            scale = residual_rms(ev.model, layer, seqs, pad)
            vectors[layer], _ = learn_vector(ev.model, layer, objectives, knobs, scale, f"{LEARNED} {a.id}/{b.id}")

        def evaluate(layer: int, alpha: float) -> tuple[float, float]:
            plus = lambda: steer(ev.model, layer, vectors[layer], alpha)  # noqa: E731
            minus = lambda: steer(ev.model, layer, -vectors[layer], alpha)  # noqa: E731
            sep = validation_separation(ev, a, b, plus, minus, n=n, seed=config.seed)
            ratio = max(perplexity_ratio(ev, windows, reference, plus), perplexity_ratio(ev, windows, reference, minus))
            return sep, ratio

        choice = choose(layers_of(ev.model), replace(settings, alphas=knobs.alphas), evaluate)
        log.info("%s %s/%s: layer %d alpha %g (validation separation %.3f, ppl x%.3f)", LEARNED, a.id, b.id,
                 choice.layer, choice.alpha, choice.separation, choice.ppl_ratio)
        ev.steer_memo[ident] = (vectors, choice)
    vectors, choice = ev.steer_memo[ident]
    sign = 1.0 if persona.id == a.id else -1.0
    return {k: sign * v for k, v in vectors.items()}, choice


def steered_rows(ev: Evaluator, persona: Persona, opposite: Persona | None, config: EvalConfig,
                 prepared: dict[str, Any], stats: dict[str, PersonaStats] | None,
                 condition: str = "dense+steer") -> list[dict[str, Any]]:
    """The rows of a steered condition (``dense+steer`` or ``dense+steer-learned``): the metrics with the
    chosen hook on, then the choice (`STEER_ROWS`)."""
    if condition == LEARNED:
        vectors, choice = learned_choice(ev, persona, opposite, config)
    elif condition == "dense+steer":
        vectors, choice = steering_choice(ev, persona, opposite, config, stats)
    else:
        raise ValueError(f"no steering for condition {condition!r}")
    with steer(ev.model, choice.layer, vectors[choice.layer], choice.alpha):
        rows = score_condition(ev, persona, opposite, condition, config, prepared, ev.timings)
    figures = (choice.layer, choice.alpha, choice.separation, choice.ppl_ratio, float(choice.within_budget))
    return rows + [{"condition": condition, "metric": k, "value": float(v), "n": len(choice.tried),
                    "stderr": float("nan"), "items": None, "items_own": 0, "texts": None}
                   for k, v in zip(STEER_ROWS, figures)]
