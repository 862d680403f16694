"""A config resolved into the one `Plan` that every stage receives.

`make_plan(config)` resolves everything that needs no cluster and no model
weights, once: the catalog and the selected personas (opposites come along),
the model key with its revision, the typed settings of each stage
(`CalibConfig`, the mask specs, `EvalConfig` and the evaluator pool), and the
run id (a hash of the inputs, see `runs`). The config was validated when it was
loaded (`persona_core.run.config`); what remains to fail here (a catalog that does
not load, a model that cannot be resolved) raises `UserError`. Never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from persona_core.run import runs
from persona_core.catalog.personas import GENERAL_ID, Catalog, CatalogError, SplitConfig, general_persona, load_catalog
from persona_core.run.config import PipelineConfig
from persona_core.errors import UserError
from persona_core.store.hashing import content_hash
from persona_core.models import model_key
from persona_core.store.store import Store, open_store


@dataclass
class Plan:
    """A validated config with everything resolved that the stages need."""

    config: PipelineConfig
    store: Store
    catalog: Catalog  # the run's personas (selected ids plus their opposites)
    inputs: runs.RunInputs  # model key (with revision), persona hashes, work config: the run id
    calib: object  # calibration.CalibConfig
    specs: list = field(default_factory=list)  # masks.MaskSpec: methods and baselines x sparsities x ...
    eval: object = None  # evaluate.EvalConfig, None when evaluation is off
    eval_pool: dict = field(default_factory=dict)  # actors, cpus_per_actor, device_map

    @property
    def run_id(self) -> str:
        return self.inputs.run_id

    @property
    def model(self) -> str:
        """The model spec every stage loads and keys by: ``<id>@<revision>`` when one is pinned."""
        from persona_core.models import with_revision

        return with_revision(self.config.model, self.config.revision)

    @property
    def revision(self) -> str | None:
        return self.config.revision

    @property
    def model_key(self) -> str:
        return self.inputs.model_key

    @property
    def persona_ids(self) -> list[str]:
        return list(self.catalog.personas)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return self.catalog.pairs()

    @property
    def mask_methods(self) -> list[str]:
        """Methods built (the config's methods, then its baselines)."""
        return list(dict.fromkeys([*self.config.masks.methods, *self.config.masks.baselines]))


def make_plan(cfg: PipelineConfig) -> Plan:
    """Resolve everything that needs no cluster and no model weights; bad input raises UserError."""
    split = SplitConfig(cfg.split.eval_fraction, cfg.split.seed, cfg.split.max_calibration, cfg.split.max_evaluation)
    try:
        full = load_catalog(cfg.catalog, split)
        ids = list(cfg.personas or [])
        for pid in list(ids):  # opposites come along: contrastive masks need both sides
            opp = full[pid].opposite if pid in full else None
            if opp and opp not in ids:
                ids.append(opp)
        catalog = full.select(ids or None)
    except CatalogError as err:
        raise UserError(f"catalog {cfg.catalog}: " + "\n".join(err.problems)) from None
    try:
        key = model_key(cfg.model, revision=cfg.revision)
    except (ValueError, OSError) as err:
        raise UserError(f"model {cfg.model!r}: {err}") from None

    calib = calib_config(cfg)
    specs = mask_specs(cfg)
    from persona_core.masks.methods import get_method

    reading = sorted({s.method for s in specs if get_method(s.method).reads})
    if reading and not calib.attribution:
        raise UserError(f"masks.methods: {', '.join(reading)} read the MLP attribution statistics: set "
                        "calibrate.options.attribution: true")
    evaluation, pool = eval_config(cfg) if cfg.evaluate.enabled else (None, {})

    personas = {p.id: content_hash(p.content_hash, p.evaluation_hash) for p in catalog}
    if cfg.calibrate.include_general:
        personas[GENERAL_ID] = general_persona().content_hash
    work = cfg.work_dict()
    work.pop("catalog", None)  # the catalog counts by its personas' content, not by its path
    work["calib_hash"] = calib.hash
    inputs = runs.RunInputs(cfg.model, key, cfg.catalog, personas, work)
    return Plan(cfg, open_store(cfg.store), catalog, inputs, calib, specs, evaluation, pool)


def calib_config(cfg: PipelineConfig):
    from persona_core.calib.recorder import CalibConfig

    try:
        return CalibConfig(**dict(cfg.calibrate.options))
    except (TypeError, ValueError) as err:
        raise UserError(f"calibrate.options: {err}") from None


def mask_specs(cfg: PipelineConfig) -> list:
    from persona_core.run.units import mask_specs as specs_of

    m = cfg.masks
    try:
        from persona_core.masks.budget import Budget

        methods = list(dict.fromkeys([*m.methods, *m.baselines]))
        budget = Budget.from_value(m.budget) if m.budget is not None else None
        return specs_of(methods, m.sparsities, m.granularities, m.options.params, m.allocations, budget)
    except ValueError as err:
        raise UserError(f"masks: {err}") from None


def eval_config(cfg: PipelineConfig):
    """(EvalConfig, evaluator pool settings) from the evaluate section."""
    from persona_core.eval.engine import EvalConfig

    options = cfg.evaluate.options
    fields = options.eval_fields()
    if cfg.evaluate.conditions:
        fields["conditions"] = tuple(cfg.evaluate.conditions)
    try:
        return EvalConfig(**fields), options.pool()
    except (TypeError, ValueError) as err:
        raise UserError(f"evaluate.options: {err}") from None
