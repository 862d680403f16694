"""Code versions: the one home of every version that goes into a content hash.

Every artifact in the store is keyed by a content hash of what produced it, and each hash starts
with the version of the code that computed it. Bumping a version here makes every key hashed with
it new: reruns compute those artifacts again (the old ones stay in the store, unread). Bump one when
its code changes a number it writes, never for a refactor; the values are part of the store's
layout (`tests/test_store_compat.py` reads a store written before).
"""

from __future__ import annotations

# Persona content and evaluation hashes (`catalog.personas.Persona`): bumping it invalidates every
# statistics part, mask, learned mask and result row derived from any persona.
PERSONA_FORMAT_VERSION = 1

# Calibration config hash (`calib.config.CalibConfig.hash`, the ``calib=`` segment of stats and
# mask keys): bumping it invalidates every statistics part and every mask built from one.
CALIB_VERSION = "calib-v1"

# Statistics part keys (`calib.parts.part_key`) and their ``code_version`` column: bumping it
# invalidates the statistics parts (and so calibration reruns).
STATS_VERSION = "stats-v1"

# Capability budget hash (`masks.budget.Budget.hash`): bumping it invalidates budgeted masks.
BUDGET_VERSION = "budget-v1"

# Mask spec hash (`masks.methods.MaskSpec.hash`, the unit identity of the build stage): bumping it
# invalidates every mask built from statistics.
MASKS_VERSION = "masks-v1"

# Learned masks (`learn.learner` config, data and identity hashes, `learn.task` key suffixes):
# bumping it invalidates learned masks and their training data.
LEARN_VERSION = "learn-v1"

# Evaluation config and dense-row identities (`eval.config.EvalConfig.hash`, `eval.dense_cache.dense_ident`) and the
# ``code_version`` of result parts: bumping it invalidates every evaluated result.
EVALUATE_VERSION = "evaluate-v1"

# Result part keys (`run.units.result_ident`: results keyed by content, reused across runs) and their
# footer (`eval.result_parts`): bumping it makes every run score its units again.
RESULTS_VERSION = "results-v1"

# Run ids (`run.runs.run_id`) and manifests: bumping it gives every configuration a new run id
# (its units' artifacts above are still reused).
RUNS_VERSION = "runs-v1"
