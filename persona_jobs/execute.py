"""`execute(plan, stages)`: the one loop that runs a plan's stages, preflight first, the manifest last.

A finished stage leaves a marker in the store (`persona_core.run.runs`), so a
rerun of an interrupted run resumes after its last finished stage; a run whose
manifest says it succeeded, and whose artifacts (named in that manifest,
`persona_core.run.artifacts`) are all still there, does no model work at all;
one with missing or changed artifacts runs again and regenerates them. ``force`` clears the
markers (each stage still skips the artifacts already stored), ``do_repair``
deletes corrupt artifacts first (`persona_core.run.execution.repair`). Under a
lease (nightly) the run-level records are written only while the lease holds. A stage
the cluster cannot place (`dispatch.PlacementError`) still leaves a failed manifest,
then exits with the retryable code (75).
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

from persona_core.errors import UserError
from persona_core.run import runs
from persona_core.run.artifacts import artifact_problems, regenerating, run_artifacts
from persona_core.run.execution import Outcome, failure_report, finished_run, repair, write_run_manifest
from persona_core.run.plan import Plan
from persona_core.store.lease import Lease
from persona_jobs.common import preflight
from persona_jobs.dispatch import PlacementError
from persona_jobs.stages import STAGES, Stage

log = logging.getLogger(__name__)


def stages_for(p: Plan) -> list[str]:
    """The stages a plan runs, in order: evaluation and its report only when evaluation is on."""
    return [s for s in STAGES if p.config.evaluate.enabled or s not in ("evaluate", "report")]


def execute(p: Plan, stages: Mapping[str, Stage] = STAGES, *, kind: str = "pipeline", force: bool = False,
            do_repair: bool = False, changes: dict | None = None, lease: Lease | None = None) -> Outcome:
    """Run the plan's stages (skipping finished ones); write the manifest last."""
    rid = p.run_id
    existing = finished_run(p, rebuild=force or do_repair)
    if existing is not None and existing.ok and not force and not do_repair:
        problems = artifact_problems(p, existing)  # done only while everything it names is still there
        if not problems:
            print(f"run {rid}: nothing changed since it completed; no model work done")
            return Outcome(rid, True, True, existing, list(existing.stages.values()))
        print(regenerating(rid, problems))
        force = True  # every stage again; each skips what is stored and current

    preflight(p)
    if do_repair:
        repair(p)
    if force:
        runs.clear_stages(p.store, rid)
    started = time.time()
    summaries: dict[str, dict] = {}
    error = None
    retryable: PlacementError | None = None
    print(f"run {rid}: {len(p.inputs.personas)} personas, model {p.inputs.model_key}, store {p.store.uri()}")
    for name in stages_for(p):
        marker = runs.stage_done(p.store, rid, name)
        if marker is not None:
            print(f"[{name}] already finished in an earlier attempt of this run: skipped")
            summaries[name] = marker
            continue
        print(f"[{name}] ...", flush=True)
        try:
            summary = stages[name].run(p)
        except PlacementError as err:  # the cluster cannot hold the stage now: a failed run, and a retryable exit
            error, retryable = f"{name}: {err}", err
            summaries[name] = {"stage": name, "failed": 1, "errors": [str(err)[:500]]}
            break
        except UserError:
            raise
        except Exception as err:
            log.debug("stage %s raised", name, exc_info=True)
            error = f"{name}: {type(err).__name__}: {err}"
            summaries[name] = {"stage": name, "failed": 1, "errors": [str(err)[:500]]}
            break
        summaries[name] = summary.to_dict()
        print(f"[{name}] {summary.line()}")
        if not summary.ok:
            error = f"{name}: {summary.failed} unit(s) failed: " + "; ".join(summary.errors[:3])
            break
        runs.mark_stage(p.store, rid, name, summary.to_dict())

    if error:
        error = failure_report(p, error)
    if lease is not None:
        lease.check()  # fencing: a run that lost its lease must not write run-level records
    artifacts = None if error else run_artifacts(p)  # what a rerun checks before it calls the run done
    manifest = write_run_manifest(p, summaries, started, error, kind=kind, changes=changes, artifacts=artifacts)
    if retryable is not None:
        raise retryable  # after the manifest: `status` says failed, the exit code says retry
    return Outcome(rid, not error, False, manifest, list(summaries.values()))
