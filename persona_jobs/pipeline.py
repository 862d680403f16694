"""`persona-jobs run`: calibrate -> build masks -> evaluate -> report, in one command.

    persona-jobs run --config configs/demo.yaml
    persona-jobs run --catalog builtin --model tiny-random-llama --store ./persona-store --sparsities 0.5
    persona-jobs run --config pipeline.yaml --address ray://head:10001     # any Ray cluster

Every check that can fail on bad input (config, catalog, persona ids, method
names and options, store writable, model known, Ray reachable) runs before any
work starts. The run id is a hash of the inputs (see `persona_core.run.runs`): a
rerun with nothing changed finds the run's manifest and does no model work; an
interrupted run resumes after its last finished stage; each stage is itself
incremental by content hash. `--repair` reads back every stats part and mask
of the run, deletes the corrupt ones and regenerates only those.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from persona_core.run import execution
from persona_core.run.config import ConfigError, NightlyConfig, PipelineConfig, load_config, parse_config
from persona_core.errors import UserError
from persona_core.run.execution import STAGES, Outcome, print_outcome, stage_report, verify_artifacts  # noqa: F401
from persona_core.run.plan import Plan, make_plan
from persona_core.store.store import StoreError
from persona_jobs.common import Summary, add_common, add_list, ensure_ray

log = logging.getLogger(__name__)

plan = make_plan  # the one resolution of a config (persona_core.run.plan)


def preflight(p: Plan, *, need_ray: bool) -> None:
    """Store writable and Ray reachable, checked before any work (nothing is written but a probe)."""
    try:
        p.store.check_writable()
    except (StoreError, OSError, ValueError) as err:
        raise UserError(f"store {p.config.store} cannot be written: {err}") from None
    if need_ray:
        ensure_ray(p.config.address or os.environ.get("RAY_ADDRESS"))  # checks the address first


# ---------------------------------------------------------------------------- stages


def stage_calibrate(p: Plan) -> Summary:
    from persona_jobs import calibrate

    c = p.config
    return calibrate.run(p.catalog, p.model, p.store, personas=p.persona_ids, shard_size=c.calibrate.shard_size,
                         address=c.address, calib=p.calib, include_general=c.calibrate.include_general,
                         num_actors=c.resources.calibrate_actors,
                         schedule_timeout_s=c.resources.schedule_timeout_s)


def stage_masks(p: Plan) -> Summary:
    summary = _build_masks(p)
    if p.config.masks.learned.enabled and summary.ok:
        learned = stage_learn(p)
        summary.done, summary.skipped, summary.failed = (summary.done + learned.done, summary.skipped + learned.skipped,
                                                         summary.failed + learned.failed)
        summary.tokens += learned.tokens
        summary.errors += learned.errors
    return summary


def stage_learn(p: Plan) -> Summary:
    """Learned FFN-channel masks (masks.learned) for every persona, from the run's statistics."""
    from persona_core.learn.learner import DataConfig, LearnConfig
    from persona_jobs import learn_masks

    m = p.config.masks
    sec = m.learned
    knobs = {k: v for k, v in dict(sec.knobs).items() if k not in ("objective", "sparsity")}
    return learn_masks.run(p.store, p.model, p.catalog, p.persona_ids, list(sec.objectives),
                           list(sec.sparsities or m.sparsities), LearnConfig(**knobs), DataConfig(**dict(sec.data)),
                           export=sec.export, actors=sec.actors, address=p.config.address, calib_hash=p.calib.hash)


def _build_masks(p: Plan) -> Summary:
    from persona_jobs import build_masks

    m = p.config.masks
    return build_masks.run(store=p.store, model=p.model, methods=p.mask_methods, sparsities=list(m.sparsities),
                           granularities=tuple(m.granularities), personas=p.persona_ids, catalog=p.catalog,
                           address=p.config.address, params=m.options.params, allocations=tuple(m.allocations),
                           delta=m.options.delta, device=m.options.device, max_in_flight=m.options.max_in_flight,
                           budget=m.budget, calib_hash=p.calib.hash,
                           schedule_timeout_s=p.config.resources.schedule_timeout_s)


def stage_evaluate(p: Plan) -> Summary:
    from persona_core.masks.budget import Budget
    from persona_core.masks.methods import budget_segment
    from persona_jobs import evaluate

    c = p.config
    budgeted = c.masks.budget is not None
    return evaluate.run(store=p.store, model=p.model, catalog=p.catalog,
                        methods=list(c.masks.methods) + c.masks.learned.methods(),
                        sparsities=[] if budgeted else list(c.masks.sparsities), personas=p.persona_ids,
                        run_id=p.run_id, address=c.address, config=p.eval, report=False,
                        budgets=[budget_segment(Budget.from_value(c.masks.budget))] if budgeted else None,
                        calib_hash=p.calib.hash, schedule_timeout_s=c.resources.schedule_timeout_s, **p.eval_pool)


STAGE_FUNCS = {"calibrate": stage_calibrate, "masks": stage_masks, "evaluate": stage_evaluate,
               "report": stage_report}


def execute(p: Plan, **kwargs) -> Outcome:
    """Run the plan's stages on Ray (see `persona_core.run.execution.execute`)."""
    return execution.execute(p, STAGE_FUNCS, preflight=lambda p: preflight(p, need_ray=True), **kwargs)


# ---------------------------------------------------------------------------- CLI


# flag (argparse dest) -> the config key it overrides: each override is declared once, here
OVERRIDES = {"catalog": "catalog", "model": "model", "revision": "revision", "store": "store",
             "address": "address", "personas": "personas", "methods": "masks.methods",
             "sparsities": "masks.sparsities", "granularities": "masks.granularities",
             "allocations": "masks.allocations"}


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML config (every knob: README, 'Operations'); a shipped one by name, e.g. configs/demo.yaml")
    add_common(p, catalog=True)
    add_list(p, "--personas", metavar="ID", help="persona ids (default: all); opposites come along")
    add_list(p, "--methods", "--method", dest="methods", metavar="M", help="mask methods (masks.methods)")
    add_list(p, "--sparsities", "--sparsity", dest="sparsities", item_type=float, metavar="S",
             help="sparsities, e.g. 0.3,0.5 (masks.sparsities)")
    add_list(p, "--granularities", "--granularity", dest="granularities", metavar="G",
             help="unstructured, 2:4, 4:8, ffn-channels (masks.granularities)")
    add_list(p, "--allocations", "--allocation", dest="allocations", metavar="A",
             help="uniform and/or owl (masks.allocations)")
    p.add_argument("--no-evaluate", action="store_true", help="stop after building masks")
    p.add_argument("--repair", action="store_true", help="verify stored artifacts; regenerate corrupt ones")
    p.add_argument("--force", action="store_true", help="run every stage again (stages still skip stored work)")


def config_path(path: str) -> Path:
    """`path` as given, else the shipped config of that name (a non-editable install carries configs/)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parent / "configs"):  # installed package; source checkout
        shipped = folder / given.name
        if given.parent.name in ("", "configs") and shipped.is_file():
            return shipped
    return given


def config_from_args(args, nightly: bool = False) -> PipelineConfig:
    """The config file (if any) with command-line flags on top; ConfigError -> UserError."""
    cls = NightlyConfig if nightly else PipelineConfig
    overrides = {key: getattr(args, dest) for dest, key in OVERRIDES.items() if getattr(args, dest, None)}
    if getattr(args, "no_evaluate", False):
        overrides["evaluate.enabled"] = False
    try:
        if args.config:
            return load_config(config_path(args.config), cls, overrides)
        return parse_config("", "<command line>", cls, overrides)
    except ConfigError as err:
        raise UserError("invalid config:\n" + "\n".join(err.problems)) from None


def build_subparser(name: str = "run") -> argparse.ArgumentParser:
    """A standalone parser for `run` / `nightly` arguments (submit uses it to compute run ids)."""
    p = argparse.ArgumentParser(prog=f"persona-jobs {name}")
    add_config_args(p)
    return p


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline: calibrate, masks, evaluate, report",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--plan", action="store_true", help="print the run id and inputs, do nothing")
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = config_from_args(args)
    p = plan(cfg)
    if args.plan:
        import json

        print(json.dumps({"run_id": p.run_id, **p.inputs.to_dict()}, indent=2, default=str))
        return 0
    out = execute(p, force=args.force, do_repair=args.repair)
    print_outcome(p, out)
    return 0 if out.ok else 1


if __name__ == "__main__":
    from persona_jobs.cli import main as cli_main

    raise SystemExit(cli_main(["run", *sys.argv[1:]]))
