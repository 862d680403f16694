"""`persona-jobs learn-masks`: Persona-Pruner's learned FFN-channel masks over a queue of personas.

One learner actor per GPU (CPU actors otherwise, ``--actors``), each holding the model once;
the shared dispatcher (`persona_jobs.dispatch`) hands every actor the next (persona, objective,
sparsity) task as soon as it is free. A task checkpoints its scores to the store every
``checkpoint_every`` steps; an actor that dies is restarted and its task re-run there, resuming
where it stopped (up to ``--retries`` times). Tasks are keyed by content hash (persona, base model, objective, knobs,
data recipe, initial statistics): a rerun skips every mask already stored with the same
identity. The result is an ordinary ``ffn-channels`` mask (and, with ``--export``, the
smaller model) in the store; `persona_core.learn.task` has the keys.

The same pool learns the ``learned-contrastive`` masks `build-masks` hands it (`learn_pairs`): one
`ContrastiveWorker` actor per GPU (else CPU actors), each holding one evaluator; a unit (an opposing
pair, a fixed sparsity or a budget) checkpoints after every point of its k path, and a dead actor's
unit resumes from there on a fresh one (`persona_core.learn.contrastive`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import fields, replace
from pathlib import Path

from persona_core.catalog import REFERENCE_PERSONA_ID, Catalog, CatalogError
from persona_core.errors import UserError
from persona_core.eval.config import EvalConfig
from persona_core.eval.metrics import heldout_questions
from persona_core.learn.config import OBJECTIVES, DataConfig, LearnConfig
from persona_core.learn.contrastive import learn_pair
from persona_core.learn.task import LearnTask, is_current, run_task
from persona_core.masks.budgeted_build import stored_calib_config
from persona_core.masks.inputs import LinearWeights
from persona_core.models.loading import DEFAULT_MODEL, load_model
from persona_core.run.plan import Placement, Plan, Selection, make_plan
from persona_core.run.units import MaskUnit, resolve_calib, stats_fingerprints
from persona_core.store import layout
from persona_core.store.store import Store
from persona_jobs import dispatch
from persona_jobs.common import Summary, add_common, add_list, ensure_ray, gpus_available, run_alone
from persona_jobs.flags import load, where_overrides

log = logging.getLogger(__name__)

DIE_AT_ENV = "PERSONA_LEARN_DIE_AT"  # "<persona>:<step>:<marker dir>": the actor's process exits once, at that checkpoint


class LearnerWorker:
    """Holds one loaded model; runs learn tasks one after another (a Ray actor)."""

    def __init__(self, model: str, store: Store, expected_key: str, device: str | None = None,
                 die_at: str | None = None, threads: int | None = None):
        logging.basicConfig(level=logging.INFO)
        if threads:
            import torch  # heavy: only in the actor

            torch.set_num_threads(threads)
        self.loaded = load_model(model, device=device)
        if self.loaded.key != expected_key:
            raise RuntimeError(f"model {model!r} loaded as {self.loaded.key}, the driver expected {expected_key}")
        self.store, self.die_at = store, die_at

    def run(self, task) -> dict:
        return run_task(self.loaded, self.store, task, on_step=self._maybe_die(task))

    def _maybe_die(self, task):
        """Test hook: the whole actor process exits once, right after the chosen checkpoint is stored."""
        if not self.die_at:
            return None
        pid, step, marker_dir = self.die_at.split(":", 2)
        marker = Path(marker_dir) / f"{pid}-{task.config.method}-{task.config.sparsity:g}.died"

        def hook(state) -> None:
            if task.persona.id == pid and state.step == int(step) and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(task.name)
                os._exit(1)

        return hook


class ContrastiveWorker:
    """Holds one evaluator (its model masked in place while it judges a setting, always restored) and a
    copy of the dense weights; learns ``learned-contrastive`` units one after another (a Ray actor).

    `read_stats` / `write` are build-masks' (`read_unit_stats`, `write_unit`): the masks are written
    exactly as every built mask is."""

    def __init__(self, model: str, store: Store, expected_key: str, read_stats, write, device: str | None = None,
                 die_at: str | None = None, threads: int | None = None):
        from persona_core.eval.engine import Evaluator  # heavy (accelerate): only in the actor

        logging.basicConfig(level=logging.INFO)
        if threads:
            import torch  # heavy: only in the actor

            torch.set_num_threads(threads)
        self.ev = Evaluator(model, device=device or "cpu")
        if self.ev.model_key != expected_key:
            raise RuntimeError(f"model {model!r} loaded as {self.ev.model_key}, the driver expected {expected_key}")
        lw = LinearWeights.from_model(self.ev.loaded)
        self.weights = LinearWeights(lw.groups, {k: v.detach().to("cpu", copy=True) for k, v in lw.tensors.items()})
        self.store, self.read_stats, self.write, self.die_at = store, read_stats, write, die_at

    def run(self, unit: MaskUnit, persona_hashes: dict, personas: dict, delta: bool = False) -> list:
        store, mkey = self.store, self.ev.model_key
        stats = self.read_stats(store, mkey, unit, persona_hashes)
        roles = [(role, personas[pid]) for role, pid in unit.roles]
        calib = stored_calib_config(store, mkey, stats[0])
        ckey = layout.learned_checkpoint(mkey, unit.roles[0][1], unit.identity)
        owner = {"identity": unit.identity, "model_key": mkey, "unit": unit.name}
        outcome = learn_pair(self.ev, self.weights, unit.spec, roles, stats, calib, owner=owner,
                             read_checkpoint=lambda: store.read_bytes(ckey) if store.exists(ckey) else None,
                             write_checkpoint=lambda data: store.write_bytes(ckey, data),
                             drop_checkpoint=lambda: store.delete(ckey) if store.exists(ckey) else None,
                             on_point=self._maybe_die(unit))
        extra = outcome.metadata()
        if unit.spec.budget is not None:
            extra["budget"] = unit.spec.budget.to_dict()
        log.info("%s: sparsity %g (validation ppl x%.3f, %d steps)", unit.name, outcome.spec.sparsity,
                 outcome.final_ratio, outcome.learner.state.step)
        written = self.write(store, mkey, unit, outcome.spec, stats, outcome.masks, extra, delta)
        if store.exists(ckey):
            store.delete(ckey)
        return written

    def _maybe_die(self, unit: MaskUnit):
        """Test hook (`PERSONA_LEARN_DIE_AT`): the actor process exits once, after the chosen checkpoint."""
        if not self.die_at:
            return None
        pid, step, marker_dir = self.die_at.split(":", 2)
        marker = Path(marker_dir) / f"{unit.roles[0][1]}-{unit.identity}.died"

        def hook(state) -> None:
            if unit.roles[0][1] == pid and state.step == int(step) and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(unit.name)
                os._exit(1)

        return hook


def learn_pairs(plan: Plan, units: list[MaskUnit], hashes: dict, personas: dict, read_stats, write,
                delta: bool = False) -> dispatch.UnitResults:
    """`learned-contrastive` units of build-masks on a pool of learner actors (one per GPU, else
    ``masks.learned.actors`` or what the free CPUs hold); a dead actor is restarted and its unit resumes
    from its last checkpoint."""
    gpus = gpus_available()
    where = plan.placement
    cpus = 1 if gpus else dispatch.cpu_share(len(units), dispatch.free_cpus_per_node())
    spec = dispatch.PoolSpec("learned-contrastive", ContrastiveWorker,
                             (plan.model, plan.store, plan.model_key, read_stats, write,
                              plan.config.masks.options.device or ("cuda" if gpus else "cpu"),
                              os.environ.get(DIE_AT_ENV)), {"threads": None if gpus else cpus},
                             resources={"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": cpus},
                             max_restarts=max(where.retries, 1), max_task_retries=max(where.retries, 1))
    n = plan.config.masks.learned.actors or (min(gpus, len(units)) if gpus else
                                            dispatch.pool_size(None, spec.resources, len(units)))
    return dispatch.run_pool(spec, units, "run", num_actors=max(1, min(n, len(units))),
                             schedule_timeout_s=plan.config.resources.schedule_timeout_s, describe=lambda u: u.name,
                             call_args=lambda u: (u, hashes, personas, delta))


def learn_tasks(plan: Plan, catalog: Catalog, calib_hash: str | None) -> tuple[list[LearnTask], list[str]]:
    """Every task of `catalog`'s personas x masks.learned's objectives x sparsities, the scores starting
    from the statistics of calibration config `calib_hash`; and problems (missing statistics)."""
    sec, store, mkey = plan.config.masks.learned, plan.store, plan.model_key
    sparsities = sec.sparsities or plan.config.masks.sparsities
    prints = stats_fingerprints(store, mkey, calib_hash or None)
    tasks, missing = [], set()
    for persona in catalog:
        # every question the evaluation may ask this persona is kept out of its training data
        held = tuple(heldout_questions(EvalConfig(max_questions=10**6), persona))
        for objective in sec.objectives:
            for s in sparsities:
                cfg = replace(plan.learn, objective=objective, sparsity=float(s))
                probe = LearnTask(persona, cfg, plan.learn_data, held, mkey, export=sec.export)
                need = probe.stats_roles
                absent = [pid for pid in need if pid not in prints]
                if absent:
                    missing.update(absent)
                    continue
                tasks.append(LearnTask(persona, cfg, plan.learn_data, held, mkey,
                                       tuple((pid, prints[pid]) for pid in need), sec.export, calib_hash or None))
    problems = []
    if missing:
        problems.append(f"no statistics stored for model {mkey} and persona(s) {', '.join(sorted(missing)[:10])}"
                        f": run `persona-jobs calibrate` first (the scores start from them)")
    return tasks, problems


def run(plan: Plan) -> Summary:
    """Learn every missing mask of masks.learned for the plan's personas (a standalone command: those it
    names), the scores starting from the plan's statistics (standalone: the calibration config named,
    else the only one stored)."""
    summary = Summary("learn-masks")
    catalog, calib_hash = plan.catalog, plan.calib.hash
    if plan.selection is not None:
        try:
            catalog = catalog.select(plan.selection.personas)
        except CatalogError as err:
            raise UserError(str(err)) from err
        calib_hash = plan.selection.calib_hash
        if calib_hash is None:
            calib_hash = resolve_calib(plan.store, plan.model_key, [p.id for p in catalog] + [REFERENCE_PERSONA_ID])
    tasks, problems = learn_tasks(plan, catalog, calib_hash)
    if problems:
        raise UserError("\n".join(problems))
    todo = []
    for t in tasks:
        if is_current(plan.store, t):
            summary.skipped += 1
        else:
            todo.append(t)
    log.info("%d learned mask(s) current, %d to learn", summary.skipped, len(todo))
    if todo:
        _learn(plan, todo, summary)
    summary.finish()
    log.info(summary.line())
    return summary


def _learn(plan: Plan, todo: list[LearnTask], summary: Summary) -> None:
    """The tasks on a pool of learner actors; counts into `summary`."""
    ensure_ray(plan.config.address)
    gpus = gpus_available()
    n = plan.config.masks.learned.actors or (gpus if gpus else 1)
    where = plan.placement
    cpus = 1 if gpus else dispatch.cpu_share(min(n, len(todo)), dispatch.free_cpus_per_node())
    # a dead actor is restarted and its task re-run there: the task resumes from its last checkpoint
    spec = dispatch.PoolSpec("learn-masks", LearnerWorker,
                             (plan.model, plan.store, plan.model_key, where.device or ("cuda" if gpus else "cpu"),
                              os.environ.get(DIE_AT_ENV)), {"threads": None if gpus else cpus},
                             resources={"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": cpus},
                             max_restarts=where.retries, max_task_retries=where.retries)
    out = dispatch.run_pool(spec, todo, "run", num_actors=min(n, len(todo)), describe=lambda t: t.name)
    for _, res in out.results:
        summary.done += res["status"] == "done"
        summary.skipped += res["status"] == "current"
        summary.tokens += int(res.get("tokens") or 0)
    for task, err in out.failed:
        summary.failed += 1
        summary.errors.append(f"{task.name}: {err}")


# ---------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser("learn-masks", help="learn Persona-Pruner FFN-channel masks (Ray actors, resumable)",
                       description=__doc__.split("\n\n")[0])
    add_common(p, catalog="builtin", model_default=DEFAULT_MODEL, revision=False)
    add_list(p, "--personas", metavar="ID", help="only these personas")
    add_list(p, "--objectives", "--objective", dest="objectives", valid=OBJECTIVES, metavar="O",
             help="learning objectives (default with-prompt)")
    add_list(p, "--sparsities", "--sparsity", dest="sparsities", item_type=float, metavar="S",
             help="fractions of MLP channels removed (default 0.25)")
    for f in fields(LearnConfig):
        if f.name in ("objective", "sparsity"):
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"learner knob (default {f.default})")
    p.add_argument("--examples", type=int, default=DataConfig.examples, help="training examples per persona")
    p.add_argument("--answer-tokens", type=int, default=DataConfig.max_new_tokens, help="answer length")
    add_list(p, "--instructions", metavar="URL[::FIELD]", help="extra instruction files")
    p.add_argument("--export", action="store_true", help="also store the physically smaller model")
    p.add_argument("--calib-hash", default=None, metavar="HASH",
                   help="start from the statistics of this calibration config (default: the only one stored)")
    p.add_argument("--actors", type=int, default=None, help="learner actors (default: one per GPU, else 1)")
    p.add_argument("--retries", type=int, default=2, help="fresh actors a task may resume on after its actor dies")
    p.add_argument("--device", default=None, help="device in the actors (default cuda when a GPU is given, else cpu)")
    p.set_defaults(func=_main)


def plan_from_args(args) -> Plan:
    """The flags as config overrides (masks.learned), resolved into a plan; the personas as named."""
    knobs = {f.name: getattr(args, f.name) for f in fields(LearnConfig) if f.name not in ("objective", "sparsity")}
    data = {"examples": args.examples, "max_new_tokens": args.answer_tokens,
            "instructions": list(args.instructions or ())}
    overrides = {**where_overrides(args), "masks.learned.enabled": True,
                 "masks.learned.objectives": args.objectives or ["with-prompt"],
                 "masks.learned.sparsities": args.sparsities or [0.25], "masks.learned.export": args.export,
                 **{f"masks.learned.knobs.{k}": v for k, v in knobs.items()},
                 **{f"masks.learned.data.{k}": v for k, v in data.items()}, "evaluate.enabled": False}
    if args.actors:
        overrides["masks.learned.actors"] = args.actors
    selection = Selection(personas=tuple(args.personas) if args.personas else None, calib_hash=args.calib_hash)
    return make_plan(load(None, overrides), selection, Placement(device=args.device, retries=args.retries))


def _main(args) -> int:
    return run_alone(plan_from_args(args), run)


if __name__ == "__main__":
    import sys

    from persona_jobs.cli import main

    raise SystemExit(main(["learn-masks", *sys.argv[1:]]))
