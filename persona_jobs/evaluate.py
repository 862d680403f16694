"""`persona-jobs evaluate`: score every persona subnetwork in the store, on Ray actors.

One actor per free GPU (CPU actors where there is none); each loads the model once
into an `persona_core.eval.engine.Evaluator` and, for each persona it is handed,
computes the dense conditions once (or reads them back from ``dense/`` in the store,
where an earlier run with the same dense settings left them), then applies every mask of that persona in
place, scores it, and restores the dense weights. An opposing pair's two personas go to one
actor together (`pair_groups`: what the pair shares, its steering and learned steering vectors and
few-shot k, is computed once); pairs are handed out one at a time from one queue
(`persona_jobs.dispatch`), to whichever actor is free; each
(persona, mask) unit is written as its own Parquet part, keyed by everything its
rows depend on (model, persona and opposite, the mask's content digest, the
evaluation settings, code version):
``results/model=<model-key>/persona=<id>/part-<method>-s<sparsity>-<hash>.parquet``.
Any run that asks for the same unit reuses the stored part (verified against its
digest and owner; a bad one is scored again), so a nightly run that changes one
persona scores only the units that depend on it. The run's results table is the
set of parts listed in its index ``results/run=<run-id>/parts.json``, from which
the report ``runs/<run-id>/report.html`` is written.

Masks are found under ``masks/model=<model-key>/method=<m>/sparsity=<s>/``;
methods shared by every persona (``magnitude``, ``wanda-general``) live there
once as ``general.safetensors`` and ride along as baselines.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from dataclasses import replace

import pyarrow as pa
import torch

from persona_core.calib.stored import read_persona_stats
from persona_core.catalog import BUILTIN, REFERENCE_PERSONA_ID
from persona_core.eval.conditions import CONDITIONS, DEFAULT_CONDITIONS
from persona_core.eval.config import EvalConfig
from persona_core.eval.dense_cache import DenseRowCache
from persona_core.eval.engine import Evaluator
from persona_core.eval.result_parts import ResultPartError, read_result_part, rows_digest, write_result_part
from persona_core.eval.unit import evaluate_unit
from persona_core.eval.metrics import default_metrics
from persona_core.masks.codec import MaskFile
from persona_core.models.loading import DEFAULT_MODEL
from persona_core.report.results import gather, load_results, write_results_index  # noqa: F401  (load_results: callers read a run through the job too)
from persona_core.run import runs
from persona_core.run.runs import EvaluationSummary
from persona_core.run.artifacts import mask_choice
from persona_core.run.execution import summary_table
from persona_core.run.plan import Placement, Plan, Selection, make_plan
from persona_core.run.units import EvaluationTask, default_eval_run_id, evaluation_tasks
from persona_core.store import layout
from persona_core.store.store import Store
from persona_jobs import dispatch, report
from persona_jobs.common import add_common, add_list, ensure_ray, gpus_per_node, preflight
from persona_jobs.dispatch import actor_resources
from persona_jobs.flags import id_arg, load, where_overrides

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- the worker


def read_mask(store: Store, key: str) -> tuple[dict, dict]:
    """A verified mask and its metadata; ``content_hash`` is the digest of the masks actually
    decoded from the bytes read (checked against the digest written with them)."""
    f = MaskFile(store, key)
    masks = f.read()
    return masks, {**f.metadata, "content_hash": f.read_digest}


class StaleMask(ValueError):
    """A mask built from other statistics than the ones this evaluation is about."""


def check_provenance(key: str, meta: dict, task: EvaluationTask, calib_hash: str | None) -> None:
    """Refuse a mask whose metadata says it was built from another version of the task's personas
    (edited since) or from another calibration config: its results would be silently wrong."""
    versions = meta.get("stats_versions") or {}
    for p in (task.persona, task.opposite):
        built = versions.get(p.id) if p is not None else None
        if not built:
            continue
        if built.get("persona_hash") and built["persona_hash"] != p.content_hash:
            raise StaleMask(f"{key}: built from another version of persona {p.id!r} (edited since); "
                            f"rebuild it (persona-jobs build-masks, or rerun the pipeline)")
        if calib_hash and built.get("calib_hash") and built["calib_hash"] != calib_hash:
            raise StaleMask(f"{key}: built from calibration config {built['calib_hash']}, not {calib_hash}")


class EvalWorker:
    """Holds one Evaluator (one loaded model) for its whole life; scores persona tasks."""

    def __init__(self, model: str, store: Store, config: EvalConfig, *, device_map: str | None = None,
                 threads: int | None = None, calib_hash: str | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.evaluator = Evaluator(model, device_map=device_map)
        self.store, self.config, self.calib_hash = store, config, calib_hash
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def model_key(self) -> str:
        return self.evaluator.model_key

    def steering_stats(self, task: EvaluationTask) -> dict | None:
        """The calibration statistics dense+steer needs: the persona's and its opposite's (or general's)."""
        if "dense+steer" not in self.config.conditions:
            return None
        ids = [task.persona.id, task.opposite.id if task.opposite else REFERENCE_PERSONA_ID]
        return {pid: read_persona_stats(self.store, self.evaluator.model_key, pid, calib_hash=self.calib_hash)
                for pid in ids}

    def run_task(self, task: EvaluationTask) -> dict:
        """Score every unit of one persona; write each unit's part; return tables (part key -> rows) and errors."""
        rows_cache = DenseRowCache(self.store, self.evaluator.model_key)  # baselines shared across runs
        out = {"worker": self.name, "persona": task.persona.id, "tables": {}, "parts": [], "errors": [],
               "seconds": 0.0, "skipped": 0}
        t0 = time.perf_counter()
        stats: dict | None = None
        for i, unit in enumerate(task.units):
            stored = stored_part(self.store, unit.part)  # another attempt (or run) already wrote it
            if stored is not None:
                out["tables"][unit.part] = stored
                out["skipped"] += 1
                continue
            try:
                if unit.mask is None:
                    masks, meta = None, None
                else:
                    masks, meta = read_mask(self.store, unit.mask.key)
                    check_provenance(unit.mask.key, meta, task, self.calib_hash)
                    if unit.mask_digest is not None and meta["content_hash"] != unit.mask_digest:
                        raise StaleMask(f"{unit.mask.key}: holds mask {meta['content_hash']}, planned "
                                        f"{unit.mask_digest or '(unreadable)'} (rebuilt meanwhile?); rerun")
                    if unit.mask.budget:  # one setting per budget; the sparsity each pair got: budget-* rows
                        meta = {**meta, "method": f"{unit.mask.method}|{unit.mask.budget}", "sparsity": 0.0,
                                "granularity": unit.mask.granularity}
                    else:
                        meta = {**meta, "method": unit.mask.method, "sparsity": unit.mask.sparsity,
                                "granularity": unit.mask.granularity}
                if stats is None:
                    stats = self.steering_stats(task)
                # masks swap straight into one another; the dense weights return after the last
                table = evaluate_unit(self.evaluator, task.persona, task.opposite, masks, meta, self.config,
                                      restore=i == len(task.units) - 1, stats=stats, rows_cache=rows_cache)
                write_result_part(self.store, unit.part, table)
                out["tables"][unit.part] = table
                out["parts"].append(unit.part)
            except Exception as err:  # one bad mask must not sink the persona's other units
                log.exception("unit %s failed", unit.part)
                out["errors"].append(f"{unit.part}: {type(err).__name__}: {err}")
        self.evaluator.masks.restore()
        out["seconds"] = time.perf_counter() - t0
        return out

    def run_pair(self, tasks: list[EvaluationTask]) -> list[dict]:
        """`run_task` for the tasks of one opposing pair (`pair_groups`), on this one evaluator: what the
        pair shares (the steering and learned steering vectors and their budget choice, the few-shot k),
        remembered in the evaluator, is computed once, not once per pole on two actors."""
        return [self.run_task(t) for t in tasks]


def pair_groups(tasks: list[EvaluationTask]) -> list[list[EvaluationTask]]:
    """The tasks grouped by opposing pair (a persona without an opposite: alone), in first-seen order."""
    groups: dict[tuple[str, ...], list[EvaluationTask]] = {}
    for t in tasks:
        key = tuple(sorted((t.persona.id, t.opposite.id))) if t.opposite is not None else (t.persona.id,)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def stored_part(store: Store, key: str) -> pa.Table | None:
    """A unit's stored rows, verified; None when absent, or (with a warning) when the part is corrupt,
    edited or another unit's: it is then scored again and the new part replaces it."""
    try:
        return read_result_part(store, key)
    except FileNotFoundError:
        return None
    except ResultPartError as err:
        log.warning("%s; scoring the unit again", err)
        return None


# ---------------------------------------------------------------------------- the job


def run(plan: Plan) -> EvaluationSummary:
    """Evaluate every selected (persona, mask) unit of the plan on a pool of Ray actors.

    A unit's part is keyed by what its rows depend on (`persona_core.run.units.result_ident`), so the
    parts any earlier run stored are reused (verified; a bad one is scored again) and only new units are
    scored. The run's results table is those parts: their keys and digests go to the run's results index,
    ``results/run=<run id>/parts.json``. Returns the units done / reused / failed, the result rows gathered
    and the actors that scored them.
    """
    summary = EvaluationSummary("evaluate", run_id=plan.run_id)
    store, key = plan.store, plan.model_key
    layout.results_index(plan.run_id)  # a run id that cannot be a key fails here, before any work
    chosen = mask_choice(plan)
    tasks = evaluation_tasks(store, plan.catalog, key, plan.eval, chosen.methods, chosen.sparsities,
                             chosen.personas, chosen.budgets, chosen.calib_hash)
    n_units = sum(len(t.units) for t in tasks)
    tables: dict[str, pa.Table] = {}
    todo = []
    for t in tasks:  # parts already stored (by this run or any other) are read back, not recomputed
        pending = []
        for u in t.units:
            stored = stored_part(store, u.part)
            if stored is None:
                pending.append(u)
            else:
                tables[u.part] = stored
                summary.skipped += 1
        if pending:
            todo.append(EvaluationTask(t.persona, t.opposite, pending))
    log.info("evaluate %s: %d personas, %d units (%d already stored), run %s",
             key, len(tasks), n_units, summary.skipped, plan.run_id)
    if todo:
        tables.update(_evaluate(plan, todo, summary))
    summary.rows = gather(list(tables.values())).num_rows  # raises if a row came twice
    write_results_index(store, plan.run_id, {k: rows_digest(t) for k, t in tables.items()})
    return summary.finish()


def _evaluate(plan: Plan, todo: list[EvaluationTask], summary: EvaluationSummary) -> dict[str, pa.Table]:
    """The tasks on a pool of evaluator actors; counts into `summary`; the result tables (part key -> rows)."""
    ensure_ray(plan.config.address)
    pool = plan.eval_pool
    groups = pair_groups(todo)  # one actor per opposing pair: the pair's shared work runs once
    free_cpus = max(1, int(dispatch.free_resources().get("CPU", 0)))  # what this job can have now
    gpus = gpus_per_node()
    per_actor = pool.get("cpus_per_actor") or (None if sum(gpus) or pool.get("actors") else
                                                dispatch.cpu_share(len(groups), dispatch.free_cpus_per_node()))
    n_layout, resources, threads = actor_resources(
        gpus, free_cpus, len(groups), actors=pool.get("actors"), cpus_per_actor=per_actor,
        gpus_per_actor=plan.placement.gpus_per_actor, device_map=pool.get("device_map"))
    # GPU pools: as many as the cluster scales to (unplaced actors wait for the autoscaler and take no
    # unit meanwhile); CPU pools: what the free CPUs hold now
    n = n_layout if pool.get("actors") or resources.get("num_gpus") else dispatch.pool_size(
        None, resources, len(groups), cap=n_layout)
    log.info("evaluate: %d actor(s), each %s", n, resources)
    calib_hash = mask_choice(plan).calib_hash
    spec = dispatch.PoolSpec("evaluation", EvalWorker, (plan.model, plan.store, plan.eval),
                             {"device_map": pool.get("device_map"), "threads": threads, "calib_hash": calib_hash},
                             resources)
    out = dispatch.run_pool(spec, groups, "run_pair", num_actors=n,
                            schedule_timeout_s=plan.config.resources.schedule_timeout_s,
                            describe=lambda g: "/".join(t.persona.id for t in g))
    tables: dict[str, pa.Table] = {}
    for res in (r for _, rs in out.results for r in rs):
        tables.update(res["tables"])
        summary.done += len(res["parts"])
        summary.skipped += res["skipped"]
        summary.failed += len(res["errors"])
        summary.errors.extend(res["errors"])
        summary.workers[res["worker"]] = summary.workers.get(res["worker"], 0) + 1
    for group, err in out.failed:
        for task in group:
            summary.failed += len(task.units)
            summary.errors.append(f"{task.persona.id}: {err}")
    return tables


# ---------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score every persona subnetwork (Ray actors, one per GPU)",
                       description=__doc__.split("\n\n")[0])
    add_args(p)
    p.set_defaults(func=_main)


def add_args(p: argparse.ArgumentParser) -> None:
    add_common(p, catalog=BUILTIN, model_default=DEFAULT_MODEL)
    add_list(p, "--methods", "--method", dest="methods", metavar="M",
             help="mask methods, globs allowed (contrastive-*); default: all found")
    add_list(p, "--sparsities", "--sparsity", dest="sparsities", item_type=float, metavar="S",
             help="sparsities (default: every sparsity found)")
    add_list(p, "--personas", metavar="ID", help="persona ids (default: the whole catalog)")
    add_list(p, "--conditions", "--condition", dest="conditions", valid=CONDITIONS, metavar="C",
             help=f"conditions to score (default: {' '.join(DEFAULT_CONDITIONS)}; dense+steer needs residual "
                  f"statistics)")
    add_list(p, "--metrics", "--metric", dest="metrics", metavar="NAME",
             help="metric names (default: every default metric; `persona-jobs metrics` lists them)")
    p.add_argument("--run-id", type=id_arg("run id"), help="the run's results index and report go under results/run=<id> and runs/<id> "
                   "(default: a hash of the inputs)")
    p.add_argument("--actors", type=int, help="actors (default: one per free GPU; CPU: free cpus / cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=int, help="CPU threads per actor (default: up to 4)")
    p.add_argument("--device-map", choices=["auto"], help="spread a model too big for one GPU over several")
    p.add_argument("--calib-hash", default=None, metavar="HASH",
                   help="score the masks of this calibration config (default: the only one stored)")
    p.add_argument("--gpus-per-actor", type=int, default=None,
                   help="with --device-map auto: GPUs each evaluator holds (default: all GPUs of the largest node)")
    p.add_argument("--schedule-timeout", type=float, default=300.0,
                   help="seconds to wait for a first actor before failing (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size,
                   help="sequences per forward pass (default %(default)s)")
    p.add_argument("--max-statements", type=int, default=EvalConfig.max_statements,
                   help="held-out statements per side (default %(default)s)")
    p.add_argument("--max-questions", type=int, default=EvalConfig.max_questions,
                   help="generic questions for role-play answers (default %(default)s)")
    add_list(p, "--ppl-text", dest="ppl_text", metavar="URL", help="extra perplexity texts: URL or URL::field")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for the judge metric (adds 'judge')")
    p.add_argument("--judge-model", default="", help="model name sent to the judge endpoint")
    p.add_argument("--judge-local", help="a local model spec as judge instead of an endpoint (adds 'judge')")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")


def eval_overrides(args) -> dict:
    """The evaluation flags as `evaluate` overrides (EvalConfig's fields and the evaluator pool)."""
    metrics = list(args.metrics or default_metrics())
    options: dict = {"metrics": metrics, "batch_size": args.batch_size, "max_statements": args.max_statements,
                     "max_questions": args.max_questions, "ppl_texts": list(args.ppl_text or ())}
    if args.judge_url or args.judge_local:
        options["judge"] = {"url": args.judge_url, "model": args.judge_model, "local": args.judge_local}
        metrics += [] if "judge" in metrics else ["judge"]
    for name in ("actors", "cpus_per_actor", "device_map"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    out = {f"evaluate.options.{k}": v for k, v in options.items()}
    if args.conditions:
        out["evaluate.conditions"] = list(args.conditions)
    return out


def plan_from_args(args) -> Plan:
    """The flags as config overrides, resolved into a plan that scores the masks found in the store
    (those named); its run id is --run-id, else a hash of the evaluation's inputs."""
    overrides = {**where_overrides(args), **eval_overrides(args),
                 "resources.schedule_timeout_s": args.schedule_timeout}
    selection = Selection(personas=tuple(args.personas) if args.personas else None, calib_hash=args.calib_hash,
                          methods=tuple(args.methods) if args.methods else None,
                          sparsities=tuple(args.sparsities) if args.sparsities else None)
    plan = make_plan(load(None, overrides), selection, Placement(gpus_per_actor=args.gpus_per_actor))
    run_id = args.run_id or default_eval_run_id(plan.model_key, plan.catalog, plan.eval, args.methods,
                                                args.sparsities, args.calib_hash)
    return replace(plan, selection=replace(selection, run_id=run_id))


def _main(args) -> int:
    plan = plan_from_args(args)
    preflight(plan, need_ray=False)  # a store that cannot be written fails here, before any work
    started = time.time()
    summary = run(plan)
    table = None
    if not args.no_report and summary.rows:
        report.run(plan)  # the one report writer: the page and the summary table, in the store
        summary.report = plan.store.uri(layout.report(plan.run_id))
        log.info("report: %s", summary.report)
        table = summary_table(plan)
    runs.record_evaluation(plan.store, summary, started, {
        "model": args.model, "revision": args.revision, "catalog": args.catalog, "methods": args.methods,
        "sparsities": args.sparsities, "personas": args.personas, "config_hash": plan.eval.hash})
    if table:
        print(table)
    print(summary.line())
    if summary.report:
        print(f"report: {summary.report}")
    for e in summary.errors[:10]:
        print(f"  failed: {e}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    import sys

    from persona_jobs.cli import main

    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
