"""Pipeline and nightly configs: YAML files read into dataclasses, validated.

Every knob is a dataclass field with a default and a one-line ``help``; a YAML
file only names what it changes. Loading reports every problem at once, each
naming the file, the line and the dotted key::

    configs/x.yaml:7: masks.sparsity: unknown key (did you mean 'sparsities'?)
    configs/x.yaml:9: calibrate.shard_size: expected an integer >= 1, got 'many'

`describe()` lists every knob with its default (the README's table is checked
against it by the tests). This module never imports Ray.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .hashing import content_hash


class ConfigError(ValueError):
    """A config that cannot be used; `problems` lists every reason, each located."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def knob(default: Any, help: str, check: Callable[[Any], str | None] | None = None, **kw):
    """A config field: its default, a one-line help, and an optional value check.

    `check(value)` returns None when the value is fine, else what was expected.
    """
    meta = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def section(cls, help: str):
    return field(default_factory=cls, metadata={"help": help, "check": None})


# ---------------------------------------------------------------------------- checks


def positive(v) -> str | None:
    return None if v >= 1 else "an integer >= 1"


def fraction_list(v) -> str | None:
    if not v:
        return "a non-empty list of sparsities in (0, 1)"
    bad = [s for s in v if not 0.0 < s < 1.0]
    return f"sparsities in (0, 1) (bad: {bad})" if bad else None


def non_empty(v) -> str | None:
    return None if v else "a non-empty list"


def unit_fraction(v) -> str | None:
    return None if 0.0 < v < 1.0 else "a number in (0, 1)"


def non_empty_str(v) -> str | None:
    return None if str(v).strip() else "a non-empty string"


def identifier(v) -> str | None:
    """A name that becomes part of store keys: the persona id grammar (see catalog.id_problem)."""
    from .catalog import ID_PATTERN, id_problem

    return f"a name matching {ID_PATTERN} without '..'" if id_problem(v) else None


# The same tuples as persona_core.masks (tests check they agree); this module never imports torch.
GRANULARITIES = ("unstructured", "2:4", "4:8", "ffn-channels")
ALLOCATIONS = ("uniform", "owl")


def granularity_list(v) -> str | None:
    if not v:
        return "a non-empty list"
    bad = [g for g in v if g not in GRANULARITIES and not _is_nm(g)]
    return f"granularities among {', '.join(GRANULARITIES)} or N:M (bad: {bad})" if bad else None


def allocation_list(v) -> str | None:
    bad = [a for a in v or [] if a not in ALLOCATIONS]
    return "a non-empty list" if not v else (f"allocations among {', '.join(ALLOCATIONS)} (bad: {bad})" if bad else None)


def budget_value(v) -> str | None:
    from .budget import Budget

    try:
        Budget.from_value(v)
    except (ValueError, TypeError) as err:
        return f"null, a ratio or a budget mapping ({err})"
    return None


def _is_nm(g: str) -> bool:
    n, _, m = g.partition(":")
    return n.isdigit() and m.isdigit() and 0 < int(n) < int(m)


# ---------------------------------------------------------------------------- the configs


@dataclass
class SplitSection:
    eval_fraction: float = knob(0.3, "share of a plain statement list held out for evaluation", unit_fraction)
    seed: int = knob(0, "seed of the deterministic calibration/evaluation split")
    max_calibration: int | None = knob(None, "cap on calibration texts per persona (null: all)")
    max_evaluation: int | None = knob(None, "cap on evaluation texts per persona (null: all)")


@dataclass
class CalibrateSection:
    shard_size: int = knob(64, "calibration texts per unit of work (one actor call, one Parquet part)", positive)
    include_general: bool = knob(True, "also calibrate the neutral `general` reference set")
    options: dict[str, Any] = knob({}, "fields of calibration.CalibConfig (batch_size, max_length, ...)")


@dataclass
class MasksSection:
    methods: list[str] = knob(["wanda", "contrastive-wanda"], "mask methods to build", non_empty)
    sparsities: list[float] = knob([0.3, 0.5], "fractions of weights removed", fraction_list)
    granularities: list[str] = knob(["unstructured"], "unstructured, 2:4, 4:8 or ffn-channels", granularity_list)
    allocations: list[str] = knob(["uniform"], "sparsity across layers: uniform and/or owl (outlier-weighted)",
                                  allocation_list)
    baselines: list[str] = knob(["magnitude", "wanda-general"], "plain-pruning baselines built and scored alongside")
    budget: dict[str, Any] | float | None = knob(
        None, "capability budget, e.g. {perplexity_ratio: 1.10}: search each pair's sparsity/strength (replaces "
        "sparsities); null: fixed sparsities", budget_value)
    options: dict[str, Any] = knob({}, "extra keyword arguments of build_masks.run (e.g. method params)")


@dataclass
class EvaluateSection:
    enabled: bool = knob(True, "run the evaluation stage")
    conditions: list[str] | None = knob(
        None, "conditions to score (null: every one but dense+steer, which needs residual statistics)")
    options: dict[str, Any] = knob({}, "extra keyword arguments of evaluate.run (metrics, batch sizes, ...)")


@dataclass
class PipelineConfig:
    """calibrate -> build masks -> evaluate -> report, for one catalog and one model."""

    catalog: str = knob("builtin", "persona catalog: file, folder, URL, or 'builtin'", non_empty_str)
    model: str = knob("smollm2-135m", "model spec: smollm2-135m, tiny-random-llama, HF id or folder", non_empty_str)
    revision: str | None = knob(None, "model revision (hub models only)")
    store: str = knob("./persona-store", "artifact store URL: folder, s3://bucket/prefix, memory://", non_empty_str)
    address: str | None = knob(None, "Ray address (null: RAY_ADDRESS, else a local Ray)")
    personas: list[str] | None = knob(None, "persona ids to run (null: the whole catalog); opposites are added")
    split: SplitSection = section(SplitSection, "how statement lists split into calibration/evaluation")
    calibrate: CalibrateSection = section(CalibrateSection, "the calibration stage")
    masks: MasksSection = section(MasksSection, "the mask building stage")
    evaluate: EvaluateSection = section(EvaluateSection, "the evaluation stage and report")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def work_dict(self) -> dict:
        """What determines the artifacts (not where they go or which cluster runs them)."""
        d = self.to_dict()
        for k in ("store", "address"):
            d.pop(k, None)
        d.pop("nightly", None)
        return d

    @property
    def hash(self) -> str:
        return content_hash(self.work_dict())


@dataclass
class NightlySection:
    name: str = knob("nightly", "name of the schedule: its lease and its 'last successful run' pointer", identifier)
    lease_ttl_s: int = knob(3600, "seconds a lease lives without renewal (a crashed run blocks at most this)", positive)
    renew_every_s: int = knob(60, "seconds between lease renewals while the run is alive", positive)
    repair: bool = knob(False, "verify stored artifacts and regenerate corrupt ones")


@dataclass
class NightlyConfig(PipelineConfig):
    """A pipeline config plus a `nightly:` section."""

    nightly: NightlySection = section(NightlySection, "the nightly schedule")


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path, cls: type = PipelineConfig, overrides: dict[str, Any] | None = None):
    """Read, validate and return a config of type `cls`; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read config ({err.strerror or err})"]) from None
    return parse_config(text, str(path), cls, overrides)


def parse_config(text: str, shown: str = "<config>", cls: type = PipelineConfig,
                 overrides: dict[str, Any] | None = None):
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark, ctx = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        where = f"{shown}:{mark.line + 1}" if mark else shown
        what = getattr(err, "problem", None) or str(err)
        if ctx is not None and getattr(err, "context", None):
            what += f"; {err.context} at line {ctx.line + 1}"
        raise ConfigError([f"{where}: not valid YAML ({what})"]) from None
    problems: list[str] = []
    if node is None:
        raw, lines = {}, {}
    else:
        lines = {}
        raw = _plain(node, "", lines)
        if not isinstance(raw, dict):
            raise ConfigError([f"{shown}:{node.start_mark.line + 1}: a config is a mapping of keys, "
                               f"got {type(raw).__name__}"])
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    obj = _build(cls, raw, "", shown, lines, problems)
    if problems:
        raise ConfigError(problems)
    return obj


def from_dict(cls: type, raw: dict, shown: str = "<dict>"):
    problems: list[str] = []
    obj = _build(cls, raw, "", shown, {}, problems)
    if problems:
        raise ConfigError(problems)
    return obj


def _plain(node, prefix: str, lines: dict[str, int]):
    """YAML node -> plain Python, remembering the line of every dotted key."""
    lines.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out = {}
        for k, v in node.value:
            key = str(yaml.safe_load(yaml.serialize(k)))
            dotted = f"{prefix}.{key}" if prefix else key
            lines[dotted] = k.start_mark.line + 1
            out[key] = _plain(v, dotted, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_plain(v, f"{prefix}[{i}]", lines) for i, v in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def _set_dotted(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    cur = raw
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


def _where(shown: str, lines: dict[str, int], dotted: str) -> str:
    probe = dotted
    while probe and probe not in lines:
        probe = probe.rpartition(".")[0]
    line = lines.get(probe) or lines.get("")
    return f"{shown}:{line}" if line else shown


def _build(cls, raw, prefix: str, shown: str, lines: dict[str, int], problems: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{_where(shown, lines, prefix)}: {prefix}: expected a mapping, got {_show(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(fields)})"
            problems.append(f"{_where(shown, lines, dotted)}: {dotted}: unknown key{hint}")
            continue
        f, tp = fields[key], hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build(tp, value, dotted, shown, lines, problems)
            continue
        ok, converted, expected = _coerce(value, tp)
        if ok and f.metadata.get("check") and converted is not None:
            expected = f.metadata["check"](converted)
            ok = expected is None
        if not ok:
            problems.append(f"{_where(shown, lines, dotted)}: {dotted}: expected {expected}, got {_show(value)}")
            continue
        values[key] = converted
    return cls(**values)


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _coerce(value, tp) -> tuple[bool, Any, str]:
    """(ok, converted value, what was expected)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None, ""
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            ok, conv, _ = _coerce(value, a)
            if ok:
                return True, conv, ""
        return False, None, " or ".join(_name(a) for a in inner) + (" or null" if type(None) in args else "")
    if tp is Any:
        return True, value, ""
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                value = [value]  # a single value stands for a list of one
            else:
                return False, None, _name(tp)
        out = []
        for item in value:
            ok, conv, _ = _coerce(item, args[0])
            if not ok:
                return False, None, _name(tp)
            out.append(conv)
        return True, out, ""
    if origin is dict:
        return (True, dict(value), "") if isinstance(value, dict) else (False, None, "a mapping")
    if tp is bool:
        return (True, value, "") if isinstance(value, bool) else (False, None, "true or false")
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (True, value, "") if ok else (False, None, "an integer")
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (True, float(value), "") if ok else (False, None, "a number")
    if tp is str:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        return (True, str(value), "") if ok else (False, None, "a string")
    return False, None, _name(tp)


def _name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        return f"a list of {_name(args[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


# ---------------------------------------------------------------------------- documentation


def describe(cls: type = NightlyConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML, help) for every knob, in declaration order."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], dotted))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((dotted, shown, f.metadata.get("help", "")))
    return rows


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
