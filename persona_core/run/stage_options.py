"""The typed ``options`` of each stage, made from the library's own config dataclasses.

``calibrate.options`` has the fields of `CalibConfig`, ``evaluate.options`` those of `EvalConfig`
plus the evaluator pool's settings, ``masks.options`` the mask builder's, and
``masks.learned.knobs`` / ``.data`` those of `LearnConfig` / `DataConfig`. Each field is declared
once, in its dataclass; each options section also builds its dataclass at load time, so the
dataclass's own checks report there.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import Field, StrictInt, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from persona_core.calib.config import CalibConfig
from persona_core.eval.conditions import CONDITIONS
from persona_core.eval.config import EvalConfig
from persona_core.eval.metrics import METRICS
from persona_core.learn.config import DataConfig, LearnConfig
from persona_core.masks.methods import METHODS
from persona_core.run.config_fields import (Bool, PositiveInt, Section, Text, check_names, did_you_mean,
                                            options_model)


def dataclass_problems(dc: type, values: dict[str, Any], given: typing.Iterable[str]) -> list[tuple[tuple, str]]:
    """(location, message) for every problem of ``dc(**values)``, not just its first: each `given` field
    is built alone (the others at their defaults) to name its own problem; a problem no single field
    has (two fields that disagree) is reported for the whole section."""
    try:
        dc(**values)
        return []
    except (TypeError, ValueError) as err:
        whole = str(err)
    out = []
    for name in given:
        try:
            dc(**{name: values[name]})
        except (TypeError, ValueError) as err:
            out.append(((name,), str(err)))
    return out or [((), whole)]


def raise_all(title: str, problems: list[tuple[tuple, str]], values: dict[str, Any]) -> None:
    """Every problem at once, each at its own key (`located_problems` gives each its file:line)."""
    if problems:
        raise ValidationError.from_exception_data(title, [
            InitErrorDetails(type=PydanticCustomError("value_error", "{msg}", {"msg": msg}), loc=loc,
                             input=values.get(loc[0]) if loc else None) for loc, msg in problems])


class CalibrateOptions(options_model("CalibrateOptions", CalibConfig, "Fields of calibration.CalibConfig.")):
    @model_validator(mode="after")
    def _builds(self):
        values = dict(self)  # its own checks (sizes >= 1, ...) at load time, every one reported
        raise_all("CalibrateOptions", dataclass_problems(CalibConfig, values, self.model_fields_set), values)
        return self


EVALUATOR_POOL = {"actors": (StrictInt | None, Field(None, ge=1)),
                  "cpus_per_actor": (StrictInt | None, Field(None, ge=1)),
                  "device_map": (typing.Literal["auto"] | None, None)}


class EvaluateOptions(options_model("EvaluateOptions", EvalConfig, "Fields of evaluate.EvalConfig, and the "
                                    "evaluator pool (actors, cpus_per_actor, device_map).", EVALUATOR_POOL)):
    @field_validator("metrics", check_fields=False)
    @classmethod
    def _known_metrics(cls, v):
        return check_names(v, METRICS, "metric")

    @field_validator("conditions", check_fields=False)
    @classmethod
    def _known_conditions(cls, v):
        return check_names(v, CONDITIONS, "condition")

    def eval_fields(self) -> dict:
        """The options that are EvalConfig fields, as given (the rest size the pool)."""
        return {k: getattr(self, k) for k in self.model_fields_set if k not in EVALUATOR_POOL}

    def pool(self) -> dict:
        return {k: getattr(self, k) for k in EVALUATOR_POOL}


class MasksOptions(Section):
    """What the mask builder takes besides methods, sparsities, granularities and allocations."""

    params: dict[str, dict[str, Any]] = Field({}, description="method parameters: {method: {key: value}}")
    delta: Bool = Field(False, description="store a pair's second mask as a delta against the first")
    device: Text | None = Field(None, description="device for scoring in the tasks (default cpu)")
    max_in_flight: PositiveInt = Field(256, description="tasks submitted at once")

    @field_validator("params")
    @classmethod
    def _known_params(cls, v):
        problems = []  # every unknown method and parameter, one line each
        for method, params in v.items():
            try:
                check_names([method], METHODS, "method")
            except ValueError as err:
                problems.append(((), str(err)))
                continue
            known = METHODS[method].defaults
            hint = lambda key: did_you_mean(key, known) if known else " (it takes no parameters)"  # noqa: E731
            problems += [((), f"{method}: unknown parameter {key!r}{hint(key)}") for key in params if key not in known]
        raise_all("MasksOptions.params", problems, v)
        return v


class LearnKnobs(options_model("LearnKnobs", LearnConfig, "Fields of learn.LearnConfig (objective and sparsity "
                               "come from masks.learned.objectives and the sparsities).")):
    ONE_ROW: typing.ClassVar[bool] = True

    @model_validator(mode="after")
    def _builds(self):
        given = sorted({"objective", "sparsity"} & self.model_fields_set)
        if given:
            raise ValueError(f"{', '.join(given)}: set masks.learned.objectives / sparsities instead")
        values = {k: v for k, v in dict(self).items() if k not in ("objective", "sparsity")}
        raise_all("LearnKnobs", dataclass_problems(LearnConfig, values, self.model_fields_set), values)
        return self


class LearnData(options_model("LearnData", DataConfig, "Fields of learn.DataConfig: how the training data is "
                              "made.")):
    ONE_ROW: typing.ClassVar[bool] = True

    @model_validator(mode="after")
    def _builds(self):
        values = dict(self)
        raise_all("LearnData", dataclass_problems(DataConfig, values, self.model_fields_set), values)
        return self
