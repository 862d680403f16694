"""The report stage: the run's results as an HTML report and a summary table, published in the store.

The one report writer (`persona_core.report.results.write_report`) for both the
pipeline and a standalone `persona-jobs evaluate`: it reads the results parts the
evaluate stage wrote under ``results/run=<run-id>/`` and publishes
``runs/<run-id>/report.html`` (naming the run's inputs) and the summary table.
"""

from __future__ import annotations

from persona_core.calib.general_text import BUILTIN_GENERAL, is_dataset_file, load_general_text
from persona_core.report.results import load_results, write_report
from persona_core.run.plan import Plan
from persona_core.run.runs import Summary
from persona_core.store import layout


def run(plan: Plan) -> Summary:
    """Write the report of the plan's results; raises when there are none."""
    summary = Summary("report")
    table = load_results(plan.store, plan.run_id)
    if table.num_rows == 0:
        raise RuntimeError(f"no results under {plan.store.uri(layout.results_prefix(plan.run_id))}")
    write_report(plan.store, plan.run_id, table, report_inputs(plan))
    summary.done = 1
    return summary.finish()


def report_inputs(p: Plan) -> dict:
    """What the report names as the run's inputs."""
    cfg = p.config
    config = p.eval
    windows = f"{config.ppl_windows} windows x {config.ppl_window} tokens"
    chosen = p.selection
    if chosen is None:
        methods, baselines = ", ".join(cfg.masks.methods), ", ".join(cfg.masks.baselines)
        sparsities = ", ".join(f"{s:g}" for s in cfg.masks.sparsities)
    else:  # a standalone evaluation scores the masks it finds (plain-pruning baselines ride along)
        methods = ", ".join(chosen.methods) if chosen.methods else "every mask stored"
        baselines = "those stored at the same sparsities"
        sparsities = ", ".join(f"{s:g}" for s in chosen.sparsities) if chosen.sparsities else "every one stored"
    return {"run": p.run_id, "catalog": cfg.catalog, "model": p.inputs.model_key,
            "methods": methods, "plain-pruning baselines": baselines, "sparsities": sparsities,
            "conditions": ", ".join(config.conditions), "metrics": ", ".join(config.metrics),
            "held-out statements per pole (cap)": config.max_statements,
            "general text (reported)": f"{_text(config.ppl_text, 'built-in held-out text')} ({windows})",
            "validation text (choices)": f"{_text(config.val_text or BUILTIN_GENERAL, 'built-in general set')} "
                                         f"({config.val_windows} windows x {config.val_window} tokens)",
            "perplexity budget (steering)": f"{config.ppl_budget:g}x",
            "steering search": f"layers {list(config.steer_layers)}, alphas {list(config.steer_alphas)}"
                               + (f" refined by {config.steer_refine} bisections" if config.steer_refine else "")
                               + f", {config.val_statements} validation statements per pole",
            "few-shot examples": config.fewshot_k if config.fewshot_select == "fixed" else
            f"chosen per pair on validation among {list(config.fewshot_ks)} and the most that fit"}


def _text(spec: str | None, unset: str) -> str:
    """A general text as the report names it: its spec (or `unset`) and its content digest, so a
    report says which text its numbers were measured on."""
    shown = spec or unset
    if spec is not None and is_dataset_file(spec):
        return shown
    return f"{shown}, sha256 {load_general_text(spec).sha256[:12]}"
