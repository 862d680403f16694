"""Pipeline and nightly configs: YAML read into typed pydantic models, validated once, at load.

Every knob is a model field with a default and a one-line description; a YAML
file only names what it changes. Every section forbids unknown keys, and the
stage options are typed models too (``calibrate.options`` has the fields of
`calibration.CalibConfig`, ``evaluate.options`` those of `evaluate.EvalConfig`
plus the evaluator pool's settings, ``masks.options`` the mask builder's).
Method names, granularities, allocations, method parameters, metrics and
conditions are checked against their registries here. Loading reports every
problem at once, each naming the file, the line and the dotted key::

    configs/x.yaml:7: masks.sparsity: unknown key (did you mean 'sparsities'?)
    configs/x.yaml:9: calibrate.shard_size: expected an integer, got 'many'

`describe()` lists every knob with its default (the README's table is checked
against it by the tests). This module never imports Ray.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      create_model, field_validator, model_validator)

from persona_core.store.hashing import content_hash

MAX_CONFIG_BYTES = 1 << 20  # a config larger than this is not a config


class ConfigError(ValueError):
    """A config that cannot be used; `problems` lists every reason, each located."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------- value types


def _as_text(v):
    """Numbers written where text is meant (``revision: 1234``) stay text; anything else is checked as given."""
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _as_list(v):
    """A single value stands for a list of one."""
    return [v] if isinstance(v, (str, int, float)) and not isinstance(v, bool) else v


Text = Annotated[str, BeforeValidator(_as_text)]
Int = StrictInt
Bool = StrictBool
PositiveInt = Annotated[StrictInt, Field(ge=1)]


def _strict(tp):
    """A dataclass field's type with pydantic's strict scalars (no 'yes' for true, no '5' for 5)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return StrictBool
    if tp is int:
        return StrictInt
    if tp is str:
        return Text
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return typing.Union[tuple(_strict(a) for a in args)]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return Annotated[tuple[_strict(args[0]), ...], BeforeValidator(_as_list)]
    if origin is list:
        return Annotated[list[_strict(args[0])], BeforeValidator(_as_list)]
    return tp


def _did_you_mean(word: str, known: typing.Iterable[str]) -> str:
    known = list(known)
    near = difflib.get_close_matches(str(word), known, n=1)
    return f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(known)})"


def _check_names(values, registry: typing.Iterable[str], what: str):
    known = list(registry)
    for v in values or ():
        if v not in known:
            raise ValueError(f"unknown {what} {v!r}{_did_you_mean(v, known)}")
    return values


class Section(BaseModel):
    """A config section: unknown keys are errors; an empty section (``masks:``) keeps its defaults."""

    model_config = ConfigDict(extra="forbid", validate_default=False)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_keep_defaults(cls, data):
        if data is None:
            return {}
        if isinstance(data, dict):
            sections = {n for n, f in cls.model_fields.items()
                        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
            return {k: v for k, v in data.items() if not (k in sections and v is None)}
        return data


def _options_model(name: str, dc: type, doc: str, extra: dict[str, tuple[Any, Any]] | None = None) -> type[Section]:
    """A typed options section with the fields of dataclass `dc` (declared once, there) plus `extra`."""
    hints = typing.get_type_hints(dc)
    fields: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(dc):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        fields[f.name] = (_strict(hints[f.name]), default)
    fields.update(extra or {})
    model = create_model(name, __base__=Section, __doc__=doc, **fields)
    return model


# ---------------------------------------------------------------------------- the registries


def _registries():
    """Method, granularity, allocation, metric and condition names (imported here, at load time)."""
    from persona_core.eval import engine as evaluate
    from persona_core.masks import methods as masks
    from persona_core.eval import metrics

    return masks, metrics.METRICS, evaluate.CONDITIONS


def _calib_options() -> type[Section]:
    from persona_core.calib.config import CalibConfig

    model = _options_model("CalibrateOptions", CalibConfig, "Fields of calibration.CalibConfig.")

    class CalibrateOptions(model):
        @model_validator(mode="after")
        def _builds(self):
            CalibConfig(**dict(self))  # its own checks (sizes >= 1, ...) at load time
            return self

    return CalibrateOptions


def _eval_options() -> type[Section]:
    from persona_core.eval.engine import EvalConfig

    pool = {"actors": (StrictInt | None, Field(None, ge=1)),
            "cpus_per_actor": (StrictInt | None, Field(None, ge=1)),
            "device_map": (typing.Literal["auto"] | None, None)}
    model = _options_model("EvaluateOptions", EvalConfig, "Fields of evaluate.EvalConfig, and the evaluator "
                           "pool (actors, cpus_per_actor, device_map).", pool)

    class EvaluateOptions(model):
        @field_validator("metrics", check_fields=False)
        @classmethod
        def _known_metrics(cls, v):
            return _check_names(v, _registries()[1], "metric")

        @field_validator("conditions", check_fields=False)
        @classmethod
        def _known_conditions(cls, v):
            return _check_names(v, _registries()[2], "condition")

        def eval_fields(self) -> dict:
            """The options that are EvalConfig fields, as given (the rest size the pool)."""
            return {k: getattr(self, k) for k in self.model_fields_set if k not in pool}

        def pool(self) -> dict:
            return {k: getattr(self, k) for k in pool}

    return EvaluateOptions


class MasksOptions(Section):
    """What the mask builder takes besides methods, sparsities, granularities and allocations."""

    params: dict[str, dict[str, Any]] = Field({}, description="method parameters: {method: {key: value}}")
    delta: Bool = Field(False, description="store a pair's second mask as a delta against the first")
    device: Text | None = Field(None, description="device for scoring in the tasks (default cpu)")
    max_in_flight: PositiveInt = Field(256, description="tasks submitted at once")

    @field_validator("params")
    @classmethod
    def _known_params(cls, v):
        masks = _registries()[0]
        for method, params in v.items():
            _check_names([method], masks.REGISTRY, "method")
            known = masks.REGISTRY[method].defaults
            for key in params:
                if key not in known:
                    raise ValueError(f"{method}: unknown parameter {key!r}{_did_you_mean(key, known)}")
        return v


def _learn_options() -> tuple[type[Section], type[Section]]:
    from persona_core.learn.learner import DataConfig, LearnConfig

    knobs = _options_model("LearnKnobs", LearnConfig, "Fields of learn.LearnConfig (objective and sparsity come "
                           "from masks.learned.objectives and the sparsities).")
    data = _options_model("LearnData", DataConfig, "Fields of learn.DataConfig: how the training data is made.")

    class LearnKnobs(knobs):
        ONE_ROW: typing.ClassVar[bool] = True

        @model_validator(mode="after")
        def _builds(self):
            given = sorted({"objective", "sparsity"} & self.model_fields_set)
            if given:
                raise ValueError(f"{', '.join(given)}: set masks.learned.objectives / sparsities instead")
            LearnConfig(**{k: v for k, v in dict(self).items() if k not in ("objective", "sparsity")})
            return self

    class LearnData(data):
        ONE_ROW: typing.ClassVar[bool] = True

        @model_validator(mode="after")
        def _builds(self):
            DataConfig(**dict(self))
            return self

    return LearnKnobs, LearnData


CalibrateOptions = _calib_options()
EvaluateOptions = _eval_options()
LearnKnobs, LearnData = _learn_options()


class LearnedSection(Section):
    """Persona-Pruner's learned FFN-channel masks, learned in the masks stage after the built masks."""

    enabled: Bool = Field(False, description="learn masks (persona_jobs.learn_masks) for every persona")
    objectives: Annotated[list[Text], BeforeValidator(_as_list)] = Field(
        ["with-prompt"], description="with-prompt and/or prompt-free")
    sparsities: Annotated[list[Annotated[float, Field(strict=True)]], BeforeValidator(_as_list)] | None = Field(
        None, description="fractions of MLP channels removed (null: masks.sparsities)")
    knobs: LearnKnobs = Field(default_factory=LearnKnobs, description="learner knobs (steps, lr, batch_size, ...)")
    data: LearnData = Field(default_factory=LearnData, description="training data (examples, max_new_tokens, ...)")
    export: Bool = Field(False, description="also store the physically smaller model")
    actors: Annotated[StrictInt, Field(ge=1)] | None = Field(None, description="learner actors (null: one per "
                                                                                "GPU, else 1)")

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v):
        from persona_core.learn.learner import OBJECTIVES

        if not v:
            raise ValueError("expected a non-empty list")
        return _check_names(v, OBJECTIVES, "objective")

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v):
        return v if v is None else _fractions(v)

    def methods(self) -> list[str]:
        """The mask methods (store names) it produces."""
        return [f"learned-{o}" for o in self.objectives] if self.enabled else []


# ---------------------------------------------------------------------------- the sections


def _fractions(v):
    bad = [s for s in v if not 0.0 < s < 1.0]
    if not v or bad:
        raise ValueError(f"expected sparsities in (0, 1) (bad: {bad})" if bad else "expected a non-empty list")
    return v


def _non_empty(v):
    if not v:
        raise ValueError("expected a non-empty list")
    return v


class SplitSection(Section):
    eval_fraction: float = Field(0.3, gt=0.0, lt=1.0, strict=True,
                                 description="share of a plain statement list held out for evaluation")
    seed: Int = Field(0, description="seed of the deterministic calibration/evaluation split")
    max_calibration: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="cap on calibration texts per persona (null: all)")
    max_evaluation: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None, description="cap on evaluation texts per persona (null: all)")


class CalibrateSection(Section):
    shard_size: PositiveInt = Field(64, description="calibration texts per unit of work (one actor call, one "
                                                    "Parquet part)")
    include_general: Bool = Field(True, description="also calibrate the neutral `general` reference set")
    options: CalibrateOptions = Field(default_factory=CalibrateOptions,
                                      description="fields of calibration.CalibConfig (batch_size, max_length, ...)")


TextList = Annotated[list[Text], BeforeValidator(_as_list)]
FloatList = Annotated[list[Annotated[float, Field(strict=True)]], BeforeValidator(_as_list)]


class MasksSection(Section):
    methods: TextList = Field(["wanda", "contrastive-wanda"], description="mask methods to build")
    sparsities: FloatList = Field([0.3, 0.5], description="fractions of weights removed")
    granularities: TextList = Field(["unstructured"], description="unstructured, 2:4, 4:8 or ffn-channels")
    allocations: TextList = Field(["uniform"], description="sparsity across layers: uniform, owl (outlier-weighted) and/or focus "
                                                           "(the layers where a pair differs most)")
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
            _non_empty(v)
        return _check_names(v, _registries()[0].REGISTRY, "method")

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v):
        return _fractions(v)

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        from persona_core.masks.budget import Budget

        if v is not None:
            try:
                Budget.from_value(v)
            except (ValueError, TypeError) as err:
                raise ValueError(f"expected null, a ratio or a budget mapping ({err})") from None
        return v

    @field_validator("granularities", "allocations")
    @classmethod
    def _among_registered(cls, v, info):
        masks = _registries()[0]
        known = masks.GRANULARITIES if info.field_name == "granularities" else masks.ALLOCATIONS
        _non_empty(v)
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
            _non_empty(v)
        return _check_names(v, _registries()[2], "condition")

    @model_validator(mode="after")
    def _builds(self):
        from persona_core.eval.engine import EvalConfig

        fields = self.options.eval_fields()
        if self.conditions:
            fields["conditions"] = tuple(self.conditions)
        if self.enabled:
            EvalConfig(**fields)  # its own checks (the judge needs settings, sizes >= 1, ...) at load time
        return self


class ResourcesSection(Section):
    """How much of the cluster the stages use (never part of the run id)."""

    calibrate_actors: Annotated[StrictInt, Field(ge=1)] | None = Field(
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

    @field_validator("name")
    @classmethod
    def _identifier(cls, v):
        from persona_core.store.ids import ID_PATTERN, id_problem

        if id_problem(v):
            raise ValueError(f"expected a name matching {ID_PATTERN} without '..'")
        return v
    lease_ttl_s: PositiveInt = Field(3600, description="seconds a lease lives without renewal (a crashed run "
                                                       "blocks at most this)")
    renew_every_s: PositiveInt = Field(60, description="seconds between lease renewals while the run is alive "
                                                       "(less than lease_ttl_s)")
    repair: Bool = Field(False, description="verify stored artifacts and regenerate corrupt ones")

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


def read_yaml(text: str, shown: str) -> tuple[Any, dict[str, int]]:
    """YAML text -> (plain Python, the line of every dotted key); duplicate keys and bad YAML are ConfigErrors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark, ctx = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        where = f"{shown}:{mark.line + 1}" if mark else shown
        what = getattr(err, "problem", None) or str(err)
        if ctx is not None and getattr(err, "context", None):
            what += f"; {err.context} at line {ctx.line + 1}"
        raise ConfigError([f"{where}: not valid YAML ({what})"]) from None
    if node is None:
        return None, {}
    lines: dict[str, int] = {}
    problems: list[str] = []
    constructor = yaml.SafeLoader("")
    try:
        value = _plain(node, "", lines, problems, shown, constructor)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError([f"{shown}:{mark.line + 1 if mark else '?'}: not valid YAML "
                           f"({getattr(err, 'problem', None) or err})"]) from None
    if problems:
        raise ConfigError(problems)
    return value, lines


def _plain(node, prefix: str, lines: dict[str, int], problems: list[str], shown: str, constructor):
    """YAML node -> plain Python, remembering the line of every dotted key and refusing duplicate keys."""
    lines.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        first: dict = {}
        for k, v in node.value:
            key = constructor.construct_object(k, deep=True)
            key = key if isinstance(key, (str, int, float, bool)) or key is None else str(key)
            dotted = f"{prefix}.{key}" if prefix else str(key)
            line = k.start_mark.line + 1
            if key in first:
                problems.append(f"{shown}:{line}: {dotted}: key given twice (first at line {first[key]})")
                continue
            first[key] = line
            lines[dotted] = line
            out[key] = _plain(v, dotted, lines, problems, shown, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(v, f"{prefix}[{i}]", lines, problems, shown, constructor) for i, v in enumerate(node.value)]
    return constructor.construct_object(node, deep=True)


def parse_config(text: str, shown: str = "<config>", cls: type = PipelineConfig,
                 overrides: dict[str, Any] | None = None):
    raw, lines = read_yaml(text, shown)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{shown}:{lines.get('', 1)}: a config is a mapping of keys, got {type(raw).__name__}"])
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return _validate(cls, raw, shown, lines)


def from_dict(cls: type, raw: dict, shown: str = "<dict>"):
    return _validate(cls, raw, shown, {})


def _validate(cls: type, raw: dict, shown: str, lines: dict[str, int]):
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_problems(cls, err, shown, lines)) from None


def _set_dotted(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    cur = raw
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = cur[p] = {}
        cur = nxt
    cur[parts[-1]] = value


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "constrained-", "nullable", "union[")) and part not in (
                "int", "str", "float", "bool", "list", "tuple", "none"):
            out += f".{part}" if out else str(part)
    return out


def _where(shown: str, lines: dict[str, int], dotted: str) -> str:
    probe = dotted
    while probe and probe not in lines:
        probe = probe.rpartition("[")[0] if probe.endswith("]") else probe.rpartition(".")[0]
    line = lines.get(probe) or lines.get("")
    return f"{shown}:{line}" if line else shown


_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "bool_type": "true or false", "bool_parsing": "true or false", "float_type": "a number",
             "float_parsing": "a number", "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
             "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
             "literal_error": None, "none_required": "null"}


def _model_at(cls: type, loc: tuple):
    """The pydantic model at a location (to suggest its field names)."""
    model = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            continue
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    return model


def _problems(cls: type, err: ValidationError, shown: str, lines: dict[str, int]) -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        loc, kind = tuple(e["loc"]), e["type"]
        dotted = _dotted(loc)
        where = _where(shown, lines, dotted)
        got = _show(e.get("input"))
        if kind == "extra_forbidden":
            known = [n for n in _model_at(cls, loc[:-1]).model_fields]
            msg = f"unknown key{_did_you_mean(loc[-1], known)}"
        elif kind in ("value_error", "assertion_error"):
            msg = str(e["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if msg.startswith("expected") and "bad:" not in msg:
                msg += f", got {got}"
        elif kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}[kind]
            bound = next(iter(e.get("ctx", {}).values()), "?")
            msg = f"expected a number {op} {bound}, got {got}"
        elif kind in ("string_too_short",):
            msg = f"expected a non-empty string, got {got}"
        elif kind == "missing":
            msg = "missing"
        elif _EXPECTED.get(kind):
            msg = f"expected {_EXPECTED[kind]}, got {got}"
        else:
            msg = f"{e['msg']}, got {got}"
        line = f"{where}: {dotted}: {msg}" if dotted else f"{where}: {msg}"
        if line not in out:
            out.append(line)
    return out


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


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
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
