"""The real callables of a budget search, and the budgeted build of one unit.

`PairSearch` binds one loaded model, one mask method and one persona (or opposing pair)
to the two functions `persona_core.masks.budget.search` needs:

* ``perplexity_ratio(setting)``: masked/dense perplexity on a fixed number of windows of
  the budget's *validation* text (WikiText-2 ``valid.txt`` by default); for a pair, the
  larger of the two sides.
* ``separation(setting)``: the statement-preference gain over the dense model on a
  *validation split of the calibration statements* of the persona and its opposite, summed
  over the sides (for a pair, exactly the pair separation of the report on that split).

Validation statements are held out of the statistics too: the search builds its masks
from the stored statistics minus the validation statements' own contribution (statistics
are sums, so the subtraction is exact), so a setting is never judged on the texts its mask
was fitted to. The final mask is then built from the full statistics at the chosen setting
and its perplexity ratio is checked again (stepping down the grid if it went over).

Nothing here reads a persona's evaluation statements or a test split.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from persona_core.calib.config import CalibConfig
from persona_core.calib.general_text import GeneralTextError, load_general_text, resolve_general_text
from persona_core.calib.recorder import calibrate
from persona_core.calib.texts import render_reply
from persona_core.calib.parts import part_metadata
from persona_core.calib.stats import GroupStats, PersonaStats
from persona_core.calib.stored import list_parts
from persona_core.catalog.personas import Persona
from persona_core.eval.validation import (perplexity_ratio, text_windows, validation_separation,
                                          validation_statements, window_perplexity)
from persona_core.masks.budget import Budget, SearchResult, Setting, search
from persona_core.masks.build import build_pair_masks
from persona_core.masks.methods import METHODS
from persona_core.masks.spec import MaskSpec

log = logging.getLogger(__name__)

WIKITEXT_VALID = "wikitext-2-valid"  # the budget's default validation text (see persona_core.calib.general_text)


# ---------------------------------------------------------------------------- inputs


def resolve_validation_text(spec: str) -> str:
    """The source behind a budget's ``ppl_text``, resolved by `persona_core.calib.general_text` (``wikitext-2-valid``
    via $PERSONA_WIKITEXT2 or ../shared/data/wikitext-2, ``builtin:general``, a file, a URL or an ``hf:``
    dataset); `GeneralTextError` (a ValueError naming the spec) when it does not resolve: never a fallback."""
    try:
        return resolve_general_text(spec)
    except GeneralTextError as err:
        raise GeneralTextError(f"budget ppl_text: {err}") from None


def subtract(full: PersonaStats, part: dict) -> PersonaStats:
    """Statistics of `full` without the texts behind `part` (sums: exact up to float rounding)."""
    groups = {}
    for key, g in full.groups.items():
        p = part[key].to(g.sum.device)
        groups[key] = GroupStats(g.tokens - p.tokens, g.sum - p.sum, (g.sumsq - p.sumsq).clamp_min(0),
                                 (g.sumabs - p.sumabs).clamp_min(0), g.samples - p.samples,
                                 (g.norm_sum - p.norm_sum).clamp_min(0), (g.norm_sumsq - p.norm_sumsq).clamp_min(0))
        if groups[key].tokens <= 0:
            raise ValueError(f"persona {full.persona_id!r}: no calibration tokens left after holding out the "
                             "validation statements")
    return PersonaStats(full.model_key, full.persona_id, full.persona_hash, groups, full.calib_hash)


def stored_calib_config(store, model_key: str, stats: PersonaStats):
    """The `CalibConfig` the stored statistics were calibrated with (from a part's metadata), checked by hash."""
    for key in list_parts(store, model_key, stats.persona_id):
        meta = part_metadata(store, key)
        if meta.get("calib_hash") != stats.calib_hash:
            continue
        try:
            config = CalibConfig(**json.loads(meta.get("calib_config") or "{}"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{key}: unreadable calibration settings ({err})") from err
        if config.hash != stats.calib_hash:
            raise ValueError(f"{key}: its calibration settings hash to {config.hash}, not {stats.calib_hash} "
                             "(recorded by another version?); recalibrate")
        return config
    raise ValueError(f"no stored part of {stats.persona_id!r} records calibration settings {stats.calib_hash}")


# ---------------------------------------------------------------------------- the search of one unit


@dataclass
class BudgetOutcome:
    spec: MaskSpec  # the chosen setting, as a plain fixed-sparsity spec
    masks: tuple[dict[str, torch.Tensor], ...]  # one per side, from the full statistics
    result: SearchResult
    final_ratio: float  # perplexity ratio of the final masks (full statistics), validation windows
    seconds: float
    val_text: dict | None = None  # the validation text measured on (`GeneralText.record`)

    def metadata(self) -> dict:
        out = {"search": self.result.to_dict(), "final_perplexity_ratio": self.final_ratio,
               "search_seconds": round(self.seconds, 2)}
        if self.val_text is not None:
            out["val_text"] = self.val_text
        return out


class PairSearch:
    """Budget search for one unit: a spec's method, the personas behind its roles, their statistics.

    `evaluator`: a `persona_core.eval.engine.Evaluator` (its model is masked in place and always
    restored). `weights`: the dense linear weights (`LinearWeights`), never the evaluator's live ones.
    `roles`: ((role, Persona), ...) in the method's `needs` order; `stats`: the matching statistics.
    `opposite`: the persona whose statements a one-sided per-persona method is contrasted with.
    """

    def __init__(self, evaluator, weights, spec: MaskSpec, budget: Budget | None, roles: Sequence[tuple[str, Persona]],
                 stats: Sequence[PersonaStats], opposite: Persona | None = None, calib_config=None):
        budget = budget or spec.budget
        if budget is None:
            raise ValueError(f"budget search for {spec.method!r}: no budget given")
        self.ev, self.weights, self.spec, self.budget = evaluator, weights, spec, budget
        self.method = METHODS[spec.method]
        self.roles, self.full_stats = list(roles), list(stats)
        self.calib = calib_config or CalibConfig()
        self.evaluator_restore()
        self.val_source = resolve_validation_text(budget.ppl_text)
        self.val_text = load_general_text(budget.ppl_text).record()  # stored with the mask: what it was chosen on
        self._windows = text_windows(evaluator.tokenizer, self.val_source, budget.ppl_window, budget.ppl_windows)
        self.dense_ppl = window_perplexity(evaluator, self._windows)
        # sides: the personas whose masks the method builds (persona, then opposite for a pair)
        by_role = dict(self.roles)
        self.sides = [by_role["persona"], by_role["opposite"]] if self.method.sides == 2 else (
            [by_role["persona"]] if self.method.per_persona else [])
        self.pair: tuple[Persona, Persona] | None = None  # (A, B) whose validation separation is maximised
        if self.sides:
            b = self.sides[1] if len(self.sides) == 2 else opposite
            if b is None:
                raise ValueError(f"budget search for {self.spec.method!r} on {self.sides[0].id!r}: separation needs "
                                 "an opposite persona with statements")
            self.pair = (self.sides[0], b)
        self.validation: dict[str, list[str]] = {}
        if self.pair:
            a, b = self.pair
            for p in (a, b):
                if p.generate or len(p.calibration) < 2:
                    raise ValueError(f"budget search: persona {p.id!r} has {len(p.calibration)} calibration "
                                     "statement(s); validation needs at least 2 (personas given only by a "
                                     "description cannot be budgeted yet)")
            # at least one statement of each side stays in the statistics the searched masks are built from
            self.n_val = min(budget.val_statements, len(a.calibration) - 1, len(b.calibration) - 1)
            for p, other in ((a, b), (b, a)):
                self.validation[p.id] = validation_statements(p, self.n_val, budget.seed, exclude=other.evaluation)
        self.fit_stats = [self._held_out(s, p) for (role, p), s in zip(self.roles, self.full_stats)]
        self._cache: tuple[Setting, tuple] | None = None

    def evaluator_restore(self) -> None:
        self.ev.masks.restore()  # choices are measured against the dense model

    # -- pieces

    def _held_out(self, stats: PersonaStats, persona: Persona) -> PersonaStats:
        if persona.id not in self.validation or persona.id not in {p.id for p in self.sides}:
            return stats  # general reference statistics (or a persona whose stats the masks do not use)
        if stats.calib_hash and stats.calib_hash != self.calib.hash:
            raise ValueError(f"statistics of {persona.id!r} were calibrated with settings {stats.calib_hash} "
                             f"but the budget search holds out validation texts rendered with {self.calib.hash}")
        loaded = self.ev.loaded
        texts = [render_reply(loaded.tokenizer, t, self.calib, persona.description) for t in self.validation[persona.id]]
        with torch.inference_mode():
            part = {k: g.to("cpu") for k, g in calibrate(loaded, texts, self.calib).items()}
        return subtract(stats, part)

    def spec_at(self, setting: Setting) -> MaskSpec:
        return self.spec.with_setting(setting.sparsity, {self.strength_name: setting.strength}
                                      if setting.strength is not None else None)

    @property
    def strength_name(self) -> str | None:
        return self.method.strength[0] if self.method.strength else None

    def strengths(self) -> tuple:
        name = self.strength_name
        if name is None:
            return (None,)
        if self.budget.strengths and name in self.budget.strengths:
            return tuple(self.budget.strengths[name])
        if name in self.spec.params:  # the user fixed it: search sparsity only
            return (float(self.spec.params[name]),)
        return self.method.strength[1]

    def _masks(self, setting: Setting, stats=None) -> tuple:
        if self._cache is not None and self._cache[0] == setting and stats is None:
            return self._cache[1]
        masks = build_pair_masks(self.weights, *(stats or self.fit_stats), spec=self.spec_at(setting))
        if stats is None:
            self._cache = (setting, masks)
        return masks

    def _state(self, masks: dict) -> Callable:
        return lambda: self.ev.masked(masks)

    # -- the two callables

    def perplexity_ratio(self, setting: Setting, limit: float | None = None) -> float:
        """The larger ratio of the setting's masks; with `limit`, stops after a mask already over it
        (the figure is then that mask's ratio: enough to know the setting is over budget)."""
        return self._ratio(self._masks(setting), limit)

    @property
    def windows(self) -> list[list[int]]:
        """The validation windows the budget's perplexity is measured on (a learner keeps its own out of them)."""
        return self._windows

    def ratio(self, masks: tuple, limit: float | None = None) -> float:
        """The larger validation perplexity ratio of `masks` (one per side), each against the dense model."""
        return self._ratio(masks, limit)

    def _ratio(self, masks: tuple, limit: float | None = None) -> float:
        worst = 0.0
        for m in masks:
            worst = max(worst, perplexity_ratio(self.ev, self._windows, self.dense_ppl, self._state(m)))
            if limit is not None and worst > limit:
                break
        return worst

    def separation(self, setting: Setting) -> float:
        """The pair's validation separation (for a one-sided method: the persona's side masked, the other dense)."""
        a, b = self.pair
        masks = self._masks(setting)
        state_b = self._state(masks[1]) if len(masks) == 2 else None
        return validation_separation(self.ev, a, b, self._state(masks[0]), state_b, n=self.n_val,
                                     seed=self.budget.seed)

    # -- the whole thing

    def run(self) -> BudgetOutcome:
        t0 = time.perf_counter()
        grid = self.budget.grid()
        result = search(grid, self.budget.perplexity_ratio, self.perplexity_ratio,
                        self.separation if self.pair else None, self.strengths(), self.strength_name)
        chosen = result.chosen
        final = self._masks(chosen, self.full_stats)
        ratio = self._ratio(final)
        # The full statistics move the mask a little: step down the grid until it is within budget again.
        while result.within_budget and ratio > self.budget.perplexity_ratio:
            i = grid.index(chosen.sparsity)
            if i == 0:
                result.within_budget = False
                result.message = (f"budget perplexity ratio <= {self.budget.perplexity_ratio:g}: the final mask "
                                  f"(all calibration statements) at the smallest sparsity {chosen.sparsity:g} costs "
                                  f"x{ratio:.3f}; over budget")
                log.warning(result.message)
                break
            log.warning("budget: the final mask at sparsity %g costs x%.4f > x%g; stepping down", chosen.sparsity,
                        ratio, self.budget.perplexity_ratio)
            chosen = result.chosen = Setting(grid[i - 1], chosen.strength)
            final = self._masks(chosen, self.full_stats)
            ratio = self._ratio(final)
        self.ev.masks.restore()
        return BudgetOutcome(self.spec_at(chosen), final, result, ratio, time.perf_counter() - t0, self.val_text)
