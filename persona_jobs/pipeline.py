"""`persona-jobs run`: calibrate -> build masks -> evaluate -> report, in one command.

    persona-jobs run --config configs/demo.yaml
    persona-jobs run --catalog builtin --model tiny-random-llama --store ./persona-store --sparsities 0.5
    persona-jobs run --config pipeline.yaml --address ray://head:10001     # any Ray cluster

Every check that can fail on bad input (config, catalog, persona ids, method
names and options, store writable, model known, Ray reachable) runs before any
work starts. The run id is a hash of the inputs (see `persona_core.runs`): a
rerun with nothing changed finds the run's manifest and does no model work; an
interrupted run resumes after its last finished stage; each stage is itself
incremental by content hash. `--repair` reads back every stats part and mask
of the run, deletes the corrupt ones and regenerates only those.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from persona_jobs.cli import UserError
from persona_jobs.common import Summary, add_store_arg, ensure_ray
from persona_core import runs
from persona_core.catalog import GENERAL_ID, Catalog, CatalogError, SplitConfig, general_persona, load_catalog
from persona_core.config import ConfigError, NightlyConfig, PipelineConfig, load_config
from persona_core.hashing import content_hash
from persona_core.lease import Lease
from persona_core.models import model_key
from persona_core.store import Store, StoreError, StoreUnreachable, open_store

log = logging.getLogger(__name__)

STAGES = ("calibrate", "masks", "evaluate", "report")


# ---------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """A validated config with everything resolved that the stages need."""

    config: PipelineConfig
    store: Store
    catalog: Catalog  # the run's personas (selected ids plus their opposites)
    inputs: runs.RunInputs
    calib: object = None  # calibration.CalibConfig
    eval_options: dict = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.inputs.run_id

    @property
    def model(self) -> str:
        """The model spec every stage loads and keys by: ``<id>@<revision>`` when one is pinned."""
        from persona_core.models import with_revision

        return with_revision(self.config.model, self.config.revision)

    @property
    def persona_ids(self) -> list[str]:
        return list(self.catalog.personas)


def plan(cfg: PipelineConfig) -> Plan:
    """Resolve and check everything that needs no cluster and no model weights."""
    problems: list[str] = []
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

    calib = _calib_config(cfg, problems)
    _check_methods(cfg, problems)
    eval_options = _eval_options(cfg, problems)
    if problems:
        raise UserError("\n".join(problems))

    personas = {p.id: content_hash(p.content_hash, p.evaluation_hash) for p in catalog}
    if cfg.calibrate.include_general:
        personas[GENERAL_ID] = general_persona().content_hash
    work = cfg.work_dict()
    work.pop("catalog", None)  # the catalog counts by its personas' content, not by its path
    work["calib_hash"] = getattr(calib, "hash", None)
    inputs = runs.RunInputs(cfg.model, key, cfg.catalog, personas, work)
    return Plan(cfg, open_store(cfg.store), catalog, inputs, calib, eval_options)


def _calib_config(cfg: PipelineConfig, problems: list[str]):
    from persona_core.calibration import CalibConfig

    try:
        return CalibConfig(**cfg.calibrate.options)
    except (TypeError, ValueError) as err:
        known = ", ".join(CalibConfig.__dataclass_fields__)
        problems.append(f"calibrate.options: {err} (known: {known})")
        return CalibConfig()


def _check_methods(cfg: PipelineConfig, problems: list[str]) -> None:
    from persona_core import masks

    for section, names in (("masks.methods", cfg.masks.methods), ("masks.baselines", cfg.masks.baselines)):
        for m in names:
            try:
                masks.get_method(m)
            except ValueError as err:
                problems.append(f"{section}: {err}")
    for g in cfg.masks.granularities:
        if g not in masks.GRANULARITIES:
            problems.append(f"masks.granularities: unknown granularity {g!r} (use {', '.join(masks.GRANULARITIES)})")


def _eval_options(cfg: PipelineConfig, problems: list[str]) -> dict:
    options = dict(cfg.evaluate.options)
    if not cfg.evaluate.enabled:
        return options
    try:
        _eval_config(cfg, options)
    except ImportError:
        pass
    except (TypeError, ValueError) as err:
        problems.append(f"evaluate.options: {err}")
    return options


def preflight(p: Plan, *, need_ray: bool) -> None:
    """Store writable and Ray reachable, checked before any work (nothing is written but a probe)."""
    try:
        p.store.check_writable()
    except (StoreError, OSError, ValueError) as err:
        raise UserError(f"store {p.config.store} cannot be written: {err}") from None
    if need_ray:
        ensure_ray(p.config.address or os.environ.get("RAY_ADDRESS"))  # checks the address first


# ---------------------------------------------------------------------------- stages


def _call(fn, **kwargs):
    """Call a stage's `run` with the keyword arguments it accepts (the rest are logged)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    dropped = sorted(k for k in kwargs if k not in params)
    if dropped:
        log.debug("%s.%s does not take %s", fn.__module__, fn.__name__, ", ".join(dropped))
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def stage_calibrate(p: Plan) -> Summary:
    from persona_jobs import calibrate

    cfg = p.config
    return calibrate.run(p.catalog, p.model, p.store, personas=p.persona_ids, shard_size=cfg.calibrate.shard_size,
                         address=cfg.address, calib=p.calib, include_general=cfg.calibrate.include_general)


def stage_masks(p: Plan) -> Summary:
    from persona_jobs import build_masks

    cfg = p.config
    methods = list(dict.fromkeys([*cfg.masks.methods, *cfg.masks.baselines]))
    return _call(build_masks.run, store=p.store, model=p.model, methods=methods,
                 sparsities=list(cfg.masks.sparsities), granularities=tuple(cfg.masks.granularities),
                 allocations=tuple(cfg.masks.allocations), budget=cfg.masks.budget,
                 personas=p.persona_ids, catalog=p.catalog, address=cfg.address, calib_hash=p.calib.hash,
                 **cfg.masks.options)


def _eval_config(cfg: PipelineConfig, options: dict):
    """EvalConfig from the evaluate section; the options it does not know go to evaluate.run."""
    from persona_core.evaluate import EvalConfig

    known = set(EvalConfig.__dataclass_fields__)
    fields = {k: v for k, v in options.items() if k in known}
    for k in ("conditions", "metrics", "ppl_texts"):
        if k in fields and fields[k] is not None:
            fields[k] = tuple(fields[k])
    if cfg.evaluate.conditions:
        fields["conditions"] = tuple(cfg.evaluate.conditions)
    return EvalConfig(**fields), {k: v for k, v in options.items() if k not in known}


def stage_evaluate(p: Plan) -> Summary:
    from persona_core.budget import Budget
    from persona_core.masks import budget_segment
    from persona_jobs import evaluate

    cfg = p.config
    config, extra = _eval_config(cfg, p.eval_options)
    budgeted = cfg.masks.budget is not None
    return _call(evaluate.run, store=p.store, model=p.model, catalog=p.catalog, methods=list(cfg.masks.methods),
                 sparsities=[] if budgeted else list(cfg.masks.sparsities), personas=p.persona_ids, run_id=p.run_id,
                 budgets=[budget_segment(Budget.from_value(cfg.masks.budget))] if budgeted else None,
                 address=cfg.address, config=config, report=False, calib_hash=p.calib.hash, **extra)


def results_prefix(rid: str) -> str:
    return f"results/run={rid}"


def report_key(rid: str) -> str:
    return f"{runs.RUNS}/{rid}/report.html"


def stage_report(p: Plan) -> Summary:
    """The HTML report of the run's results, published in the store next to its manifest."""
    from persona_jobs import evaluate

    summary = Summary("report")
    table = evaluate.load_results(p.store, p.run_id)
    if table.num_rows == 0:
        raise RuntimeError(f"no results under {p.store.uri(results_prefix(p.run_id))}")
    evaluate.write_report(p.store, p.run_id, table, report_inputs(p))
    summary.done = 1
    return summary.finish()


def report_inputs(p: Plan) -> dict:
    """What the report names as the run's inputs."""
    cfg = p.config
    config, _ = _eval_config(cfg, p.eval_options)
    windows = f"{config.ppl_windows} windows x {config.ppl_window} tokens"
    return {"run": p.run_id, "catalog": cfg.catalog, "model": p.inputs.model_key,
            "methods": ", ".join(cfg.masks.methods), "plain-pruning baselines": ", ".join(cfg.masks.baselines),
            "sparsities": ", ".join(f"{s:g}" for s in cfg.masks.sparsities),
            "conditions": ", ".join(config.conditions), "metrics": ", ".join(config.metrics),
            "held-out statements per pole (cap)": config.max_statements,
            "general text (reported)": f"{config.ppl_text or 'built-in held-out text'} ({windows})",
            "validation text (choices)": f"{config.val_text or 'built-in general set'} "
                                         f"({config.val_windows} windows x {config.val_window} tokens)",
            "perplexity budget (steering)": f"{config.ppl_budget:g}x",
            "steering search": f"layers {list(config.steer_layers)}, alphas {list(config.steer_alphas)}, "
                               f"{config.val_statements} validation statements per pole",
            "few-shot examples": config.fewshot_k}


STAGE_FUNCS = {"calibrate": stage_calibrate, "masks": stage_masks, "evaluate": stage_evaluate,
               "report": stage_report}


def stages_for(cfg: PipelineConfig) -> list[str]:
    return [s for s in STAGES if cfg.evaluate.enabled or s not in ("evaluate", "report")]


# ---------------------------------------------------------------------------- repair


def verify_artifacts(p: Plan) -> list[str]:
    """Keys of the run's stats parts and masks that cannot be read back whole."""
    key = p.inputs.model_key
    keys = []
    for pid in p.inputs.personas:
        keys += p.store.list(f"stats/model={key}/persona={pid}", suffix=".parquet")
    keys += p.store.list(f"masks/model={key}", suffix=".safetensors")
    return [k for k in keys if not _readable(p.store, k)]


def _readable(store: Store, key: str) -> bool:
    """Whether an artifact passes the same verification every read applies (persona_core)."""
    from persona_core.maskcodec import verify_mask
    from persona_core.stats import StatsError, verify_part

    try:
        if key.endswith(".parquet"):
            verify_part(store, key)
        else:
            verify_mask(store, key)
        return True
    except FileNotFoundError:
        return True  # removed meanwhile: nothing corrupt to report
    except (StatsError, StoreError, KeyError, ValueError, OSError) as err:
        log.info("%s: %s", key, err)
        return False


def repair(p: Plan) -> list[str]:
    """Delete the run's corrupt artifacts and its stage markers; the rerun regenerates only those."""
    bad = verify_artifacts(p)
    for k in bad:
        print(f"repair: removing corrupt {p.store.uri(k)} (it will be regenerated)")
        p.store.delete(k)
    if bad or not _manifest_ok(p):
        runs.clear_stages(p.store, p.run_id)
    if not bad:
        print("repair: every stats part and mask of this run reads back whole")
    return bad


def _manifest_ok(p: Plan) -> bool:
    try:
        m = runs.read_manifest(p.store, p.run_id)
    except StoreError:  # corrupt: the run is redone from its stored artifacts and the manifest rewritten
        return False
    return m is not None and m.ok


# ---------------------------------------------------------------------------- execution


@dataclass
class Outcome:
    run_id: str
    ok: bool
    skipped: bool  # nothing to do: the run was already complete
    manifest: runs.Manifest | None
    summaries: list[dict] = field(default_factory=list)


def execute(p: Plan, *, kind: str = "pipeline", force: bool = False, do_repair: bool = False,
            changes: dict | None = None, lease: Lease | None = None) -> Outcome:
    """Run the plan's stages (skipping finished ones); write the manifest last."""
    rid = p.run_id
    try:
        existing = runs.read_manifest(p.store, rid)
    except StoreUnreachable:
        raise
    except StoreError as err:  # a corrupt manifest: --repair / --force rebuild it
        if not (force or do_repair):
            raise UserError(f"{err}; rerun with --repair (or --force) to rebuild it") from None
        print(f"repair: {err}; it will be rebuilt")
        existing = None
    except OSError as err:
        raise UserError(f"store {p.config.store} cannot be read or written: {err}") from None
    if existing is not None and existing.ok and not force and not do_repair:
        print(f"run {rid}: nothing changed since it completed; no model work done")
        return Outcome(rid, True, True, existing, list(existing.stages.values()))

    preflight(p, need_ray=True)
    if do_repair:
        repair(p)
    if force:
        runs.clear_stages(p.store, rid)
    started = time.time()
    summaries: dict[str, dict] = {}
    error = None
    print(f"run {rid}: {len(p.inputs.personas)} personas, model {p.inputs.model_key}, store {p.store.uri()}")
    for stage in stages_for(p.config):
        marker = runs.stage_done(p.store, rid, stage)
        if marker is not None:
            print(f"[{stage}] already finished in an earlier attempt of this run: skipped")
            summaries[stage] = marker
            continue
        print(f"[{stage}] ...", flush=True)
        try:
            summary = STAGE_FUNCS[stage](p)
        except UserError:
            raise
        except Exception as err:
            log.debug("stage %s raised", stage, exc_info=True)
            error = f"{stage}: {type(err).__name__}: {err}"
            summaries[stage] = {"stage": stage, "failed": 1, "errors": [str(err)[:500]]}
            break
        summaries[stage] = summary.to_dict()
        print(f"[{stage}] {summary.line()}")
        if not summary.ok:
            error = f"{stage}: {summary.failed} unit(s) failed: " + "; ".join(summary.errors[:3])
            break
        runs.mark_stage(p.store, rid, stage, summary.to_dict())

    if error:
        bad = verify_artifacts(p)
        for k in bad:
            error += f"\ncorrupt artifact: {p.store.uri(k)} (rerun with --repair to regenerate it)"
    if lease is not None:
        lease.check()  # fencing: a run that lost its lease must not write run-level records
    manifest = runs.Manifest(
        run_id=rid, kind=kind, status=runs.FAILED if error else runs.SUCCEEDED, inputs=p.inputs.to_dict(),
        stages=summaries, started=started, finished=time.time(), changes=changes, error=error,
        store=p.store.uri(), results=p.store.uri(results_prefix(rid)) if p.config.evaluate.enabled else None,
        report=p.store.uri(report_key(rid)) if p.config.evaluate.enabled and not error else None)
    runs.write_manifest(p.store, manifest)
    return Outcome(rid, not error, False, manifest, list(summaries.values()))


def print_outcome(p: Plan, out: Outcome) -> None:
    m = out.manifest
    rows = [("stage", "done", "skipped", "failed", "seconds")]
    order = {"calibrate": 0, "build-masks": 1, "masks": 1, "evaluate": 2, "report": 3}
    for s in sorted(out.summaries, key=lambda s: order.get(s.get("stage"), 9)):
        rows.append((s.get("stage", "?"), str(s.get("done", 0)), str(s.get("skipped", 0)), str(s.get("failed", 0)),
                     f"{s.get('seconds', 0):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if out.ok and p.config.evaluate.enabled:
        table = _terminal_table(p)
        if table:
            print()
            print(table)
    print()
    if m is not None and m.error:
        print(f"run {out.run_id} FAILED: {m.error}", file=sys.stderr)
    elif m is not None:
        print(f"run {out.run_id} succeeded; manifest {p.store.uri(runs.manifest_key(out.run_id))}")
        if m.report:
            print(f"report: {m.report}")


def _terminal_table(p: Plan) -> str | None:
    try:
        from persona_jobs import evaluate
        from persona_core import report

        return report.terminal_table(evaluate.load_results(p.store, p.run_id))
    except Exception as err:  # the table is a nicety; the report is the record
        log.warning("no summary table: %s", err)
        return None


# ---------------------------------------------------------------------------- CLI


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (every knob: README, 'Operations')")
    p.add_argument("--catalog", default=None, help="catalog file, folder, URL, or 'builtin'")
    p.add_argument("--model", default=None, help="model spec (default smollm2-135m)")
    add_store_arg(p)
    p.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--personas", default=None, help="comma-separated persona ids (default: all)")
    p.add_argument("--methods", default=None, help="comma-separated mask methods")
    p.add_argument("--sparsities", default=None, help="comma-separated sparsities, e.g. 0.3,0.5")
    p.add_argument("--granularities", default=None, help="comma-separated: unstructured, 2:4, 4:8, ffn-channels")
    p.add_argument("--no-evaluate", action="store_true", help="stop after building masks")
    p.add_argument("--repair", action="store_true", help="verify stored artifacts; regenerate corrupt ones")
    p.add_argument("--force", action="store_true", help="run every stage again (stages still skip stored work)")


def config_from_args(args, nightly: bool = False) -> PipelineConfig:
    """The config file (if any) with command-line flags on top; ConfigError -> UserError."""
    cls = NightlyConfig if nightly else PipelineConfig
    overrides = {}

    def csv(text):
        return [t.strip() for t in text.split(",") if t.strip()]

    for name in ("catalog", "model", "store", "address"):
        if getattr(args, name, None):
            overrides[name] = getattr(args, name)
    if getattr(args, "personas", None):
        overrides["personas"] = csv(args.personas)
    if getattr(args, "methods", None):
        overrides["masks.methods"] = csv(args.methods)
    if getattr(args, "sparsities", None):
        try:
            overrides["masks.sparsities"] = [float(s) for s in csv(args.sparsities)]
        except ValueError:
            raise UserError(f"--sparsities {args.sparsities!r}: expected numbers like 0.3,0.5") from None
    if getattr(args, "granularities", None):
        overrides["masks.granularities"] = csv(args.granularities)
    if getattr(args, "no_evaluate", False):
        overrides["evaluate.enabled"] = False
    try:
        if args.config:
            return load_config(args.config, cls, overrides)
        from persona_core.config import from_dict

        raw: dict = {}
        for dotted, value in overrides.items():
            cur = raw
            *head, last = dotted.split(".")
            for h in head:
                cur = cur.setdefault(h, {})
            cur[last] = value
        return from_dict(cls, raw, "<command line>")
    except ConfigError as err:
        raise UserError("invalid config:\n" + "\n".join(err.problems)) from None


def build_subparser(name: str = "run") -> argparse.ArgumentParser:
    """A standalone parser for `run` / `nightly` arguments (submit uses it to compute run ids)."""
    p = argparse.ArgumentParser(prog=f"persona-jobs {name}")
    add_config_args(p)
    return p


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline: calibrate, masks, evaluate, report",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--plan", action="store_true", help="print the run id and inputs, do nothing")
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = config_from_args(args)
    p = plan(cfg)
    if args.plan:
        import json

        print(json.dumps({"run_id": p.run_id, **p.inputs.to_dict()}, indent=2, default=str))
        return 0
    out = execute(p, force=args.force, do_repair=args.repair)
    print_outcome(p, out)
    return 0 if out.ok else 1


if __name__ == "__main__":
    from persona_jobs.cli import main as cli_main

    raise SystemExit(cli_main(["run", *sys.argv[1:]]))
