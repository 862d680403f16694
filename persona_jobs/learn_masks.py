"""`persona-jobs learn-masks`: Persona-Pruner's learned FFN-channel masks over a queue of personas.

One learner actor per GPU (CPU actors otherwise, ``--actors``), each holding the model once;
the driver hands every actor the next (persona, objective, sparsity) task as soon as it is
free. A task checkpoints its scores to the store every ``checkpoint_every`` steps, so a task
whose actor dies is handed to a fresh actor and resumes where it stopped (up to
``--retries`` times). Tasks are keyed by content hash (persona, base model, objective, knobs,
data recipe, initial statistics): a rerun skips every mask already stored with the same
identity. The result is an ordinary ``ffn-channels`` mask (and, with ``--export``, the
smaller model) in the store; `persona_core.learned` has the keys.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import fields
from typing import Sequence

from persona_core.catalog import Catalog, CatalogError, load_catalog
from persona_core.learn import OBJECTIVES, DataConfig, LearnConfig
from persona_core.models import DEFAULT_MODEL
from persona_core.store import Store, open_store
from persona_jobs.dispatch import short_error
from persona_jobs.cli import UserError
from persona_jobs.common import Summary, add_common, add_list, ensure_ray, gpus_available, progress

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
        from persona_core.learned import run_task

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
    from persona_core.evaluate import EvalConfig
    from persona_core.learned import LearnTask
    from persona_core.metrics import heldout_questions
    from persona_core.units import stats_fingerprints

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
        from persona_core.units import resolve_calib

        calib_hash = resolve_calib(store, mkey, [p.id for p in cat] + ["general"])
    tasks, problems = plan(store, mkey, cat, None, objectives, sparsities, config, data, export=export,
                           calib_hash=calib_hash)
    if problems:
        raise UserError("\n".join(problems))
    from persona_core.learned import is_current

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

    import ray

    ensure_ray(address)
    gpus = gpus_available()
    n = actors or (gpus if gpus else 1)
    opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    worker_cls = ray.remote(**opts)(LearnerWorker)
    dev = device or ("cuda" if gpus else "cpu")

    die_at = os.environ.get(DIE_AT_ENV)

    def spawn():
        return worker_cls.remote(model, store, mkey, dev, die_at)

    workers = [spawn() for _ in range(min(n, len(todo)))]
    idle = list(workers)
    queue = [(t, 0) for t in todo]
    pending: dict = {}
    with progress(len(todo), "learn-masks") as bar:
        while queue or pending:
            while queue and idle:
                task, attempt = queue.pop(0)
                w = idle.pop()
                pending[w.run.remote(task)] = (task, attempt, w)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                task, attempt, w = pending.pop(ref)
                try:
                    out = ray.get(ref)
                    summary.done += out["status"] == "done"
                    summary.skipped += out["status"] == "current"
                    summary.tokens += int(out.get("tokens") or 0)
                    idle.append(w)
                    bar.update(1)
                except ray.exceptions.RayActorError as err:  # the actor died: a fresh one resumes the task
                    log.warning("%s: actor died (%s); attempt %d of %d", task.name, short_error(err), attempt + 1,
                                retries + 1)
                    idle.append(spawn())
                    if attempt < retries:
                        queue.insert(0, (task, attempt + 1))
                    else:
                        summary.failed += 1
                        summary.errors.append(f"{task.name}: actor died {attempt + 1} times")
                        bar.update(1)
                except Exception as err:  # the task failed: reported, the others go on
                    summary.failed += 1
                    summary.errors.append(f"{task.name}: {short_error(err)}")
                    log.error("%s failed: %s", task.name, short_error(err))
                    idle.append(w)
                    bar.update(1)
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
