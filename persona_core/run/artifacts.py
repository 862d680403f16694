"""What a finished run depends on in the store, recorded in its manifest and checked before "nothing changed".

A run's id hashes its inputs, so a rerun (or a nightly over an unchanged catalog) finds its
manifest and does no model work. That is only true while the artifacts the run produced are
still there: another run of other inputs may have removed statistics (stale-part cleanup) or
rebuilt the masks of a persona under the same keys. So the manifest of a successful run names
every artifact it depends on (`run_artifacts`), each with what it must still be:

* statistics parts (the plan's calibration units): present, and their footer names the model and
  persona of their key (their file name already hashes what produced them);
* masks (those the evaluation scores, or would score): the content digest and build identity
  their header held;
* result parts (the run's results index): the digest of their rows, read back and verified;
* the results index and the report: present.

`artifact_problems` checks them (headers and footers only, except the small result parts); a
run with any problem is run again, and its stages regenerate exactly what is missing or changed.
A manifest written before manifests named their artifacts is checked on its statistics parts.
The reads of every byte of every artifact stay `--repair`'s (`persona_core.run.execution.repair`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from persona_core.calib.parts import StatsError, check_owner, check_schema, footer_schema
from persona_core.catalog import reference_persona
from persona_core.eval.result_parts import result_part_digest
from persona_core.masks.budget import Budget
from persona_core.masks.spec import budget_segment
from persona_core.report.results import read_results_index
from persona_core.run.plan import Plan
from persona_core.run.runs import Manifest
from persona_core.run.units import calibration_units, chosen_masks, mask_version, persona_masks
from persona_core.store import layout
from persona_core.store.store import Store, StoreError

log = logging.getLogger(__name__)

STATS_PART = "stats-part"  # the expectation recorded for a statistics part (its key names its content)
PRESENT = "present"  # the expectation recorded for an artifact that only has to exist


@dataclass(frozen=True)
class MaskChoice:
    """Which stored masks an evaluation scores, for which personas (None: every one found)."""

    methods: list[str] | None
    sparsities: list[float] | None
    personas: list[str] | None
    budgets: list[str] | None  # budget segments of budgeted masks
    calib_hash: str | None  # the calibration config the masks come from (None: the only one stored)


def mask_choice(plan: Plan) -> MaskChoice:
    """The pipeline's own masks (methods, learned ones, sparsities or budget, its calibration config);
    a standalone command's as named."""
    named = plan.selection
    if named is not None:
        def as_list(v):
            return list(v) if v else None
        return MaskChoice(as_list(named.methods), as_list(named.sparsities), as_list(named.personas), None,
                          named.calib_hash)
    m = plan.config.masks
    budgeted = m.budget is not None
    return MaskChoice(list(m.methods) + m.learned.methods(), [] if budgeted else list(m.sparsities),
                      plan.persona_ids, [budget_segment(Budget.from_value(m.budget))] if budgeted else None,
                      plan.calib.hash)


def _stats_keys(p: Plan) -> list[str]:
    personas = list(p.catalog) + ([reference_persona()] if p.config.calibrate.include_general else [])
    return [u.key for u in calibration_units(personas, p.model_key, p.calib, p.config.calibrate.shard_size)]


def _mask_expectation(store: Store, key: str) -> str:
    v = mask_version(store, key)
    return f"{v.digest}:{v.identity}"


def run_artifacts(p: Plan) -> dict[str, str]:
    """Every artifact the plan's finished run depends on (store key -> what it must still be)."""
    out = {k: STATS_PART for k in _stats_keys(p)}
    c = mask_choice(p)
    chosen = chosen_masks(p.store, p.model_key, c.methods, c.sparsities, c.budgets, c.calib_hash)
    for pid in p.persona_ids:
        for ref in persona_masks(chosen, pid):
            out.setdefault(ref.key, _mask_expectation(p.store, ref.key))
    if p.config.evaluate.enabled:
        out.update(read_results_index(p.store, p.run_id) or {})
        for key in (layout.results_index(p.run_id), layout.report(p.run_id)):
            out[key] = PRESENT
    return out


def artifact_problems(p: Plan, manifest: Manifest) -> list[str]:
    """What is missing or changed among the artifacts the run's manifest names (``key: why``); a
    manifest from before manifests named them: its statistics parts."""
    named = manifest.artifacts if manifest.artifacts is not None else {k: STATS_PART for k in _stats_keys(p)}
    problems = []
    for key, want in sorted(named.items()):
        why = _problem(p.store, key, want)
        if why:
            problems.append(f"{p.store.uri(key)}: {why}")
    return problems


def _problem(store: Store, key: str, want: str) -> str:
    try:
        if want == STATS_PART:
            check_owner(key, check_schema(footer_schema(store, key), store.uri(key)), store.uri(key))
        elif layout.parse_mask(key) is not None:
            got = _mask_expectation(store, key)
            if got != want:
                return "missing or unreadable" if got.startswith(":") else \
                    "rebuilt since the run (another version of its personas or config)"
        elif layout.parse_result_part(key) is not None:
            if result_part_digest(store, key) != want:
                return "holds other rows than the run's"
        elif not store.exists(key):
            return "missing"
        return ""
    except FileNotFoundError:
        return "missing"
    except (StatsError, StoreError, ValueError, OSError) as err:
        return f"unreadable ({err})"


def regenerating(run_id: str, problems: list[str], shown: int = 3) -> str:
    """The line that says why a completed run runs again."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return (f"run {run_id}: completed earlier, but {len(problems)} of the artifacts its manifest names are "
            f"missing or changed ({'; '.join(problems[:shown])}{more}); running it again to regenerate them")
