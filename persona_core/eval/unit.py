"""Scoring one (persona, mask) unit: `evaluate_unit`, one result row per (condition, metric).

Dense conditions are computed once per persona (`dense_state`, remembered in the evaluator's
`dense_memo`, and across runs in the store's `DenseRowCache`) and repeated in every unit's
rows, so each unit's table is self-contained. Masked conditions apply the mask in place and
restore the dense weights afterwards (bit-exact). A budgeted mask adds the choice its budget
search made (`budget_rows`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch

from persona_core.calib.stats import PersonaStats
from persona_core.catalog import Persona
from persona_core.eval.conditions import CONDITIONS, DENSE_CONDITIONS
from persona_core.eval.config import EvalConfig
from persona_core.eval.dense_cache import DenseRowCache, dense_ident
from persona_core.eval.engine import Evaluator
from persona_core.eval.fewshot import choose_k
from persona_core.eval.masked import mask_content_hash
from persona_core.eval.schema import DENSE_METHOD, result_table
from persona_core.eval.scoring import prepare_metrics, score_condition
from persona_core.eval.steered import steered_rows
from persona_core.versions import EVALUATE_VERSION

Rows = list[dict[str, Any]]


def dense_state(ev: Evaluator, persona: Persona, opposite: Persona | None, config: EvalConfig,
                stats: dict[str, PersonaStats] | None = None,
                rows_cache: DenseRowCache | None = None) -> tuple[dict[str, Any], Rows]:
    """Per-persona work done once with the dense weights: metric preparation and dense rows.

    `stats` (persona id -> `PersonaStats`, holding the persona and its opposite, or
    ``general`` for a persona without one) is needed by ``dense+steer`` only. `rows_cache`
    (a `DenseRowCache`) keeps the dense rows across runs: found there, they are not recomputed.
    """
    ident = dense_ident(ev.model_key, persona, opposite, config, stats, ev.numerics)
    memo = (ident, config.hash)  # the full config: whether masked conditions need `prepared`
    if memo not in ev.dense_memo:
        ev.masks.restore()  # a unit may have left its mask applied (restore=False)
        rows = rows_cache.get(ident, persona, opposite, config) if rows_cache is not None else None
        prepared: dict[str, Any] = {}
        if rows is None or any(c not in DENSE_CONDITIONS for c in config.conditions):
            prepared = prepare_metrics(ev, persona, opposite, config)
        if rows is None:
            rows = []
            for cond in DENSE_CONDITIONS:
                if cond not in config.conditions:
                    continue
                if CONDITIONS[cond].steered:
                    rows += steered_rows(ev, persona, opposite, config, prepared, stats, cond)
                else:
                    rows += score_condition(ev, persona, opposite, cond, config, prepared, ev.timings)
            if rows_cache is not None:
                rows_cache.put(ident, persona, opposite, config, rows)
        ev.dense_memo[memo] = (prepared, rows)
    return ev.dense_memo[memo]


def _meta(mask_meta: dict | None, masks: dict | None) -> tuple[str, float, str, str]:
    meta = dict(mask_meta or {})
    if masks is None:
        return DENSE_METHOD, 0.0, "", ""
    method = str(meta.get("method") or "unknown")
    sparsity = float(meta.get("sparsity") or 0.0)
    granularity = str(meta.get("granularity") or "unstructured")
    mhash = next((str(meta[k]) for k in ("content_hash", "mask_hash", "hash") if meta.get(k)), None)
    return method, sparsity, granularity, mhash or mask_content_hash(masks)


def evaluate_unit(evaluator: Evaluator, persona: Persona, opposite: Persona | None,
                  masks: dict[str, torch.Tensor] | None, mask_meta: dict | None,
                  config: EvalConfig, *, restore: bool = True, stats: dict[str, PersonaStats] | None = None,
                  rows_cache: DenseRowCache | None = None) -> pa.Table:
    """Score one (persona, mask) unit: one row per (condition, metric).

    `stats` (persona id -> `PersonaStats` of the persona and its opposite, or of
    ``general``) feeds ``dense+steer``; other conditions never read it.

    `masks=None` scores the dense conditions only (method ``dense``). Dense rows
    come from the evaluator's per-persona cache (and from `rows_cache`, the store's,
    across runs); masked conditions apply the
    mask in place and restore the dense weights afterwards. ``restore=False``
    leaves the mask applied for a loop over many masks: the next mask is written
    straight over it from the dense snapshot, and the dense weights come back
    (bit-exact) whenever they are next needed or on `evaluator.masks.restore()`.
    """
    evaluator.configure(config)
    method, sparsity, granularity, mhash = _meta(mask_meta, masks)
    prepared, dense_rows = dense_state(evaluator, persona, opposite, config, stats, rows_cache)
    rows = list(dense_rows)
    masked_conds = [c for c in config.conditions if c not in DENSE_CONDITIONS]
    if masks is not None and masked_conds:
        if any(CONDITIONS[c].prompt == "fewshot" for c in masked_conds):
            choose_k(evaluator, persona, opposite, config)  # on the dense model, before the mask goes on
        evaluator.masks.apply(masks)
        try:
            for cond in masked_conds:
                rows += score_condition(evaluator, persona, opposite, cond, config, prepared, evaluator.timings)
        finally:
            if restore:
                evaluator.masks.restore()
    rows += budget_rows(mask_meta)
    unit = {"model": evaluator.model_key, "persona": persona.id, "opposite": opposite.id if opposite else "",
            "method": method, "sparsity": sparsity, "granularity": granularity, "mask_hash": mhash,
            "config_hash": config.hash, "eval_hash": persona.evaluation_hash, "code_version": EVALUATE_VERSION}
    return result_table(unit, rows)


def budget_rows(mask_meta: dict | None) -> Rows:
    """A budgeted mask's choice as result rows (condition ``masked``): the chosen sparsity and strength,
    and the validation figures the search saw (``budget-*`` metrics; see persona_core.masks.budget)."""
    search = ((mask_meta or {}).get("budget_search") or {}).get("search")
    if not search:
        return []
    chosen = search["chosen"]
    figures = {"budget-sparsity": chosen["sparsity"], "budget-strength": chosen["strength"],
               "budget-val-ppl-ratio": mask_meta["budget_search"].get("final_perplexity_ratio"),
               "budget-val-separation": chosen["separation"], "budget-within": float(bool(search["within_budget"])),
               "budget-points": len(search["points"])}
    return [{"condition": "masked", "metric": k, "value": float("nan") if v is None else float(v), "n": 1,
             "stderr": float("nan")} for k, v in figures.items()]
