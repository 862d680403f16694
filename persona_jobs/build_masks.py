"""`persona-jobs build-masks`: persona subnetworks for every persona, in parallel on Ray.

One Ray task per (persona or opposing pair, method, sparsity, granularity). The
driver never loads the model: it hands every task a `WeightSource` (the model spec
and key), and each task reads the weights it scores from the model's files on its
own node, one module at a time (the model cache there: `persona_core.models`);
each task reads its personas' statistics from the store, builds the masks (both
sides of a pair from one read of the two) and writes them.

Incremental: a mask's metadata records an identity hash of everything it derives
from (model, method, parameters, sparsity, granularity, the stored statistics'
part files, code version). Masks already in the store with the same identity are
skipped before any task starts, so a rerun writes nothing and a retried task is
harmless.
"""

from __future__ import annotations

import argparse
import logging

from persona_core.calib.stored import read_persona_stats
from persona_core.catalog import REFERENCE_PERSONA_ID, Catalog, CatalogError, reference_persona
from persona_core.errors import UserError
from persona_core.eval.engine import Evaluator
from persona_core.masks.allocation import resolve_allocation
from persona_core.masks.budgeted_build import PairSearch, stored_calib_config
from persona_core.masks.build import build_pair_masks
from persona_core.masks.codec import write_mask
from persona_core.masks.inputs import LinearWeights, WeightSource
from persona_core.masks.methods import METHODS, OPPOSITE, parse_params
from persona_core.masks.spec import ALLOCATIONS, GRANULARITIES, MaskSpec
from persona_core.models.loading import DEFAULT_MODEL
from persona_core.run.plan import Plan, Selection, make_plan
from persona_core.run.units import MaskUnit, mask_is_current, mask_units, resolve_calib, stats_fingerprints
from persona_core.store.store import Store
from persona_core.versions import MASKS_VERSION
from persona_jobs import dispatch, learn_masks
from persona_jobs.common import Summary, add_common, add_list, ensure_ray, run_alone
from persona_jobs.flags import load, where_overrides

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the task


def build_unit(weights: WeightSource | LinearWeights, store: Store, model_key: str, unit: MaskUnit,
               persona_hashes: dict[str, str | None], delta: bool = False,
               device: str | None = None) -> list[tuple[str, int]]:
    """Read the unit's statistics, build its masks, write them; returns (key, bytes) written.
    `weights`: a `WeightSource` (opened on this node: what the job's tasks get) or the weights."""
    weights = LinearWeights.of(weights)
    stats = read_unit_stats(store, model_key, unit, persona_hashes)
    spec = resolve_allocation(weights, stats, unit.spec, device)  # OWL: the layer sparsities, recorded below
    sides = build_pair_masks(weights, *stats, spec=spec, device=device)
    return write_unit(store, model_key, unit, spec, stats, sides, {}, delta)


def read_unit_stats(store: Store, model_key: str, unit: MaskUnit, persona_hashes: dict[str, str | None]) -> list:
    return [read_persona_stats(store, model_key, pid, persona_hashes.get(pid), unit.calib_hash)
            for _, pid in unit.roles]


def write_unit(store: Store, model_key: str, unit: MaskUnit, spec: MaskSpec, stats: list, sides: tuple,
               extra: dict, delta: bool) -> list[tuple[str, int]]:
    """Write one unit's masks (one per side) with their metadata; returns (key, bytes) written."""
    base_meta = {"model_key": model_key, **spec.to_dict(), "spec_hash": unit.spec.hash,
                 "identity": unit.identity, "code_version": MASKS_VERSION,
                 "roles": {role: pid for role, pid in unit.roles}, "stats": unit.fingerprints,
                 "stats_versions": {s.persona_id: {"persona_hash": s.persona_hash, "calib_hash": s.calib_hash}
                                    for s in stats}, **extra}
    written = []
    first_key = None
    for (pid, key), masks in zip(unit.outputs, sides):
        meta = dict(base_meta, persona=pid)
        if delta and first_key is not None:
            nbytes = write_mask(store, key, masks, meta, base=sides[0], base_key=first_key)
        else:
            nbytes = write_mask(store, key, masks, meta)
        first_key = first_key or key
        written.append((key, nbytes))
    return written


class BudgetBuilder:
    """A Ray actor for budgeted units: one loaded model scores every setting its searches try.

    The search masks the actor's own model in place (always restored); masks are built from
    the dense float32 weights read from the model's files on this node (`weights`, a
    `WeightSource`), never the live ones.
    """

    def __init__(self, model: str, weights: WeightSource | LinearWeights, device: str | None = None):
        self.ev = Evaluator(model, device=device or "cpu")
        self.weights = LinearWeights.of(weights)
        self.device = device

    def build(self, store: Store, model_key: str, unit: MaskUnit, persona_hashes: dict[str, str | None],
              personas: dict, delta: bool = False) -> list[tuple[str, int]]:
        stats = read_unit_stats(store, model_key, unit, persona_hashes)
        people = dict(personas) | {REFERENCE_PERSONA_ID: reference_persona()}
        roles = [(role, people[pid]) for role, pid in unit.roles]
        # magnitude reads no statistics: no persona, no calibration settings; its search bounds perplexity only
        persona = people[unit.roles[0][1]] if unit.roles else None
        opposite = people.get(persona.opposite) if persona is not None and persona.opposite else None
        calib = stored_calib_config(store, model_key, stats[0]) if stats else None
        outcome = PairSearch(self.ev, self.weights, unit.spec, unit.spec.budget, roles, stats, opposite,
                             calib).run()
        log.info("%s: chose %s (validation ppl x%.3f)", unit.name, outcome.result.chosen, outcome.final_ratio)
        return write_unit(store, model_key, unit, outcome.spec, stats, outcome.masks,
                          {"budget": unit.spec.budget.to_dict(), "budget_search": outcome.metadata()}, delta)


# ---------------------------------------------------------------------------- the job


def run(plan: Plan) -> Summary:
    """Build every missing mask of the plan's specs; returns the closing Summary (also logged)."""
    summary = Summary("build-masks")
    units, catalog = plan_units(plan)
    todo = []
    for unit in units:
        if mask_is_current(plan.store, unit):
            summary.skipped += len(unit.outputs)
        else:
            todo.append(unit)
    log.info("%d mask(s) current, %d task(s) to run (%d spec(s))", summary.skipped, len(todo), len(plan.specs))
    if todo:
        _build(plan, todo, catalog, summary)
    summary.finish()
    log.info(summary.line())
    return summary


def plan_units(plan: Plan) -> tuple[list[MaskUnit], Catalog | None]:
    """Every unit of the plan's specs, and the catalog that names the personas (None: a standalone
    build without --catalog, over the personas with statistics); bad input raises UserError before any work."""
    chosen, specs, store, mkey = plan.selection, plan.specs, plan.store, plan.model_key
    cat: Catalog | None = plan.catalog
    calib_hash = plan.calib.hash
    if chosen is not None:  # standalone: the personas named, the statistics stored
        cat = plan.catalog if chosen.by_catalog else None
        try:
            if cat is not None and chosen.personas:
                cat = cat.select([p for p in chosen.personas if p != REFERENCE_PERSONA_ID])
        except CatalogError as err:
            raise UserError(str(err)) from err
        calib_hash = chosen.calib_hash
    if cat is not None:
        ids = [p.id for p in cat]
        opposites = {p.id: p.opposite for p in cat}
    else:
        ids = list(chosen.personas) if chosen.personas else None
        opposites = {}
        if any(OPPOSITE in METHODS[s.method].needs for s in specs):
            raise UserError("contrastive pair methods need --catalog (it names each persona's opposite)")
    if calib_hash is None:
        calib_hash = resolve_calib(store, mkey, [*(ids or []), REFERENCE_PERSONA_ID] if ids else [])
    fingerprints = stats_fingerprints(store, mkey, calib_hash or None)
    if ids is None:
        ids = sorted(p for p in fingerprints if p != REFERENCE_PERSONA_ID)
    budgeted = plan.config.masks.budget is not None
    if budgeted and cat is None and any(METHODS[s.method].per_persona for s in specs):
        raise UserError("a capability budget needs --catalog (its search validates on the personas' statements)")
    units, problems = mask_units(mkey, specs, ids, opposites, fingerprints, calib_hash or None)
    if problems:
        raise UserError("\n".join(problems))
    if not units:
        raise UserError("nothing to build: no personas selected (or none with the statistics the methods need)")
    return units, cat


def _build(plan: Plan, todo: list[MaskUnit], catalog: Catalog | None, summary: Summary) -> None:
    """The units as Ray tasks (plain) and on a pool of budget-search actors (budgeted); counts into `summary`."""
    options, store, mkey = plan.config.masks.options, plan.store, plan.model_key
    hashes = ({p.id: p.content_hash for p in catalog} | {REFERENCE_PERSONA_ID: reference_persona().content_hash}
              if catalog is not None else {})
    ensure_ray(plan.config.address)
    # the model by reference: each task reads the weights it needs on its own node, never the driver
    source = WeightSource(plan.model, mkey)
    learned = [u for u in todo if METHODS[u.spec.method].learned]  # learned masks: the learner pool
    plain = [u for u in todo if u.spec.budget is None and u not in learned]
    budgeted = [u for u in todo if u.spec.budget is not None and u not in learned]
    outs = []
    if learned:
        people = ({p.id: p for p in catalog} if catalog is not None else {}) | {REFERENCE_PERSONA_ID: reference_persona()}
        outs.append(learn_masks.learn_pairs(plan, learned, hashes, people, read_unit_stats, write_unit, options.delta))
    if plain:
        outs.append(dispatch.run_tasks(
            build_unit, plain, lambda u: (source, store, mkey, u, hashes, options.delta, options.device),
            name="build-masks", max_in_flight=options.max_in_flight, describe=lambda u: u.name))
    if budgeted:  # budgeted units score masks on a loaded model: a pool of actors, each loading it once
        people = {p.id: p for p in catalog} if catalog is not None else {}
        pool = dispatch.PoolSpec("budget search", BudgetBuilder, (plan.model, source, options.device),
                                 resources={"num_cpus": 1}, max_restarts=1, max_task_retries=1)
        n = dispatch.pool_size(None, pool.resources, len(budgeted))
        outs.append(dispatch.run_pool(pool, budgeted, "build", num_actors=n,
                                      schedule_timeout_s=plan.config.resources.schedule_timeout_s,
                                      describe=lambda u: u.name,
                                      call_args=lambda u: (store, mkey, u, hashes, people, options.delta)))
    for out in outs:
        summary.done += sum(len(written) for _, written in out.results)
        for unit, err in out.failed:
            summary.failed += len(unit.outputs)
            summary.errors.append(f"{unit.name}: {err}")


# ---------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser("build-masks", help="build persona masks from stored statistics (Ray tasks)",
                       description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=_main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, catalog=True, model_default=DEFAULT_MODEL)
    add_list(p, "--methods", "--method", dest="methods", metavar="M",
             help=f"mask methods (default wanda; known: {', '.join(METHODS)})")
    add_list(p, "--sparsities", "--sparsity", dest="sparsities", item_type=float, metavar="S",
             help="fractions of weights removed (default 0.5)")
    add_list(p, "--granularities", "--granularity", dest="granularities", metavar="G", valid=GRANULARITIES,
             help=f"{', '.join(GRANULARITIES)} (default unstructured)")
    add_list(p, "--allocations", "--allocation", dest="allocations", metavar="A", valid=ALLOCATIONS,
             help="sparsity across layers: uniform or owl (outlier-weighted; default uniform)")
    add_list(p, "--personas", metavar="ID", help="only these personas (default: every persona with statistics)")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method parameter, e.g. contrastive-wanda.f=softplus (repeatable)")
    p.add_argument("--delta", action="store_true", help="store a pair's second mask as a delta against the first")
    p.add_argument("--device", default=None, help="device for scoring in the tasks (default cpu)")
    p.add_argument("--calib-hash", default=None, metavar="HASH",
                   help="use the statistics of this calibration config (`stats list` shows them; "
                        "default: the only one stored)")
    p.add_argument("--budget", type=float, default=None, metavar="RATIO",
                   help="capability budget: search each pair's sparsity (and strength) for the largest validation "
                        "separation with WikiText-2 validation perplexity <= RATIO x dense (replaces --sparsity)")


def plan_from_args(args) -> Plan:
    """The flags as config overrides (the methods named, no baselines), resolved into a plan."""
    overrides = {**where_overrides(args), "masks.methods": args.methods or ["wanda"], "masks.baselines": [],
                 "masks.sparsities": args.sparsities or [0.5],
                 "masks.granularities": args.granularities or ["unstructured"],
                 "masks.allocations": args.allocations or ["uniform"],
                 "masks.options.params": parse_params(args.param), "masks.options.delta": args.delta,
                 "evaluate.enabled": False}
    if args.device is not None:
        overrides["masks.options.device"] = args.device
    if args.budget is not None:
        overrides["masks.budget"] = args.budget
    selection = Selection(personas=tuple(args.personas) if args.personas else None, calib_hash=args.calib_hash,
                          by_catalog=args.catalog is not None)
    return make_plan(load(None, overrides), selection)


def _main(args) -> int:
    return run_alone(plan_from_args(args), run)


if __name__ == "__main__":
    import sys

    from persona_jobs.cli import main

    raise SystemExit(main(["build-masks", *sys.argv[1:]]))
