"""A config's YAML read with the line of every dotted key, and validation problems located at those lines.

Every problem names the file, the line and the dotted key::

    configs/x.yaml:7: masks.sparsity: unknown key (did you mean 'sparsities'?)
    configs/x.yaml:9: calibrate.shard_size: expected an integer, got 'many'
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from persona_core.run.config_fields import did_you_mean
from persona_core.store.yaml_bounds import YamlBoundsError, compose


class ConfigError(ValueError):
    """A config that cannot be used; `problems` lists every reason, each located."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def read_yaml(text: str, shown: str) -> tuple[Any, dict[str, int]]:
    """YAML text -> (plain Python, the line of every dotted key); duplicate keys, bad YAML and YAML over
    the bounds (alias bombs, recursive aliases, deep nesting: `persona_core.store.yaml_bounds`) are ConfigErrors."""
    try:
        node, loader = compose(text)
        loader.dispose()
    except YamlBoundsError as err:
        raise ConfigError([f"{shown}:{err.line or 1}: not a usable config ({err})"]) from None
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


def located_problems(cls: type, err: ValidationError, shown: str, lines: dict[str, int]) -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        loc, kind = tuple(e["loc"]), e["type"]
        dotted = _dotted(loc)
        where = _where(shown, lines, dotted)
        got = _show(e.get("input"))
        if kind == "extra_forbidden":
            known = [n for n in _model_at(cls, loc[:-1]).model_fields]
            msg = f"unknown key{did_you_mean(loc[-1], known)}"
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
