"""Command lines into configs: every subcommand's flags are overrides of the one config schema.

`run` and `nightly` read a YAML config (``--config``) and put their flags on top
(`OVERRIDES`); the standalone subcommands (`calibrate`, `build-masks`,
`learn-masks`, `evaluate`) build their own overrides from their flags and read
no file. Either way the result is a validated `PipelineConfig` that
`persona_core.run.plan.make_plan` resolves into the plan the stages receive.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from persona_core.errors import UserError
from persona_core.run.config import ConfigError, NightlyConfig, PipelineConfig, load_config, parse_config
from persona_core.store.ids import id_problem
from persona_jobs.common import add_common, add_list

# flag (argparse dest) -> the config key it overrides (run, nightly): each override is declared once, here
OVERRIDES = {"catalog": "catalog", "model": "model", "revision": "revision", "store": "store",
             "address": "address", "personas": "personas", "methods": "masks.methods",
             "sparsities": "masks.sparsities", "granularities": "masks.granularities",
             "allocations": "masks.allocations"}
WHERE = ("catalog", "model", "revision", "store", "address")  # what every standalone subcommand names alike


def id_arg(what: str):
    """An argparse type for a user-given id (persona id, run id): the id grammar at parse time, so a bad
    value is one line and exit 2 before anything is read or written (``_latest``, ``../x``, ``a/b``)."""

    def parse(text: str) -> str:
        problem = id_problem(text, what)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return text

    parse.__name__ = what.replace(" ", "_")
    return parse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML config (every knob: docs/operations.md); a shipped one by name, e.g. configs/demo.yaml")
    add_common(p, catalog=True)
    add_list(p, "--personas", metavar="ID", help="persona ids (default: all); opposites come along")
    add_list(p, "--methods", "--method", dest="methods", metavar="M", help="mask methods (masks.methods)")
    add_list(p, "--sparsities", "--sparsity", dest="sparsities", item_type=float, metavar="S",
             help="sparsities, e.g. 0.3,0.5 (masks.sparsities)")
    add_list(p, "--granularities", "--granularity", dest="granularities", metavar="G",
             help="unstructured, 2:4, 4:8, ffn-channels (masks.granularities)")
    add_list(p, "--allocations", "--allocation", dest="allocations", metavar="A",
             help="uniform and/or owl (masks.allocations)")
    p.add_argument("--no-evaluate", action="store_true", help="stop after building masks")
    p.add_argument("--repair", action="store_true", help="verify stored artifacts; regenerate corrupt ones")
    p.add_argument("--force", action="store_true", help="run every stage again (stages still skip stored work)")


def config_path(path: str) -> Path:
    """`path` as given, else the shipped config of that name (a non-editable install carries configs/)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parent / "configs"):  # installed package; source checkout
        shipped = folder / given.name
        if given.parent.name in ("", "configs") and shipped.is_file():
            return shipped
    return given


def load(path: str | None, overrides: dict[str, Any], cls: type = PipelineConfig) -> PipelineConfig:
    """The config file (if any) with `overrides` (dotted keys) on top; ConfigError -> UserError."""
    try:
        if path:
            return load_config(config_path(path), cls, overrides)
        return parse_config("", "<command line>", cls, overrides)
    except ConfigError as err:
        raise UserError("invalid config:\n" + "\n".join(err.problems)) from None


def config_from_args(args, nightly: bool = False) -> PipelineConfig:
    """`run` / `nightly`: the config file (if any) with the command-line flags on top."""
    overrides = {key: getattr(args, dest) for dest, key in OVERRIDES.items() if getattr(args, dest, None)}
    if getattr(args, "no_evaluate", False):
        overrides["evaluate.enabled"] = False
    return load(args.config, overrides, NightlyConfig if nightly else PipelineConfig)


def where_overrides(args) -> dict[str, Any]:
    """A standalone subcommand's catalog, model, revision, store and address, as overrides (given ones only)."""
    return {key: getattr(args, key) for key in WHERE if getattr(args, key, None) is not None}
