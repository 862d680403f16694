"""Pipeline and nightly configs: YAML read into typed pydantic models, validated once, at load.

Every knob is a model field with a default and a one-line description; a YAML file only names
what it changes. Every section forbids unknown keys, and the stage options are typed models too
(`persona_core.run.stage_options`). Method names, granularities, allocations, method
parameters, metrics and conditions are checked against their registries here. Loading reports
every problem at once, each naming the file, the line and the dotted key
(`persona_core.run.yaml_lines`)::

    configs/x.yaml:7: masks.sparsity: unknown key (did you mean 'sparsities'?)
    configs/x.yaml:9: calibrate.shard_size: expected an integer, got 'many'

`describe()` lists every knob with its default (docs/operations.md's table is checked against it by the
tests). This module never imports Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from persona_core.calib.general_text import check_general_text
from persona_core.eval.conditions import CONDITIONS
from persona_core.eval.config import EvalConfig
from persona_core.learn.config import OBJECTIVES
from persona_core.masks.budget import Budget
from persona_core.masks.methods import METHODS
from persona_core.masks.spec import ALLOCATIONS, GRANULARITIES
from persona_core.run.config_fields import (Bool, FloatList, Int, PositiveInt, Section, Text, TextList, check_names,
                                            fractions, non_empty)
from persona_core.run.stage_options import (CalibrateOptions, EvaluateOptions, LearnData, LearnKnobs, MasksOptions,
                                            dataclass_problems, raise_all)
from persona_core.run.yaml_lines import ConfigError, located_problems, read_yaml
from persona_core.store.hashing import content_hash
from persona_core.store.ids import ID_PATTERN, id_problem
from persona_core.store.redact import url_userinfo_problem

MAX_CONFIG_BYTES = 1 << 20  # a config larger than this is not a config


class LearnedSection(Section):
    """Persona-Pruner's learned FFN-channel masks, learned in the masks stage after the built masks."""

    enabled: Bool = Field(False, description="learn masks (persona_jobs.learn_masks) for every persona")
    objectives: TextList = Field(["with-prompt"], description="with-prompt and/or prompt-free")
    sparsities: FloatList | None = Field(None, description="fractions of MLP channels removed (null: masks.sparsities)")
    knobs: LearnKnobs = Field(default_factory=LearnKnobs, description="learner knobs (steps, lr, batch_size, ...)")
    data: LearnData = Field(default_factory=LearnData, description="training data (examples, max_new_tokens, ...)")
    export: Bool = Field(False, description="also store the physically smaller model")
    actors: PositiveInt | None = Field(None, description="learner actors (null: one per GPU, else 1)")

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v):
        return check_names(non_empty(v), OBJECTIVES, "objective")

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v):
        return v if v is None else fractions(v)

    def methods(self) -> list[str]:
        """The mask methods (store names) it produces."""
        return [f"learned-{o}" for o in self.objectives] if self.enabled else []


class SplitSection(Section):
    eval_fraction: float = Field(0.3, gt=0.0, lt=1.0, strict=True,
                                 description="share of a plain statement list held out for evaluation")
    seed: Int = Field(0, description="seed of the deterministic calibration/evaluation split")
    max_calibration: PositiveInt | None = Field(
        None, description="cap on calibration texts per persona (null: all)")
    max_evaluation: PositiveInt | None = Field(
        None, description="cap on evaluation texts per persona (null: all)")


class CalibrateSection(Section):
    shard_size: PositiveInt = Field(64, description="calibration texts per unit of work (one actor call, one "
                                                    "Parquet part)")
    include_general: Bool = Field(True, description="also calibrate the neutral `general` reference set")
    options: CalibrateOptions = Field(default_factory=CalibrateOptions,
                                      description="fields of calibration.CalibConfig (batch_size, max_length, ...)")


class MasksSection(Section):
    methods: TextList = Field(["wanda", "contrastive-wanda"], description="mask methods to build")
    sparsities: FloatList = Field([0.3, 0.5], description="fractions of weights removed")
    granularities: TextList = Field(["unstructured"], description="unstructured, 2:4, 4:8 or ffn-channels")
    allocations: TextList = Field(["uniform"], description="sparsity across layers: uniform, owl (outlier-weighted) "
                                                           "and/or focus (the layers where a pair differs most)")
    baselines: TextList = Field(["magnitude", "wanda-general"],
                                description="plain-pruning baselines built and scored alongside")
    budget: dict[str, Any] | Annotated[float, Field(strict=True)] | None = Field(
        None, description="capability budget, e.g. {perplexity_ratio: 1.10}: search each pair's sparsity/strength "
                          "(replaces sparsities); null: fixed sparsities")
    options: MasksOptions = Field(default_factory=MasksOptions,
                                  description="the mask builder's options: params, delta, device, max_in_flight")
    learned: LearnedSection = Field(default_factory=LearnedSection,
                                    description="learned FFN-channel masks (Persona-Pruner), off by default")

    @field_validator("methods", "baselines")
    @classmethod
    def _known_methods(cls, v, info):
        if info.field_name == "methods":
            non_empty(v)
        return check_names(v, METHODS, "method")

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v):
        return fractions(v)

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        if v is not None:
            try:
                budget = Budget.from_value(v)
            except (ValueError, TypeError) as err:
                raise ValueError(f"expected null, a ratio or a budget mapping ({err})") from None
            check_general_text(budget.ppl_text, "ppl_text")  # a missing validation text stops the config
        return v

    @field_validator("granularities", "allocations")
    @classmethod
    def _among_registered(cls, v, info):
        known = GRANULARITIES if info.field_name == "granularities" else ALLOCATIONS
        non_empty(v)
        bad = [g for g in v if g not in known]
        if bad:
            raise ValueError(f"expected {info.field_name} among {', '.join(known)} (bad: {bad})")
        return v


class EvaluateSection(Section):
    enabled: Bool = Field(True, description="run the evaluation stage")
    conditions: TextList | None = Field(None, description="conditions to score (null: every one but dense+steer, "
                                                           "which needs residual statistics)")
    options: EvaluateOptions = Field(default_factory=EvaluateOptions,
                                     description="fields of EvalConfig (metrics, max_statements, ...) and the "
                                                 "evaluator pool (actors, cpus_per_actor, device_map)")

    @field_validator("conditions")
    @classmethod
    def _known_conditions(cls, v):
        if v is not None:
            non_empty(v)
        return check_names(v, CONDITIONS, "condition")

    @model_validator(mode="after")
    def _builds(self):
        fields = self.options.eval_fields()
        if self.conditions:
            fields["conditions"] = tuple(self.conditions)
        if self.enabled:  # its own checks (the judge needs settings, sizes >= 1, ...) at load time, every one
            problems = dataclass_problems(EvalConfig, fields, [k for k in fields if k != "conditions"])
            raise_all("EvaluateSection", [(("options", *loc) if loc else loc, msg) for loc, msg in problems],
                      {"options": fields})
        return self


class ResourcesSection(Section):
    """How much of the cluster the stages use (never part of the run id)."""

    calibrate_actors: PositiveInt | None = Field(
        None, description="calibration actors (null: one per GPU, else as many CPU slots as are free, up to 2)")
    schedule_timeout_s: float = Field(300.0, gt=0, description="seconds to wait for a first actor to start "
                                                               "before failing with a clear message")


NON_WORK = ("store", "address", "nightly", "resources")  # where and how, not what: never in the run id


class PipelineConfig(Section):
    """calibrate -> build masks -> evaluate -> report, for one catalog and one model."""

    catalog: Text = Field("builtin", min_length=1, description="persona catalog: file, folder, URL, or 'builtin'")
    model: Text = Field("smollm2-135m", min_length=1,
                        description="model spec: smollm2-135m, tiny-random-llama, HF id or folder")
    revision: Text | None = Field(None, description="model revision (hub models; for tiny-random-llama the seed)")
    store: Text = Field("./persona-store", min_length=1,
                        description="artifact store URL: folder, s3://bucket/prefix, memory://")
    address: Text | None = Field(None, description="Ray address (null: RAY_ADDRESS, else a local Ray)")
    personas: TextList | None = Field(None, description="persona ids to run (null: the whole catalog); "
                                                        "opposites are added")
    split: SplitSection = Field(default_factory=SplitSection,
                                description="how statement lists split into calibration/evaluation")
    calibrate: CalibrateSection = Field(default_factory=CalibrateSection, description="the calibration stage")
    masks: MasksSection = Field(default_factory=MasksSection, description="the mask building stage")
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection, description="the evaluation stage and report")
    resources: ResourcesSection = Field(default_factory=ResourcesSection,
                                        description="cluster resources the stages use")

    @field_validator("store", "catalog")
    @classmethod
    def _no_credentials(cls, v, info):
        problem = url_userinfo_problem(v, f"{info.field_name} URL")
        if problem:
            raise ValueError(problem)
        return v

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def work_dict(self) -> dict:
        """What determines the artifacts (not where they go or which cluster runs them).

        The options sections count as given (unset options are not written), which keeps the run ids
        of configs written before the options were typed.
        """
        d = self.model_dump(mode="json", exclude=set(NON_WORK))
        for name in ("calibrate", "masks", "evaluate"):
            d[name]["options"] = getattr(self, name).options.model_dump(mode="json", exclude_unset=True)
        if d["masks"].get("budget") is None:  # a knob added later counts only when set: old run ids stay
            d["masks"].pop("budget", None)
        if not self.masks.learned.enabled:  # likewise: learned masks count only when they are learned
            d["masks"].pop("learned", None)
        return d

    @property
    def hash(self) -> str:
        return content_hash(self.work_dict())


class NightlySection(Section):
    name: Text = Field("nightly", min_length=1,
                       description="name of the schedule: its lease and its 'last successful run' pointer")
    lease_ttl_s: PositiveInt = Field(3600, description="seconds a lease lives without renewal (a crashed run "
                                                       "blocks at most this)")
    renew_every_s: PositiveInt = Field(60, description="seconds between lease renewals while the run is alive "
                                                       "(less than lease_ttl_s)")
    repair: Bool = Field(False, description="verify stored artifacts and regenerate corrupt ones")

    @field_validator("name")
    @classmethod
    def _identifier(cls, v):
        if id_problem(v):
            raise ValueError(f"expected a name matching {ID_PATTERN} without '..'")
        return v

    @model_validator(mode="after")
    def _renew_before_expiry(self):
        if self.renew_every_s >= self.lease_ttl_s:
            raise ValueError(f"renew_every_s ({self.renew_every_s}) must be less than lease_ttl_s "
                             f"({self.lease_ttl_s}), or the lease expires between renewals and two runs overlap")
        return self


class NightlyConfig(PipelineConfig):
    """A pipeline config plus a `nightly:` section."""

    nightly: NightlySection = Field(default_factory=NightlySection, description="the nightly schedule")


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path, cls: type = PipelineConfig, overrides: dict[str, Any] | None = None):
    """Read, validate and return a config of type `cls`; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"{path}: {path.stat().st_size} bytes; a config is at most {MAX_CONFIG_BYTES}"])
        text = path.read_text()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read config ({err.strerror or err})"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: not UTF-8 text ({err})"]) from None
    return parse_config(text, str(path), cls, overrides)


def parse_config(text: str, shown: str = "<config>", cls: type = PipelineConfig,
                 overrides: dict[str, Any] | None = None):
    """A config from YAML text (`shown` names it in problems); `overrides` set dotted keys first."""
    raw, lines = read_yaml(text, shown)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{shown}:{lines.get('', 1)}: a config is a mapping of keys, got {type(raw).__name__}"])
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return _validate(cls, raw, shown, lines)


def from_dict(cls: type, raw: dict, shown: str = "<dict>"):
    """A config from plain Python (problems carry no line numbers)."""
    return _validate(cls, raw, shown, {})


def _validate(cls: type, raw: dict, shown: str, lines: dict[str, int]):
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(located_problems(cls, err, shown, lines)) from None


def _set_dotted(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    cur = raw
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = cur[p] = {}
        cur = nxt
    cur[parts[-1]] = value


# ---------------------------------------------------------------------------- documentation


def describe(cls: type = NightlyConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML, help) for every knob, in declaration order (options as one row)."""
    rows = []
    for name, f in cls.model_fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        ann = f.annotation
        one_row = name == "options" or getattr(ann, "ONE_ROW", False)  # a dataclass's fields: one row
        if isinstance(ann, type) and issubclass(ann, Section) and not one_row:
            rows.extend(describe(ann, dotted))
            continue
        default = {} if one_row else (f.get_default(call_default_factory=True))
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json", exclude_unset=True)
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((dotted, shown, f.description or ""))
    return rows


def to_yaml(cfg) -> str:
    """A config as YAML, every knob written out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
