"""The units of work of each stage, planned without Ray and without model weights.

* calibration: one `CalibrationUnit` per (persona, shard of its calibration texts);
  its stats part key is a hash of everything that produces it.
* masks: one `MaskUnit` per (persona or opposing pair, mask spec); its identity
  hash covers the stored statistics it reads, so a rerun skips current masks.
* evaluation: one `EvaluationTask` per persona, holding one `EvaluationUnit` per
  mask to score (the dense state is computed once per task).

The jobs in `persona_jobs` hand these units to Ray; everything here is plain Python.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from persona_core.calib.parts import part_key
from persona_core.calib.stats import Shard
from persona_core.calib.stored import list_parts, part_versions, stale_parts
from persona_core.calib.texts import shard_count
from persona_core.catalog import REFERENCE_PERSONA_ID, Catalog, CatalogError, Persona, load_catalog, reference_persona
from persona_core.errors import UserError
from persona_core.masks.codec import MaskFile, read_mask_metadata
from persona_core.masks.methods import GENERAL, METHODS, OPPOSITE, PERSONA
from persona_core.masks.spec import MaskSpec, spec_key
from persona_core.store import layout
from persona_core.store.hashing import content_hash
from persona_core.store.store import Store, StoreError
from persona_core.versions import EVALUATE_VERSION, MASKS_VERSION, RESULTS_VERSION

log = logging.getLogger(__name__)

PLAIN_PRUNING = ("magnitude", "wanda-general")  # methods shared by every persona: baselines that ride along


# ---------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class CalibrationUnit:
    """One (persona, shard) to calibrate, and the key its part will have."""

    persona: Persona
    shard: "object"  # stats.Shard
    key: str

    @property
    def name(self) -> str:
        return f"{self.persona.id}[{self.shard.index + 1}/{self.shard.count}]"


def calibration_personas(catalog: Catalog | str, personas: list[str] | None, include_general: bool
                         ) -> list[Persona]:
    """The personas to calibrate; bad input raises UserError before any work."""
    try:
        cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        ids = list(personas or [])
        if REFERENCE_PERSONA_ID in ids and REFERENCE_PERSONA_ID not in cat:
            ids.remove(REFERENCE_PERSONA_ID)
            include_general = True
            if not ids:
                return [reference_persona()]
        chosen = list(cat.select(ids))
    except CatalogError as err:
        raise UserError(str(err)) from err
    if include_general and all(p.id != REFERENCE_PERSONA_ID for p in chosen):
        chosen.append(reference_persona())
    return chosen


def calibration_units(personas: list[Persona], model_key: str, calib, shard_size: int | None
                      ) -> list[CalibrationUnit]:
    units = []
    for p in personas:
        count = shard_count(p, calib, shard_size)
        for i in range(count):
            shard = Shard(i, count, shard_size if count > 1 else None)
            units.append(CalibrationUnit(p, shard, part_key(model_key, p.id, p.content_hash, calib.hash, shard)))
    return units


def stale_calibration_parts(store: Store, model_key: str, units: list[CalibrationUnit], failed: set[str],
                            calib_hash: str | None = None) -> list[str]:
    """Parts of a persona that this plan no longer produces (old persona or config, other sharding).

    Only for personas whose every unit is now stored (none in `failed`), so a failed run never
    loses statistics, and only files `stats.stale_parts` can prove this code wrote for that persona.
    """
    by_persona: dict[str, set[str]] = {}
    for u in units:
        by_persona.setdefault(u.persona.id, set()).add(u.key)
    hashes = {u.persona.id: u.persona.content_hash for u in units}
    stale = []
    for pid, keep in by_persona.items():  # another calibration config's statistics of this persona stay
        if pid not in failed:
            stale += stale_parts(store, model_key, pid, keep, persona_hash=hashes[pid], calib_hash=calib_hash)
    return stale


# ---------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class MaskUnit:
    """One task: a spec, the persona behind each role the method needs, the masks it writes."""

    spec: "object"  # masks.MaskSpec
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


def stats_fingerprints(store: Store, model_key: str, calib_hash: str | None = None) -> dict[str, str]:
    """Persona id -> a hash of its stored stats parts of calibration config `calib_hash` (all parts
    when None); part names hash everything that produced them, persona and calibration included."""
    keys = (list(part_versions(store, model_key).items()) if calib_hash
            else [(k, None) for k in list_parts(store, model_key)])
    found: dict[str, list[str]] = {}
    for key, version in keys:
        if calib_hash and version[1] != calib_hash:
            continue
        ref = layout.parse_stats_part(key)
        found.setdefault(ref.persona_id, []).append(ref.name)
    return {pid: content_hash(sorted(parts)) for pid, parts in found.items()}


def resolve_calib(store: Store, model_key: str, persona_ids: Sequence[str]) -> str:
    """The one calibration config whose statistics are stored for these personas (when none is named)."""
    wanted = set(persona_ids)
    found: dict[str, set[str]] = {}
    for key, (_, c_hash) in part_versions(store, model_key).items():
        pid = layout.parse_stats_part(key).persona_id
        if not wanted or pid in wanted:
            found.setdefault(c_hash, set()).add(pid)
    if len(found) > 1:
        listing = "; ".join(f"{c} ({len(p)} persona(s))" for c, p in sorted(found.items()))
        raise UserError(f"statistics of {len(found)} calibration configs are stored for model {model_key}: "
                        f"{listing}; choose one with --calib-hash (`persona-jobs stats list` shows them)")
    return next(iter(found), "")


def mask_specs(methods: Iterable[str], sparsities: Iterable[float], granularities: Iterable[str],
               params: dict[str, dict] | None = None, allocations: Iterable[str] = ("uniform",),
               budget=None) -> list:
    """Every (method, sparsity, granularity, allocation); an N:M granularity fixes its own
    sparsity N/M and is built uniform only (a layer allocation does not apply to it).
    With a `budget` (budget.Budget), the sparsity of every non-N:M spec is searched instead of `sparsities`."""
    specs: dict = {}
    params = params or {}
    granularities = list(granularities)
    for method in methods:
        grans = granularities
        if METHODS[method].reads:  # scores MLP channels: its masks are ffn-channels ones only
            if "ffn-channels" not in granularities:
                raise ValueError(f"method {method!r} builds ffn-channels masks only: add ffn-channels to the "
                                 f"granularities (got {', '.join(granularities)})")
            grans = ["ffn-channels"]
        for gran in grans:
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


def mask_units(model_key: str, specs: Sequence, persona_ids: Sequence[str], opposites: dict[str, str | None],
               fingerprints: dict[str, str], calib_hash: str | None = None) -> tuple[list[MaskUnit], list[str]]:
    """Units to run, and problems (missing statistics, personas without an opposite)."""
    units: list[MaskUnit] = []
    problems: list[str] = []
    missing: set[str] = set()
    no_opposite: set[str] = set()
    targets = [p for p in persona_ids if p != REFERENCE_PERSONA_ID]
    for spec in specs:
        method = METHODS[spec.method]
        if not method.per_persona:
            groups = [((GENERAL, REFERENCE_PERSONA_ID),) if GENERAL in method.needs else ()]
            outputs_of = lambda roles: [REFERENCE_PERSONA_ID]  # noqa: E731
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
                groups.append(((PERSONA, pid), (OPPOSITE, opp)) + (((GENERAL, REFERENCE_PERSONA_ID),) if GENERAL in method.needs
                                                                   else ()))
            outputs_of = lambda roles: [roles[0][1], roles[1][1]]  # noqa: E731
        else:
            groups = [tuple((r, pid if r == PERSONA else REFERENCE_PERSONA_ID) for r in method.needs) for pid in targets]
            outputs_of = lambda roles: [roles[0][1]]  # noqa: E731
        for roles in groups:
            absent = [pid for _, pid in roles if pid not in fingerprints]
            if absent:
                missing.update(absent)
                continue
            prints = {pid: fingerprints[pid] for _, pid in roles}
            identity = content_hash(MASKS_VERSION, model_key, spec.hash, [[r, p, prints[p]] for r, p in roles])
            outputs = tuple((pid, spec_key(model_key, spec, pid, calib_hash)) for pid in outputs_of(roles))
            units.append(MaskUnit(spec, tuple(roles), outputs, identity, prints, calib_hash))
    if missing:
        names = sorted(missing)
        hint = " (calibrate with --general for the general reference set)" if REFERENCE_PERSONA_ID in missing else ""
        problems.append(f"no statistics stored for model {model_key} and persona(s) {', '.join(names[:10])}"
                        f"{' ...' if len(names) > 10 else ''}: run `persona-jobs calibrate` first{hint}")
    if no_opposite:
        names = sorted(no_opposite)
        log.warning("contrastive pair methods skip %d persona(s) without an opposite (use persona-vs-general): %s",
                    len(names), ", ".join(names[:10]))
    return units, problems


def mask_is_current(store: Store, unit: MaskUnit) -> bool:
    """Whether every mask of the unit is stored with this unit's identity."""
    for _, key in unit.outputs:
        try:
            meta = read_mask_metadata(store, key)
        except Exception as err:  # unreadable: rebuild it
            log.warning("%s: unreadable (%s); rebuilding", key, err)
            return False
        if not meta or meta.get("identity") != unit.identity:
            return False
    return True


# ---------------------------------------------------------------------------- evaluation


def list_masks(store: Store, model_key: str) -> list[layout.MaskRef]:
    """Every mask stored for a model, parsed from its key (keys that are not masks are skipped)."""
    refs = []
    for key in store.list(layout.masks_prefix(model_key) + "/", suffix=".safetensors"):
        ref = layout.parse_mask(key)
        if ref is None:
            log.warning("skipping %s: not a mask key", key)
            continue
        refs.append(ref)
    return refs


@dataclass(frozen=True)
class EvaluationUnit:
    """One (persona, mask) to score; `mask` None scores the dense conditions only.

    `part` is the result part key, a hash of everything the unit's rows depend on (`result_ident`):
    any run asking for the same unit finds it stored and reuses it. `mask_digest` is the content
    digest the mask's header held when the unit was planned (the scorer refuses other bytes)."""

    persona: str
    mask: layout.MaskRef | None
    part: str
    mask_digest: str | None = None


@dataclass
class EvaluationTask:
    """One persona and all its units: the actor computes the dense state once for them."""

    persona: Persona
    opposite: Persona | None
    units: list[EvaluationUnit] = field(default_factory=list)


def _matches(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class MaskVersion:
    """What a stored mask's header says about it: the content digest, and what else its rows read."""

    digest: str  # the codec's content digest of the decoded masks ("" when the header cannot be read)
    identity: str  # the build unit's identity (what it was built from), "" when none
    extra: str  # a hash of the metadata that enters result rows (a budgeted mask's search)


def mask_version(store: Store, key: str) -> MaskVersion:
    """The header of the mask at `key`, read alone (two small reads); an unreadable header gives an
    empty digest (the scorer then fails on the mask with the reader's message)."""
    try:
        f = MaskFile(store, key)
    except (FileNotFoundError, StoreError) as err:
        log.warning("%s: %s", store.uri(key), err)
        return MaskVersion("", "", "")
    meta = f.metadata if isinstance(f.metadata, dict) else {}
    return MaskVersion(str(f.header.get("digest") or ""), str(meta.get("identity") or ""),
                       content_hash(meta.get("budget_search")))


def result_ident(model_key: str, persona: Persona, opposite: Persona | None, mask: layout.MaskRef | None,
                 version: MaskVersion | None, config, calib_hash: str | None = None) -> str:
    """Everything one unit's rows depend on, hashed: the model, the persona's and its opposite's content
    (statements, description, calibration texts: the steering baseline reads their statistics) and
    evaluation data, the mask (its key: method, level, owner; its content digest and the metadata rows
    read), the evaluation settings (`EvalConfig.hash`: conditions, metrics, counts) and the calibration
    config the statistics come from, under this code's versions."""
    side = lambda q: [q.content_hash, q.evaluation_hash] if q is not None else None  # noqa: E731
    mask_part = [mask.key, version.digest, version.extra] if mask is not None and version is not None else \
        [mask.key if mask is not None else None]
    return content_hash(RESULTS_VERSION, EVALUATE_VERSION, model_key, side(persona), side(opposite), mask_part,
                        config.hash, calib_hash or "")


def result_part_key(model_key: str, persona: Persona, opposite: Persona | None, mask: layout.MaskRef | None,
                    version: MaskVersion | None, config, calib_hash: str | None = None) -> str:
    ident = result_ident(model_key, persona, opposite, mask, version, config, calib_hash)
    what = layout.result_what(mask.method, mask.sparsity, mask.budget) if mask else layout.result_what(None, None)
    return layout.result_part(model_key, persona.id, what, ident)


def chosen_masks(store: Store, model_key: str, methods: list[str] | None = None,
                 sparsities: list[float] | None = None, budgets: list[str] | None = None,
                 calib_hash: str | None = None) -> list[layout.MaskRef]:
    """The stored masks an evaluation of these methods and levels scores: the chosen ones, plus the
    shared baselines at their levels (only masks of calibration config `calib_hash`, and masks that
    read no statistics; with None, the masks must all come from one config, else a UserError)."""
    refs = of_calibration(list_masks(store, model_key), calib_hash)
    chosen = [r for r in refs if _matches(r.base, methods) or _matches(r.method, methods)]
    if sparsities is not None or budgets is not None:  # budgeted masks only when their budget is asked for
        chosen = [r for r in chosen if (r.budget in (budgets or ()) if r.budget else
                                        any(abs(r.sparsity - s) < 1e-9 for s in sparsities or ()))]
    if methods is not None:  # baselines ride along at the sparsities (or budgets) of the chosen masks
        levels = {r.level for r in chosen}
        chosen += [r for r in refs if r.base in PLAIN_PRUNING and r.level in levels and r not in chosen]
    return sorted(chosen, key=lambda r: (r.method, r.budget, r.sparsity, r.owner))


def persona_masks(chosen: list[layout.MaskRef], persona_id: str) -> list[layout.MaskRef]:
    """The masks scored for one persona: its own, and each shared (``general``) mask it has no own one of."""
    return [r for r in chosen if r.owner == persona_id or (r.owner == REFERENCE_PERSONA_ID and not any(
        o.owner == persona_id and o.method == r.method and o.level == r.level for o in chosen))]


def evaluation_tasks(store: Store, catalog: Catalog, model_key: str, config,
                     methods: list[str] | None = None, sparsities: list[float] | None = None,
                     personas: list[str] | None = None, budgets: list[str] | None = None,
                     calib_hash: str | None = None) -> list[EvaluationTask]:
    """Tasks for every selected persona: its own masks of the chosen methods, the shared
    baselines at the same sparsities (or budgets), or (no mask found) the dense conditions alone.

    Each unit's part key hashes what its rows depend on (`result_ident`; each mask's header is read
    once for its digest), so units stored by any earlier run are found. Only masks of calibration
    config `calib_hash` (and masks that read no statistics) take part; with None, the masks must
    all come from one config (else a UserError names them).
    """
    selected = catalog.select(personas)
    chosen = chosen_masks(store, model_key, methods, sparsities, budgets, calib_hash)
    versions: dict[str, MaskVersion] = {}
    tasks = []
    for p in selected:
        opposite = catalog.personas.get(p.opposite) if p.opposite else None
        task = EvaluationTask(p, opposite)
        for r in persona_masks(chosen, p.id):
            v = versions.get(r.key) or versions.setdefault(r.key, mask_version(store, r.key))
            task.units.append(EvaluationUnit(p.id, r, result_part_key(model_key, p, opposite, r, v, config,
                                                                      calib_hash), v.digest))
        if not task.units and any(c.startswith("dense") for c in config.conditions):
            task.units.append(EvaluationUnit(p.id, None, result_part_key(model_key, p, opposite, None, None, config,
                                                                         calib_hash)))
        tasks.append(task)
    return pair_order(tasks)


def pair_order(tasks: list[EvaluationTask]) -> list[EvaluationTask]:
    """The tasks with each persona's opposite right after it (otherwise in the given order): a run
    stopped midway leaves whole pairs to compare, and a pair's steering choice is reused at once."""
    by_id = {t.persona.id: t for t in tasks}
    out, placed = [], set()
    for t in tasks:
        if t.persona.id in placed:
            continue
        out.append(t)
        placed.add(t.persona.id)
        partner = by_id.get(t.opposite.id) if t.opposite is not None else None
        if partner is not None and partner.persona.id not in placed:
            out.append(partner)
            placed.add(partner.persona.id)
    return out


def of_calibration(refs: list[layout.MaskRef], calib_hash: str | None) -> list[layout.MaskRef]:
    """The masks of one calibration config, plus those that read no statistics (e.g. magnitude).

    A mask key without a config is one written before keys named it: with a config asked
    for, it is never used in its place (its statistics may be another config's).
    """
    def reads_stats(r: layout.MaskRef) -> bool:
        try:
            return bool(METHODS[r.base].needs)
        except ValueError:
            return True

    if calib_hash is None:
        configs = sorted({r.calib for r in refs if r.calib})
        if len(configs) > 1:
            raise UserError(f"masks of {len(configs)} calibration configs are stored ({', '.join(configs)}): "
                            f"choose one with --calib-hash")
        return refs
    return [r for r in refs if r.calib == calib_hash or (not r.calib and not reads_stats(r))]


def default_eval_run_id(model_key: str, catalog: Catalog, config, methods, sparsities,
                        calib_hash: str | None = None) -> str:
    parts = (model_key, catalog.content_hash, config.hash, methods, sparsities) + ((calib_hash,) if calib_hash else ())
    return "eval-" + content_hash(*parts)[:16]
