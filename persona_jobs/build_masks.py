"""`persona-jobs build-masks`: persona subnetworks for every persona, in parallel on Ray.

One Ray task per (persona or opposing pair, method, sparsity, granularity). The
model's linear weights go into the object store once (`ray.put`) and every task
reads them zero-copy; each task reads its personas' statistics from the store,
builds the masks (both sides of a pair from one read of the two) and writes them.

Incremental: a mask's metadata records an identity hash of everything it derives
from (model, method, parameters, sparsity, granularity, the stored statistics'
part files, code version). Masks already in the store with the same identity are
skipped before any task starts, so a rerun writes nothing and a retried task is
harmless.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from persona_jobs.cli import UserError
from persona_jobs.common import Summary, add_store_arg, ensure_ray, progress
from persona_core.catalog import GENERAL_ID, Catalog, CatalogError, general_persona, load_catalog
from persona_core.budget import Budget
from persona_core.hashing import content_hash
from persona_core.masks import (ALLOCATIONS, CODE_VERSION, GENERAL, GRANULARITIES, OPPOSITE, PERSONA, REGISTRY,
                                MaskSpec, get_method, spec_key)
from persona_core.models import DEFAULT_MODEL
from persona_core.store import Store, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One task: a spec, the persona behind each role the method needs, the masks it writes."""

    spec: MaskSpec
    roles: tuple[tuple[str, str], ...]  # (role, persona id), in the method's `needs` order
    outputs: tuple[tuple[str, str], ...]  # (persona id, store key), one per side
    identity: str
    fingerprints: dict = field(default_factory=dict, hash=False, compare=False)  # persona id -> stats hash
    calib_hash: str | None = None  # the calibration config whose statistics it reads

    @property
    def name(self) -> str:
        who = "/".join(pid for _, pid in self.roles) or "-"
        alloc = "" if self.spec.allocation == "uniform" else f"~{self.spec.allocation}"
        level = f"budget={self.spec.budget.label}" if self.spec.budget else f"s={self.spec.sparsity:g}"
        return f"{self.spec.method}@{self.spec.granularity}{alloc} {level} {who}"


# ---------------------------------------------------------------------------- planning


def stats_fingerprints(store: Store, model_key: str, calib_hash: str | None = None) -> dict[str, str]:
    """Persona id -> a hash of its stored stats parts of calibration config `calib_hash` (all parts
    when None); part names hash everything that produced them, persona and calibration included."""
    from persona_core.stats import list_parts, part_versions

    keys = (list(part_versions(store, model_key).items()) if calib_hash
            else [(k, None) for k in list_parts(store, model_key)])
    found: dict[str, list[str]] = {}
    for key, version in keys:
        if calib_hash and version[1] != calib_hash:
            continue
        persona = key.split("/persona=", 1)[1].split("/", 1)[0]
        found.setdefault(persona, []).append(key.rsplit("/", 1)[-1])
    return {pid: content_hash(sorted(parts)) for pid, parts in found.items()}


def resolve_calib(store: Store, model_key: str, persona_ids: Sequence[str]) -> str:
    """The one calibration config whose statistics are stored for these personas (when none is named)."""
    from persona_core.stats import part_versions

    wanted = set(persona_ids)
    found: dict[str, set[str]] = {}
    for key, (_, c_hash) in part_versions(store, model_key).items():
        pid = key.split("/persona=", 1)[1].split("/", 1)[0]
        if not wanted or pid in wanted:
            found.setdefault(c_hash, set()).add(pid)
    if len(found) > 1:
        listing = "; ".join(f"{c} ({len(p)} persona(s))" for c, p in sorted(found.items()))
        raise UserError(f"statistics of {len(found)} calibration configs are stored for model {model_key}: "
                        f"{listing}; choose one with --calib-hash (`persona-jobs stats list` shows them)")
    return next(iter(found), "")


def make_specs(methods: Iterable[str], sparsities: Iterable[float], granularities: Iterable[str],
               params: dict[str, dict] | None = None, allocations: Iterable[str] = ("uniform",),
               budget: Budget | None = None) -> list[MaskSpec]:
    """Every (method, sparsity, granularity, allocation); an N:M granularity fixes its own
    sparsity N/M and is built uniform only (a layer allocation does not apply to it).
    With a `budget`, the sparsity of every non-N:M spec is searched instead of `sparsities`."""
    specs: dict[str, MaskSpec] = {}
    params = params or {}
    for method in methods:
        for gran in granularities:
            if ":" in gran:
                n, m = (int(x) for x in gran.split(":"))
                chosen = [n / m]
            elif budget is not None:
                for alloc in allocations:
                    spec = MaskSpec(method, 0.0, gran, dict(params.get(method, {})), allocation=alloc, budget=budget)
                    specs.setdefault(spec.hash, spec)
                continue
            else:
                chosen = list(sparsities)
            for s in chosen:
                for alloc in (("uniform",) if ":" in gran else allocations):
                    spec = MaskSpec(method, float(s), gran, dict(params.get(method, {})), allocation=alloc)
                    specs.setdefault(spec.hash, spec)
    return list(specs.values())


def plan(store: Store, model_key: str, specs: Sequence[MaskSpec], persona_ids: Sequence[str],
         opposites: dict[str, str | None], fingerprints: dict[str, str], calib_hash: str | None = None
         ) -> tuple[list[Unit], list[str]]:
    """Units to run, and problems (missing statistics, personas without an opposite)."""
    units: list[Unit] = []
    problems: list[str] = []
    missing: set[str] = set()
    no_opposite: set[str] = set()
    targets = [p for p in persona_ids if p != GENERAL_ID]
    for spec in specs:
        method = get_method(spec.method)
        if not method.per_persona:
            groups = [((GENERAL, GENERAL_ID),) if GENERAL in method.needs else ()]
            outputs_of = lambda roles: [GENERAL_ID]  # noqa: E731
        elif OPPOSITE in method.needs:
            groups, seen = [], set()
            for pid in targets:
                opp = opposites.get(pid)
                if not opp:
                    no_opposite.add(pid)
                    continue
                if pid in seen:
                    continue
                seen.update((pid, opp))
                groups.append(((PERSONA, pid), (OPPOSITE, opp)) + (((GENERAL, GENERAL_ID),) if GENERAL in method.needs
                                                                   else ()))
            outputs_of = lambda roles: [roles[0][1], roles[1][1]]  # noqa: E731
        else:
            groups = [tuple((r, pid if r == PERSONA else GENERAL_ID) for r in method.needs) for pid in targets]
            outputs_of = lambda roles: [roles[0][1]]  # noqa: E731
        for roles in groups:
            absent = [pid for _, pid in roles if pid not in fingerprints]
            if absent:
                missing.update(absent)
                continue
            prints = {pid: fingerprints[pid] for _, pid in roles}
            identity = content_hash(CODE_VERSION, model_key, spec.hash, [[r, p, prints[p]] for r, p in roles])
            outputs = tuple((pid, spec_key(model_key, spec, pid, calib_hash)) for pid in outputs_of(roles))
            units.append(Unit(spec, tuple(roles), outputs, identity, prints, calib_hash))
    if missing:
        names = sorted(missing)
        hint = " (calibrate with --general for the general reference set)" if GENERAL_ID in missing else ""
        problems.append(f"no statistics stored for model {model_key} and persona(s) {', '.join(names[:10])}"
                        f"{' ...' if len(names) > 10 else ''}: run `persona-jobs calibrate` first{hint}")
    if no_opposite:
        names = sorted(no_opposite)
        log.warning("contrastive pair methods skip %d persona(s) without an opposite (use persona-vs-general): %s",
                    len(names), ", ".join(names[:10]))
    return units, problems


def is_current(store: Store, unit: Unit) -> bool:
    """Whether every mask of the unit is stored with this unit's identity."""
    from persona_core.maskcodec import read_mask_metadata

    for _, key in unit.outputs:
        try:
            meta = read_mask_metadata(store, key)
        except Exception as err:  # unreadable: rebuild it
            log.warning("%s: unreadable (%s); rebuilding", key, err)
            return False
        if not meta or meta.get("identity") != unit.identity:
            return False
    return True


# ---------------------------------------------------------------------------- the task


def build_unit(weights, store: Store, model_key: str, unit: Unit, persona_hashes: dict[str, str | None],
               delta: bool = False, device: str | None = None) -> list[tuple[str, int]]:
    """Read the unit's statistics, build its masks, write them; returns (key, bytes) written."""
    from persona_core.masks import build_pair_masks, resolve_allocation

    stats = read_unit_stats(store, model_key, unit, persona_hashes)
    spec = resolve_allocation(weights, stats, unit.spec, device)  # OWL: the layer sparsities, recorded below
    sides = build_pair_masks(weights, *stats, spec=spec, device=device)
    return write_unit(store, model_key, unit, spec, stats, sides, {}, delta)


def read_unit_stats(store: Store, model_key: str, unit: Unit, persona_hashes: dict[str, str | None]) -> list:
    from persona_core.stats import read_persona_stats

    return [read_persona_stats(store, model_key, pid, persona_hashes.get(pid), unit.calib_hash)
            for _, pid in unit.roles]


def write_unit(store: Store, model_key: str, unit: Unit, spec: MaskSpec, stats: list, sides: tuple,
               extra: dict, delta: bool) -> list[tuple[str, int]]:
    """Write one unit's masks (one per side) with their metadata; returns (key, bytes) written."""
    from persona_core.maskcodec import write_mask

    base_meta = {"model_key": model_key, **spec.to_dict(), "spec_hash": unit.spec.hash,
                 "identity": unit.identity, "code_version": CODE_VERSION,
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
    the shared dense weights (`weights`, zero-copy from the object store), never the live ones.
    """

    def __init__(self, model: str, weights, device: str | None = None):
        from persona_core.evaluate import Evaluator

        self.ev = Evaluator(model, device=device or "cpu")
        self.weights = weights
        self.device = device

    def build(self, store: Store, model_key: str, unit: Unit, persona_hashes: dict[str, str | None],
              personas: dict, delta: bool = False) -> list[tuple[str, int]]:
        from persona_core.budget_eval import PairSearch, stored_calib_config
        from persona_core.catalog import general_persona

        stats = read_unit_stats(store, model_key, unit, persona_hashes)
        people = dict(personas) | {GENERAL_ID: general_persona()}
        roles = [(role, people[pid]) for role, pid in unit.roles]
        persona = people[unit.roles[0][1]]
        opposite = people.get(persona.opposite) if persona.opposite else None
        calib = stored_calib_config(store, model_key, stats[0])
        outcome = PairSearch(self.ev, self.weights, unit.spec, unit.spec.budget, roles, stats, opposite,
                             calib).run()
        log.info("%s: chose %s (validation ppl x%.3f)", unit.name, outcome.result.chosen, outcome.final_ratio)
        return write_unit(store, model_key, unit, outcome.spec, stats, outcome.masks,
                          {"budget": unit.spec.budget.to_dict(), "budget_search": outcome.metadata()}, delta)


# ---------------------------------------------------------------------------- the job


def run(store: Store | str | None, model: str = DEFAULT_MODEL, methods: Sequence[str] = ("wanda",),
        sparsities: Sequence[float] = (0.5,), granularities: Sequence[str] = ("unstructured",),
        personas: Sequence[str] | None = None, catalog: Catalog | str | None = None,
        address: str | None = None, *, params: dict[str, dict] | None = None,
        allocations: Sequence[str] = ("uniform",), delta: bool = False,
        device: str | None = None, max_in_flight: int = 256, budget: Budget | dict | float | None = None,
        budget_actors: int | None = None, calib_hash: str | None = None) -> Summary:
    """Build every missing mask from the statistics of calibration config `calib_hash` (None: the
    only config stored for these personas); returns the closing Summary (also logged)."""
    summary = Summary("build-masks")
    store = open_store(store)
    # ---- check everything before any work starts
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(REGISTRY)})")
    bad_gran = [g for g in granularities if g not in GRANULARITIES]
    if bad_gran:
        raise UserError(f"unknown granularity {', '.join(bad_gran)} (use {', '.join(GRANULARITIES)})")
    bad_alloc = [a for a in allocations if a not in ALLOCATIONS]
    if bad_alloc:
        raise UserError(f"unknown allocation {', '.join(bad_alloc)} (use {', '.join(ALLOCATIONS)})")
    try:
        budget = Budget.from_value(budget)
        specs = make_specs(methods, sparsities, granularities, params, allocations, budget)
    except ValueError as err:
        raise UserError(str(err)) from err
    try:
        cat = load_catalog(catalog) if isinstance(catalog, str) else catalog
        if cat is not None and personas:
            cat = cat.select([p for p in personas if p != GENERAL_ID])
    except CatalogError as err:
        raise UserError(str(err)) from err
    store.check_writable()

    from persona_core.masks import LinearWeights
    from persona_core.models import load_model, model_key as key_of

    try:
        mkey = key_of(model)
    except ValueError as err:
        raise UserError(str(err)) from err
    if cat is not None:
        ids = [p.id for p in cat]
        opposites = {p.id: p.opposite for p in cat}
        hashes = {p.id: p.content_hash for p in cat} | {GENERAL_ID: general_persona().content_hash}
    else:
        ids = list(personas) if personas else None
        opposites, hashes = {}, {}
        if any(OPPOSITE in get_method(s.method).needs for s in specs):
            raise UserError("contrastive pair methods need --catalog (it names each persona's opposite)")
    if calib_hash is None:
        calib_hash = resolve_calib(store, mkey, [*(ids or []), GENERAL_ID] if ids else [])
    fingerprints = stats_fingerprints(store, mkey, calib_hash or None)
    if ids is None:
        ids = sorted(p for p in fingerprints if p != GENERAL_ID)
    if budget is not None and cat is None and any(get_method(s.method).per_persona for s in specs):
        raise UserError("a capability budget needs --catalog (its search validates on the personas' statements)")
    units, problems = plan(store, mkey, specs, ids, opposites, fingerprints, calib_hash or None)
    if problems:
        raise UserError("\n".join(problems))
    if not units:
        raise UserError("nothing to build: no personas selected (or none with the statistics the methods need)")
    todo = []
    for unit in units:
        if is_current(store, unit):
            summary.skipped += len(unit.outputs)
        else:
            todo.append(unit)
    log.info("%d mask(s) current, %d task(s) to run (%d spec(s))", summary.skipped, len(todo), len(specs))
    if not todo:
        log.info(summary.finish().line())
        return summary

    # ---- run
    import ray

    ensure_ray(address)
    loaded = load_model(model, device="cpu", dtype="float32")
    weights_ref = ray.put(LinearWeights.from_model(loaded, numpy=True))  # once, shared by every task
    del loaded
    plain = [u for u in todo if u.spec.budget is None]
    budgeted = [u for u in todo if u.spec.budget is not None]
    task = ray.remote(num_cpus=1, max_retries=2)(build_unit)
    submit = [lambda unit: task.remote(weights_ref, store, mkey, unit, hashes, delta, device)] * len(plain)
    if budgeted:
        # Budgeted units score masks on a loaded model: a few actors, each loading it once.
        n = budget_actors or max(1, min(len(budgeted), int(ray.available_resources().get("CPU", 1))))
        actor_cls = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=1)(BudgetBuilder)
        actors = [actor_cls.remote(model, weights_ref, device) for _ in range(n)]
        people = {p.id: p for p in cat} if cat is not None else {}
        submit += [lambda unit, i=i: actors[i % n].build.remote(store, mkey, unit, hashes, people, delta)
                   for i in range(len(budgeted))]
    pending: dict = {}
    queue = list(zip(plain + budgeted, submit))
    with progress(len(todo), "build-masks") as bar:
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                unit, go = queue.pop(0)
                pending[go(unit)] = unit
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                unit = pending.pop(ref)
                try:
                    summary.done += len(ray.get(ref))
                except Exception as err:  # a task's failure is reported, not fatal to the others
                    summary.failed += len(unit.outputs)
                    summary.errors.append(f"{unit.name}: {_short(err)}")
                    log.error("%s failed: %s", unit.name, _short(err))
                bar.update(1)
    summary.finish()
    log.info(summary.line())
    return summary


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


# ---------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser("build-masks", help="build persona masks from stored statistics (Ray tasks)",
                       description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=_main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default %(default)s)")
    p.add_argument("--method", action="append", dest="methods", metavar="M",
                   help=f"mask method, repeatable (default wanda; known: {', '.join(REGISTRY)})")
    p.add_argument("--sparsity", action="append", dest="sparsities", type=float, metavar="S",
                   help="fraction of weights removed, repeatable (default 0.5)")
    p.add_argument("--granularity", action="append", dest="granularities", metavar="G",
                   help=f"repeatable: {', '.join(GRANULARITIES)} (default unstructured)")
    p.add_argument("--allocation", action="append", dest="allocations", metavar="A", choices=ALLOCATIONS,
                   help="sparsity across layers, repeatable: uniform or owl (outlier-weighted; default uniform)")
    p.add_argument("--personas", nargs="+", default=None, metavar="ID", help="only these personas")
    p.add_argument("--catalog", default=None, help="catalog (file, folder, URL or 'builtin'); needed for pairs")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method parameter, e.g. contrastive-wanda.f=softplus (repeatable)")
    p.add_argument("--delta", action="store_true", help="store a pair's second mask as a delta against the first")
    p.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS or a local cluster)")
    p.add_argument("--device", default=None, help="device for scoring in the tasks (default cpu)")
    p.add_argument("--calib-hash", default=None, metavar="HASH",
                   help="use the statistics of this calibration config (`stats list` shows them; "
                        "default: the only one stored)")
    p.add_argument("--budget", type=float, default=None, metavar="RATIO",
                   help="capability budget: search each pair's sparsity (and strength) for the largest validation "
                        "separation with WikiText-2 validation perplexity <= RATIO x dense (replaces --sparsity)")


def parse_params(items: Iterable[str]) -> dict[str, dict]:
    import json

    out: dict[str, dict] = {}
    for item in items:
        lhs, eq, value = item.partition("=")
        method, dot, key = lhs.partition(".")
        if not (eq and dot and method and key):
            raise UserError(f"--param {item!r}: expected METHOD.KEY=VALUE")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(method, {})[key] = parsed
    return out


def _main(args) -> int:
    summary = run(args.store, args.model, args.methods or ["wanda"], args.sparsities or [0.5],
                  args.granularities or ["unstructured"], args.personas, args.catalog, args.address,
                  params=parse_params(args.param), allocations=args.allocations or ["uniform"],
                  delta=args.delta, device=args.device, budget=args.budget, calib_hash=args.calib_hash)
    print(summary.line())
    for err in summary.errors:
        print(f"  {err}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    from persona_jobs.cli import main

    raise SystemExit(main(["build-masks", *__import__("sys").argv[1:]]))
