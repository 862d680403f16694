"""The ``dense+steer`` condition: a steering setting chosen per pair on validation data, then scored.

The vectors and the search are `persona_core.eval.steering`'s; this module runs the search on
an evaluator (once per opposing pair, remembered in `Evaluator.steer_memo`) and scores the
condition with the chosen hook on. The choice reads only calibration statistics, validation
statements (carved from the calibration statements) and the validation general text
(`EvalConfig.val_text`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from persona_core.calib.stats import PersonaStats
from persona_core.catalog import REFERENCE_PERSONA_ID, Persona
from persona_core.eval.config import EvalConfig
from persona_core.eval.engine import Evaluator
from persona_core.eval.scoring import score_condition
from persona_core.eval.steering import MissingResidualStats, SteerChoice, choose, layers_of, steer, steering_vectors
from persona_core.eval.validation import (perplexity_ratio, statement_scores, text_windows, validation_separation,
                                          validation_statements, window_perplexity)

log = logging.getLogger(__name__)

# the rows that report the choice (condition dense+steer), besides the metrics' own
STEER_ROWS = ("steer-layer", "steer-alpha", "steer-val-separation", "steer-val-ppl-ratio", "steer-within-budget")


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


def steered_rows(ev: Evaluator, persona: Persona, opposite: Persona | None, config: EvalConfig,
                 prepared: dict[str, Any], stats: dict[str, PersonaStats] | None) -> list[dict[str, Any]]:
    """The ``dense+steer`` rows: the metrics with the chosen hook on, then the choice (`STEER_ROWS`)."""
    vectors, choice = steering_choice(ev, persona, opposite, config, stats)
    with steer(ev.model, choice.layer, vectors[choice.layer], choice.alpha):
        rows = score_condition(ev, persona, opposite, "dense+steer", config, prepared, ev.timings)
    figures = (choice.layer, choice.alpha, choice.separation, choice.ppl_ratio, float(choice.within_budget))
    return rows + [{"condition": "dense+steer", "metric": k, "value": float(v), "n": len(choice.tried),
                    "stderr": float("nan"), "items": None, "items_own": 0, "texts": None}
                   for k, v in zip(STEER_ROWS, figures)]
