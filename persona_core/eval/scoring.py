"""Scoring one condition: every configured metric, as result rows, under the model's current state.

Written against `persona_core.eval.scorer.Scorer`: the caller puts the model in the condition's
state (a mask applied, a steering hook on) and these functions read the condition's prompt from
its registry entry (`persona_core.eval.conditions`).
"""

from __future__ import annotations

import time
from typing import Any

from persona_core.catalog import Persona
from persona_core.eval.conditions import CONDITIONS
from persona_core.eval.config import EvalConfig
from persona_core.eval.fewshot import choose_k
from persona_core.eval.metrics import METRICS, MetricContext, Score
from persona_core.eval.scorer import Scorer


def score_row(condition: str, metric: str, score: Score) -> dict[str, Any]:
    """One scored row of the result table (`persona_core.eval.schema.ROW_COLUMNS`)."""
    return {"condition": condition, "metric": metric, "value": float(score.value), "n": int(score.n),
            "stderr": float(score.stderr), "items": list(score.items) if score.items is not None else None,
            "items_own": int(score.split), "texts": list(score.texts) if score.texts is not None else None}


def prepare_metrics(ev: Scorer, persona: Persona, opposite: Persona | None, config: EvalConfig) -> dict[str, Any]:
    """What each configured metric prepares once per persona (dense weights, no prompt), by metric name."""
    return {name: METRICS[name].prepare(MetricContext(ev, persona, opposite, None, config, None))
            for name in config.metrics if METRICS[name].prepare is not None}


def score_condition(ev: Scorer, persona: Persona, opposite: Persona | None, condition: str, config: EvalConfig,
                    prepared: dict[str, Any], timings: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Rows (metric, value, n, stderr, items) of every configured metric under the current weights
    (and hooks); the condition decides the system prompt. Seconds per metric add up in `timings`."""
    cond = CONDITIONS[condition]
    system = cond.system(persona)
    choice = choose_k(ev, persona, opposite, config, may_compute=not cond.masked) if cond.prompt == "fewshot" \
        else None
    fewshot = cond.fewshot(persona, opposite, choice.k if choice else config.fewshot_k, config.seed)
    rows = [] if choice is None or cond.masked else [{"condition": condition, **r} for r in choice.rows()]
    for name in config.metrics:
        t0 = time.perf_counter()
        ctx = MetricContext(ev, persona, opposite, system, config, prepared.get(name), fewshot)
        rows += [score_row(condition, sub, score) for sub, score in METRICS[name].fn(ctx).items()]
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    return rows
