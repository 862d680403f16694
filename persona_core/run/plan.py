"""A config resolved into the one `Plan` that every stage receives.

`make_plan(config)` resolves everything that needs no cluster and no model
weights, once: the catalog and the selected personas (opposites come along),
the model key with its revision, the typed settings of each stage
(`CalibConfig`, the mask specs, the learner's configs, `EvalConfig` and the
evaluator pool), and the run id (a hash of the inputs, see `runs`). The config
was validated when it was loaded (`persona_core.run.config`); what remains to
fail here (a catalog that does not load, a model that cannot be resolved)
raises `UserError`. Never imports Ray.

A standalone subcommand (`calibrate`, `build-masks`, `learn-masks`, `evaluate`)
works on what the store holds: its `Selection` says which personas, masks and
calibration config it names (where it names none, the stage takes what it finds
stored), and its `Placement` where the actors run (device, dtype, retries).
Neither is part of the config, nor of the run id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from persona_core.calib.config import CalibConfig
from persona_core.catalog import REFERENCE_PERSONA_ID, Catalog, CatalogError, SplitConfig, reference_persona, load_catalog
from persona_core.errors import UserError
from persona_core.eval.config import EvalConfig
from persona_core.learn.config import DataConfig, LearnConfig
from persona_core.masks.budget import Budget
from persona_core.masks.methods import METHODS
from persona_core.models.loading import model_key, with_revision
from persona_core.run import runs
from persona_core.run.config import PipelineConfig
from persona_core.run.units import mask_specs
from persona_core.store.hashing import content_hash
from persona_core.store.store import Store, open_store


@dataclass(frozen=True)
class Selection:
    """What a standalone subcommand names on its command line; None: what the store holds.

    The pipeline has none: its config names everything, and its own calibration config is the
    one every later stage reads."""

    personas: tuple[str, ...] | None = None  # as named (no opposites added; "general" allowed); None: all
    calib_hash: str | None = None  # the statistics (and masks) of this calibration config; None: the one stored
    methods: tuple[str, ...] | None = None  # evaluate: method names or globs; None: every mask found
    sparsities: tuple[float, ...] | None = None  # evaluate: None: every sparsity found
    run_id: str | None = None  # evaluate: the results' run id (the command's default: a hash of its inputs)
    by_catalog: bool = True  # build-masks without --catalog: the personas are those with statistics stored


@dataclass(frozen=True)
class Placement:
    """Where a standalone subcommand's actors run (the pipeline: the defaults)."""

    device: str | None = None  # torch device in the actors (None: cuda when a GPU is given, else cpu)
    dtype: str | None = None  # calibration actors: float32, bfloat16 or float16 (None: bf16 on GPU)
    retries: int = 2  # learn-masks: fresh actors a task may resume on after its actor dies
    gpus_per_actor: int | None = None  # evaluate with device_map auto: GPUs each evaluator holds


@dataclass
class Plan:
    """A validated config with everything resolved that the stages need."""

    config: PipelineConfig
    store: Store
    catalog: Catalog  # the run's personas (selected ids plus their opposites)
    inputs: runs.RunInputs  # model key (with revision), persona hashes, work config: the run id
    calib: CalibConfig
    specs: list = field(default_factory=list)  # masks.spec.MaskSpec: methods and baselines x sparsities x ...
    eval: EvalConfig | None = None  # None when evaluation is off
    eval_pool: dict = field(default_factory=dict)  # actors, cpus_per_actor, device_map
    learn: LearnConfig | None = None  # masks.learned: the learner's knobs (objective, sparsity per task)
    learn_data: DataConfig | None = None  # masks.learned: how its training data is made
    selection: Selection | None = None  # a standalone subcommand's; None: the pipeline
    placement: Placement = field(default_factory=Placement)

    @property
    def run_id(self) -> str:
        if self.selection is not None and self.selection.run_id:
            return self.selection.run_id
        return self.inputs.run_id

    @property
    def model(self) -> str:
        """The model spec every stage loads and keys by: ``<id>@<revision>`` when one is pinned."""
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


def make_plan(cfg: PipelineConfig, selection: Selection | None = None,
              placement: Placement | None = None) -> Plan:
    """Resolve everything that needs no cluster and no model weights; bad input raises UserError."""
    try:
        full = load_catalog(cfg.catalog, split_config(cfg))
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
    specs = config_specs(cfg)
    reading = sorted({s.method for s in specs if METHODS[s.method].reads})
    if reading and not calib.attribution and selection is None:  # standalone: the statistics are those stored
        raise UserError(f"masks.methods: {', '.join(reading)} read the MLP attribution statistics: set "
                        "calibrate.options.attribution: true")
    evaluation, pool = eval_config(cfg) if cfg.evaluate.enabled else (None, {})
    learn, data = learn_configs(cfg) if cfg.masks.learned.enabled else (None, None)

    personas = {p.id: content_hash(p.content_hash, p.evaluation_hash) for p in catalog}
    if cfg.calibrate.include_general:
        personas[REFERENCE_PERSONA_ID] = reference_persona().content_hash
    work = cfg.work_dict()
    work.pop("catalog", None)  # the catalog counts by its personas' content, not by its path
    work["calib_hash"] = calib.hash
    inputs = runs.RunInputs(cfg.model, key, cfg.catalog, personas, work)
    return Plan(cfg, open_store(cfg.store), catalog, inputs, calib, specs, evaluation, pool, learn, data,
                selection, placement or Placement())


def split_config(cfg: PipelineConfig) -> SplitConfig:
    """How the config's catalog splits statements into calibration and evaluation."""
    return SplitConfig(cfg.split.eval_fraction, cfg.split.seed, cfg.split.max_calibration, cfg.split.max_evaluation)


def calib_config(cfg: PipelineConfig) -> CalibConfig:
    try:
        return CalibConfig(**dict(cfg.calibrate.options))
    except (TypeError, ValueError) as err:
        raise UserError(f"calibrate.options: {err}") from None


def config_specs(cfg: PipelineConfig) -> list:
    """The mask specs of the masks section: its methods, then its baselines, x sparsities x ..."""
    m = cfg.masks
    try:
        methods = list(dict.fromkeys([*m.methods, *m.baselines]))
        budget = Budget.from_value(m.budget) if m.budget is not None else None
        return mask_specs(methods, m.sparsities, m.granularities, m.options.params, m.allocations, budget)
    except ValueError as err:
        raise UserError(f"masks: {err}") from None


def eval_config(cfg: PipelineConfig) -> tuple[EvalConfig, dict]:
    """(EvalConfig, evaluator pool settings) from the evaluate section."""
    options = cfg.evaluate.options
    fields = options.eval_fields()
    if cfg.evaluate.conditions:
        fields["conditions"] = tuple(cfg.evaluate.conditions)
    try:
        return EvalConfig(**fields), options.pool()
    except (TypeError, ValueError) as err:
        raise UserError(f"evaluate.options: {err}") from None


def learn_configs(cfg: PipelineConfig) -> tuple[LearnConfig, DataConfig]:
    """The learner's knobs (objective and sparsity are set per task) and its data recipe."""
    sec = cfg.masks.learned
    knobs = {k: v for k, v in dict(sec.knobs).items() if k not in ("objective", "sparsity")}
    try:
        return LearnConfig(**knobs), DataConfig(**dict(sec.data))
    except (TypeError, ValueError) as err:
        raise UserError(f"masks.learned: {err}") from None
