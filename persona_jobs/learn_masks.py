"""`persona-jobs learn-masks`: Persona-Pruner's learned FFN-channel masks over a queue of personas.

One learner actor per GPU (CPU actors otherwise, ``--actors``), each holding the model once;
the shared dispatcher (`persona_jobs.dispatch`) hands every actor the next (persona, objective,
sparsity) task as soon as it is free. A task checkpoints its scores to the store every
``checkpoint_every`` steps; an actor that dies is restarted and its task re-run there, resuming
where it stopped (up to ``--retries`` times). Tasks are keyed by content hash (persona, base model, objective, knobs,
data recipe, initial statistics): a rerun skips every mask already stored with the same
identity. The result is an ordinary ``ffn-channels`` mask (and, with ``--export``, the
smaller model) in the store; `persona_core.learn.task` has the keys.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import fields
from typing import Sequence

from persona_core.catalog.personas import Catalog, CatalogError, load_catalog
from persona_core.learn.learner import OBJECTIVES, DataConfig, LearnConfig
from persona_core.models import DEFAULT_MODEL
from persona_core.store.store import Store, open_store
from persona_jobs import dispatch
from persona_jobs.cli import UserError
from persona_jobs.common import Summary, add_common, add_list, ensure_ray, gpus_available

log = logging.getLogger(__name__)

DIE_AT_ENV = "PERSONA_LEARN_DIE_AT"  # "<persona>:<step>:<marker dir>": the actor's process exits once, at that checkpoint


class LearnerWorker:
    """Holds one loaded model; runs learn tasks one after another (a Ray actor)."""

    def __init__(self, model: str, store: Store, expected_key: str, device: str | None = None,
                 die_at: str | None = None):
        from persona_core.models import load_model

        logging.basicConfig(level=logging.INFO)
        self.loaded = load_model(model, device=device)
        if self.loaded.key != expected_key:
            raise RuntimeError(f"model {model!r} loaded as {self.loaded.key}, the driver expected {expected_key}")
        self.store, self.die_at = store, die_at

    def run(self, task) -> dict:
        from persona_core.learn.task import run_task

        return run_task(self.loaded, self.store, task, on_step=self._maybe_die(task))

    def _maybe_die(self, task):
        """Test hook: the whole actor process exits once, right after the chosen checkpoint is stored."""
        if not self.die_at:
            return None
        import os
        from pathlib import Path

        pid, step, marker_dir = self.die_at.split(":", 2)
        marker = Path(marker_dir) / f"{pid}-{task.config.method}-{task.config.sparsity:g}.died"

        def hook(state) -> None:
            if task.persona.id == pid and state.step == int(step) and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(task.name)
                os._exit(1)

        return hook


def plan(store: Store, model_key: str, catalog, persona_ids: Sequence[str] | None, objectives: Sequence[str],
         sparsities: Sequence[float], config: LearnConfig, data: DataConfig, max_questions: int | None = None,
         export: bool = False, calib_hash: str | None = None) -> tuple[list, list[str]]:
    """Every task, and problems (missing statistics) found before any work starts."""
    from persona_core.eval.engine import EvalConfig
    from persona_core.learn.task import LearnTask
    from persona_core.eval.metrics import heldout_questions
    from persona_core.run.units import stats_fingerprints

    cat = catalog.select(persona_ids) if persona_ids else catalog
    prints = stats_fingerprints(store, model_key, calib_hash or None)
    tasks, missing = [], set()
    for persona in cat:
        # every question the evaluation may ask this persona is kept out of its training data
        held = tuple(heldout_questions(EvalConfig(max_questions=10**6), persona))
        for objective in objectives:
            for s in sparsities:
                cfg = LearnConfig(**{**{f.name: getattr(config, f.name) for f in fields(LearnConfig)},
                                     "objective": objective, "sparsity": float(s)})
                probe = LearnTask(persona, cfg, data, held, model_key, export=export)
                need = probe.stats_roles
                absent = [pid for pid in need if pid not in prints]
                if absent:
                    missing.update(absent)
                    continue
                tasks.append(LearnTask(persona, cfg, data, held, model_key,
                                       tuple((pid, prints[pid]) for pid in need), export, calib_hash or None))
    problems = []
    if missing:
        problems.append(f"no statistics stored for model {model_key} and persona(s) {', '.join(sorted(missing)[:10])}"
                        f": run `persona-jobs calibrate` first (the scores start from them)")
    return tasks, problems


def run(store: Store | str | None, model: str = DEFAULT_MODEL, catalog: "str | Catalog" = "builtin",
        personas: Sequence[str] | None = None, objectives: Sequence[str] = ("with-prompt",),
        sparsities: Sequence[float] = (0.25,), config: LearnConfig = LearnConfig(),
        data: DataConfig = DataConfig(), *, export: bool = False, actors: int | None = None,
        address: str | None = None, device: str | None = None, retries: int = 2,
        calib_hash: str | None = None) -> Summary:
    """Learn every missing mask, the scores starting from the statistics of calibration config
    `calib_hash` (None: the only one stored for these personas)."""
    summary = Summary("learn-masks")
    store = open_store(store)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        raise UserError(f"unknown objective(s) {', '.join(bad)} (use {', '.join(OBJECTIVES)})")
    try:
        cat = load_catalog(catalog) if isinstance(catalog, str) else catalog
        if personas:
            cat = cat.select(personas)
    except CatalogError as err:
        raise UserError(str(err)) from err
    from persona_core.models import model_key as key_of

    try:
        mkey = key_of(model)
    except ValueError as err:
        raise UserError(str(err)) from err
    store.check_writable()
    if calib_hash is None:
        from persona_core.run.units import resolve_calib

        calib_hash = resolve_calib(store, mkey, [p.id for p in cat] + ["general"])
    tasks, problems = plan(store, mkey, cat, None, objectives, sparsities, config, data, export=export,
                           calib_hash=calib_hash)
    if problems:
        raise UserError("\n".join(problems))
    from persona_core.learn.task import is_current

    todo = []
    for t in tasks:
        if is_current(store, t):
            summary.skipped += 1
        else:
            todo.append(t)
    log.info("%d learned mask(s) current, %d to learn", summary.skipped, len(todo))
    if not todo:
        log.info(summary.finish().line())
        return summary

    ensure_ray(address)
    gpus = gpus_available()
    n = actors or (gpus if gpus else 1)
    # a dead actor is restarted and its task re-run there: the task resumes from its last checkpoint
    spec = dispatch.PoolSpec("learn-masks", LearnerWorker,
                             (model, store, mkey, device or ("cuda" if gpus else "cpu"), os.environ.get(DIE_AT_ENV)),
                             resources={"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1},
                             max_restarts=retries, max_task_retries=retries)
    out = dispatch.run_pool(spec, todo, "run", num_actors=min(n, len(todo)), describe=lambda t: t.name)
    for _, res in out.results:
        summary.done += res["status"] == "done"
        summary.skipped += res["status"] == "current"
        summary.tokens += int(res.get("tokens") or 0)
    for task, err in out.failed:
        summary.failed += 1
        summary.errors.append(f"{task.name}: {err}")
    summary.finish()
    log.info(summary.line())
    return summary


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


def _main(args) -> int:
    knobs = {f.name: getattr(args, f.name) for f in fields(LearnConfig) if f.name not in ("objective", "sparsity")}
    try:
        config = LearnConfig(**knobs)
        data = DataConfig(examples=args.examples, max_new_tokens=args.answer_tokens,
                          instructions=tuple(args.instructions or ()))
    except ValueError as err:
        raise UserError(str(err)) from err
    summary = run(args.store, args.model, args.catalog, args.personas, args.objectives or ["with-prompt"],
                  args.sparsities or [0.25], config, data, export=args.export, actors=args.actors,
                  address=args.address, device=args.device, retries=args.retries, calib_hash=args.calib_hash)
    print(summary.line())
    for err in summary.errors:
        print(f"  {err}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    from persona_jobs.cli import main

    raise SystemExit(main(["learn-masks", *__import__("sys").argv[1:]]))
