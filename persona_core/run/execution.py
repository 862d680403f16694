"""Running a plan's stages in order: skip finished stages, repair, write the manifest last.

The stage functions themselves (which start Ray work) are handed in by the
caller (`persona_jobs.pipeline`); everything here is plain Python: stage order,
stage markers, artifact verification and repair, the run's manifest, and the
closing summary printed to the terminal.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from persona_core.store import layout
from persona_core.run import runs
from persona_core.errors import UserError
from persona_core.store.lease import Lease
from persona_core.run.plan import Plan
from persona_core.run.runs import Summary
from persona_core.store.store import Store, StoreError, StoreUnreachable

log = logging.getLogger(__name__)

STAGES = ("calibrate", "masks", "evaluate", "report")
StageFunc = Callable[[Plan], Summary]


def stages_for(p: Plan) -> list[str]:
    return [s for s in STAGES if p.config.evaluate.enabled or s not in ("evaluate", "report")]


# ---------------------------------------------------------------------------- the report stage


def stage_report(p: Plan) -> Summary:
    """The HTML report of the run's results, published in the store next to its manifest."""
    from persona_core.report.results import load_results, write_report

    summary = Summary("report")
    table = load_results(p.store, p.run_id)
    if table.num_rows == 0:
        raise RuntimeError(f"no results under {p.store.uri(layout.results_prefix(p.run_id))}")
    write_report(p.store, p.run_id, table, report_inputs(p))
    summary.done = 1
    return summary.finish()


def report_inputs(p: Plan) -> dict:
    """What the report names as the run's inputs."""
    cfg = p.config
    config = p.eval
    windows = f"{config.ppl_windows} windows x {config.ppl_window} tokens"
    return {"run": p.run_id, "catalog": cfg.catalog, "model": p.inputs.model_key,
            "methods": ", ".join(cfg.masks.methods), "plain-pruning baselines": ", ".join(cfg.masks.baselines),
            "sparsities": ", ".join(f"{s:g}" for s in cfg.masks.sparsities),
            "conditions": ", ".join(config.conditions), "metrics": ", ".join(config.metrics),
            "held-out statements per pole (cap)": config.max_statements,
            "general text (reported)": f"{config.ppl_text or 'built-in held-out text'} ({windows})",
            "validation text (choices)": f"{config.val_text or 'built-in general set'} "
                                         f"({config.val_windows} windows x {config.val_window} tokens)",
            "perplexity budget (steering)": f"{config.ppl_budget:g}x",
            "steering search": f"layers {list(config.steer_layers)}, alphas {list(config.steer_alphas)}, "
                               f"{config.val_statements} validation statements per pole",
            "few-shot examples": config.fewshot_k}


# ---------------------------------------------------------------------------- repair


def verify_artifacts(p: Plan) -> list[str]:
    """Keys of the run's stats parts and masks that cannot be read back whole."""
    key = p.inputs.model_key
    keys = []
    for pid in p.inputs.personas:
        keys += p.store.list(layout.stats_prefix(key, pid), suffix=".parquet")
    keys += p.store.list(layout.masks_prefix(key), suffix=".safetensors")
    return [k for k in keys if not _readable(p.store, k)]


def _readable(store: Store, key: str) -> bool:
    """Whether an artifact passes the same verification every read applies."""
    from persona_core.masks.codec import verify_mask
    from persona_core.calib.stats import StatsError, verify_part

    try:
        if key.endswith(".parquet"):
            verify_part(store, key)
        else:
            verify_mask(store, key)
        return True
    except FileNotFoundError:
        return True  # removed meanwhile: nothing corrupt to report
    except (StatsError, StoreError, KeyError, ValueError, OSError) as err:
        log.info("%s: %s", key, err)
        return False


def repair(p: Plan) -> list[str]:
    """Delete the run's corrupt artifacts and its stage markers; the rerun regenerates only those."""
    bad = verify_artifacts(p)
    for k in bad:
        print(f"repair: removing corrupt {p.store.uri(k)} (it will be regenerated)")
        p.store.delete(k)
    if bad or not _manifest_ok(p):
        runs.clear_stages(p.store, p.run_id)
    if not bad:
        print("repair: every stats part and mask of this run reads back whole")
    return bad


def _manifest_ok(p: Plan) -> bool:
    try:
        m = runs.read_manifest(p.store, p.run_id)
    except StoreError:  # corrupt: the run is redone from its stored artifacts and the manifest rewritten
        return False
    return m is not None and m.ok


# ---------------------------------------------------------------------------- execution


@dataclass
class Outcome:
    run_id: str
    ok: bool
    skipped: bool  # nothing to do: the run was already complete
    manifest: runs.Manifest | None
    summaries: list[dict] = field(default_factory=list)


def execute(p: Plan, stage_funcs: Mapping[str, StageFunc], *, preflight: Callable[[Plan], None] = lambda p: None,
            kind: str = "pipeline", force: bool = False, do_repair: bool = False, changes: dict | None = None,
            lease: Lease | None = None) -> Outcome:
    """Run the plan's stages (skipping finished ones); write the manifest last."""
    rid = p.run_id
    try:
        existing = runs.read_manifest(p.store, rid)
    except StoreUnreachable:
        raise
    except StoreError as err:  # a corrupt manifest: --repair / --force rebuild it
        if not (force or do_repair):
            raise UserError(f"{err}; rerun with --repair (or --force) to rebuild it") from None
        print(f"repair: {err}; it will be rebuilt")
        existing = None
    except OSError as err:
        raise UserError(f"store {p.config.store} cannot be read or written: {err}") from None
    if existing is not None and existing.ok and not force and not do_repair:
        print(f"run {rid}: nothing changed since it completed; no model work done")
        return Outcome(rid, True, True, existing, list(existing.stages.values()))

    preflight(p)
    if do_repair:
        repair(p)
    if force:
        runs.clear_stages(p.store, rid)
    started = time.time()
    summaries: dict[str, dict] = {}
    error = None
    print(f"run {rid}: {len(p.inputs.personas)} personas, model {p.inputs.model_key}, store {p.store.uri()}")
    for stage in stages_for(p):
        marker = runs.stage_done(p.store, rid, stage)
        if marker is not None:
            print(f"[{stage}] already finished in an earlier attempt of this run: skipped")
            summaries[stage] = marker
            continue
        print(f"[{stage}] ...", flush=True)
        try:
            summary = stage_funcs[stage](p)
        except UserError:
            raise
        except Exception as err:
            log.debug("stage %s raised", stage, exc_info=True)
            error = f"{stage}: {type(err).__name__}: {err}"
            summaries[stage] = {"stage": stage, "failed": 1, "errors": [str(err)[:500]]}
            break
        summaries[stage] = summary.to_dict()
        print(f"[{stage}] {summary.line()}")
        if not summary.ok:
            error = f"{stage}: {summary.failed} unit(s) failed: " + "; ".join(summary.errors[:3])
            break
        runs.mark_stage(p.store, rid, stage, summary.to_dict())

    if error:
        bad = verify_artifacts(p)
        for k in bad:
            error += f"\ncorrupt artifact: {p.store.uri(k)} (rerun with --repair to regenerate it)"
    if lease is not None:
        lease.check()  # fencing: a run that lost its lease must not write run-level records
    evaluated = p.config.evaluate.enabled
    manifest = runs.Manifest(
        run_id=rid, kind=kind, status=runs.FAILED if error else runs.SUCCEEDED, inputs=p.inputs.to_dict(),
        stages=summaries, started=started, finished=time.time(), changes=changes, error=error,
        store=p.store.uri(), results=p.store.uri(layout.results_prefix(rid)) if evaluated else None,
        report=p.store.uri(layout.report(rid)) if evaluated and not error else None)
    runs.write_manifest(p.store, manifest)
    return Outcome(rid, not error, False, manifest, list(summaries.values()))


def print_outcome(p: Plan, out: Outcome) -> None:
    m = out.manifest
    rows = [("stage", "done", "skipped", "failed", "seconds")]
    order = {"calibrate": 0, "build-masks": 1, "masks": 1, "evaluate": 2, "report": 3}
    for s in sorted(out.summaries, key=lambda s: order.get(s.get("stage"), 9)):
        rows.append((s.get("stage", "?"), str(s.get("done", 0)), str(s.get("skipped", 0)), str(s.get("failed", 0)),
                     f"{s.get('seconds', 0):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if out.ok and p.config.evaluate.enabled:
        table = _terminal_table(p)
        if table:
            print()
            print(table)
    print()
    if m is not None and m.error:
        print(f"run {out.run_id} FAILED: {m.error}", file=sys.stderr)
    elif m is not None:
        print(f"run {out.run_id} succeeded; manifest {p.store.uri(layout.manifest(out.run_id))}")
        if m.report:
            print(f"report: {m.report}")


def _terminal_table(p: Plan) -> str | None:
    """The summary table the report stage published (computed afresh for runs from before it did)."""
    try:
        key = layout.summary_table(p.run_id)
        if p.store.exists(key):
            return p.store.read_bytes(key).decode().rstrip("\n")
        from persona_core.report import terminal as report
        from persona_core.report.results import load_results

        return report.terminal_table(load_results(p.store, p.run_id))
    except Exception as err:  # the table is a nicety; the report is the record
        log.warning("no summary table: %s", err)
        return None
