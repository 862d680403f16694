"""The building blocks of the typed config: strict value types, `Section` (unknown keys are
errors, an empty section keeps its defaults), options sections made from the library's
dataclasses, and checks of names against the registries."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any, Iterable

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, create_model, model_validator

from persona_core.registry import suggest


def as_text(v):
    """Numbers written where text is meant (``revision: 1234``) stay text; anything else is checked as given."""
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def as_list(v):
    """A single value stands for a list of one."""
    return [v] if isinstance(v, (str, int, float)) and not isinstance(v, bool) else v


Text = Annotated[str, BeforeValidator(as_text)]
Int = StrictInt
Bool = StrictBool
PositiveInt = Annotated[StrictInt, Field(ge=1)]
TextList = Annotated[list[Text], BeforeValidator(as_list)]
FloatList = Annotated[list[Annotated[float, Field(strict=True)]], BeforeValidator(as_list)]


def strict_type(tp):
    """A dataclass field's type with pydantic's strict scalars (no 'yes' for true, no '5' for 5)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return StrictBool
    if tp is int:
        return StrictInt
    if tp is str:
        return Text
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(strict_type(a) for a in args)]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return Annotated[tuple[strict_type(args[0]), ...], BeforeValidator(as_list)]
    if origin is list:
        return Annotated[list[strict_type(args[0])], BeforeValidator(as_list)]
    return tp


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, else `` (known: a, b, ...)``."""
    known = list(known)
    return suggest(str(word), known) or f" (known: {', '.join(known)})"


def check_names(values, registry: Iterable[str], what: str):
    """`values` unchanged when each is a name in `registry` (a `Registry`, a mapping or a tuple of names)."""
    known = list(registry)
    for v in values or ():
        if v not in known:
            raise ValueError(f"unknown {what} {v!r}{did_you_mean(v, known)}")
    return values


def fractions(v):
    """A non-empty list of sparsities, each in (0, 1)."""
    bad = [s for s in v if not 0.0 < s < 1.0]
    if not v or bad:
        raise ValueError(f"expected sparsities in (0, 1) (bad: {bad})" if bad else "expected a non-empty list")
    return v


def non_empty(v):
    if not v:
        raise ValueError("expected a non-empty list")
    return v


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


def options_model(name: str, dc: type, doc: str, extra: dict[str, tuple[Any, Any]] | None = None) -> type[Section]:
    """A typed options section with the fields of dataclass `dc` (declared once, there) plus `extra`."""
    hints = typing.get_type_hints(dc)
    fields: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(dc):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        fields[f.name] = (strict_type(hints[f.name]), default)
    fields.update(extra or {})
    return create_model(name, __base__=Section, __doc__=doc, **fields)
