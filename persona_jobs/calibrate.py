"""`persona-jobs calibrate`: activation statistics of every persona, spread over Ray actors.

Work is cut into units, one per (persona, shard of its calibration texts)
(`persona_core.run.units.calibration_units`). Each unit's Parquet part has a
deterministic key (a hash of model key, persona hash, calibration config hash,
shard and code version), so the driver skips units already stored before
starting anything, and a retried unit rewrites nothing. Actors (one per free
GPU, else one per free CPU slot, up to 2) load the model once, take units from
one queue (`persona_jobs.dispatch`) and write their parts straight to the
store: activations never pass through the object store.

    persona-jobs calibrate --catalog builtin --model smollm2-135m --store s3://bucket/store
    python -m persona_jobs.calibrate --catalog builtin --model tiny-random-llama --store ./persona-store
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from persona_core.calib.config import CalibConfig
from persona_core.calib.recorder import calibrate_persona
from persona_core.calib.parts import read_part, write_stats
from persona_core.calib.stored import list_parts
from persona_core.errors import UserError
from persona_core.models.loading import DEFAULT_MODEL, load_model
from persona_core.run.plan import Placement, Plan, Selection, make_plan
from persona_core.run.units import CalibrationUnit, calibration_personas, calibration_units, stale_calibration_parts
from persona_core.store.store import Store
from persona_jobs import dispatch
from persona_jobs.common import Summary, add_common, add_list, ensure_ray, gpus_available, run_alone
from persona_jobs.flags import load, where_overrides

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 64
FAIL_ONCE_ENV = "PERSONA_CALIBRATE_FAIL_ONCE"  # "<persona>:<shard>:<marker dir>": fail that unit once, after its write


class CalibrationWorker:
    """Holds one loaded model; calibrates units and writes their parts (a Ray actor)."""

    def __init__(self, model: str, store: Store, calib: CalibConfig, expected_key: str,
                 device: str | None = None, dtype: str | None = None, fail_once: str | None = None):
        logging.basicConfig(level=logging.INFO)
        self.loaded = load_model(model, device=device, dtype=dtype)
        if self.loaded.key != expected_key:
            raise RuntimeError(f"model {model!r} loaded as {self.loaded.key}, the driver expected {expected_key}")
        self.store, self.calib, self.fail_once = store, calib, fail_once

    def run(self, unit: CalibrationUnit) -> dict:
        start = time.time()
        if self.store.exists(unit.key):  # done by an earlier attempt or another worker
            tokens = read_part(self.store, unit.key, ["tokens"]).column("tokens")[0].as_py()
            return {"unit": unit.name, "status": "exists", "tokens": tokens, "seconds": 0.0}
        stats, generated = calibrate_persona(self.loaded, unit.persona, self.calib, unit.shard)
        key = write_stats(self.store, stats, unit.shard, generated=generated, calib_config=self.calib.to_dict())
        if key != unit.key:
            raise RuntimeError(f"{unit.name}: wrote {key}, planned {unit.key} (code versions differ?)")
        self._maybe_fail(unit)
        return {"unit": unit.name, "status": "done", "tokens": stats.tokens, "seconds": time.time() - start}

    def _maybe_fail(self, unit: CalibrationUnit) -> None:
        """Test hook: fail a chosen unit once, after its part is written (a retry must not duplicate it)."""
        if not self.fail_once:
            return
        pid, shard, marker_dir = self.fail_once.split(":", 2)
        marker = Path(marker_dir) / f"{pid}-{shard}.failed"
        if unit.persona.id == pid and unit.shard.index == int(shard) and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(unit.key)
            raise RuntimeError(f"injected failure in {unit.name} ({FAIL_ONCE_ENV})")


def run(plan: Plan) -> Summary:
    """Calibrate the plan's personas (a standalone command: those it names, else the whole catalog),
    writing every missing stats part to the store; returns the closing Summary (also logged)."""
    summary = Summary("calibrate")
    named = plan.selection.personas if plan.selection is not None else plan.persona_ids
    chosen = calibration_personas(plan.catalog, list(named or []), plan.config.calibrate.include_general)
    store, key, calib = plan.store, plan.model_key, plan.calib
    units = calibration_units(chosen, key, calib, plan.config.calibrate.shard_size)
    existing = set(list_parts(store, key))
    todo = [u for u in units if u.key not in existing]
    summary.skipped = len(units) - len(todo)
    log.info("calibrate %s: %d personas, %d units (%d already stored)", key, len(chosen), len(units),
             summary.skipped)
    if todo:
        _calibrate(plan, todo, summary)
    failed = {e.split("[", 1)[0] for e in summary.errors}
    for k in stale_calibration_parts(store, key, units, failed, calib.hash):
        log.info("removing stale part %s", store.uri(k))
        store.delete(k)
    summary.finish()
    log.info(summary.line())
    return summary


def _calibrate(plan: Plan, todo: list[CalibrationUnit], summary: Summary) -> None:
    """The units on a pool of calibration actors; counts go into `summary`."""
    ensure_ray(plan.config.address)
    gpus = gpus_available()
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    where = plan.placement
    spec = dispatch.PoolSpec("calibration", CalibrationWorker,
                             (plan.model, plan.store, plan.calib, plan.model_key,
                              where.device or ("cuda" if gpus else "cpu"), where.dtype,
                              os.environ.get(FAIL_ONCE_ENV)),
                             resources=resources, max_restarts=2, max_task_retries=2, retry_exceptions=True)
    # GPU: one actor per GPU the cluster scales to (unplaced ones wait, taking no unit); CPU: free slots, up to 2
    n = dispatch.pool_size(plan.config.resources.calibrate_actors or (gpus or None), resources, len(todo),
                           cap=None if gpus else 2)
    out = dispatch.run_pool(spec, todo, "run", num_actors=n,
                            schedule_timeout_s=plan.config.resources.schedule_timeout_s, describe=lambda u: u.name)
    summary.done = len(out.results)
    summary.tokens = sum(r["tokens"] for _, r in out.results)
    for unit, err in out.failed:
        summary.failed += 1
        summary.errors.append(f"{unit.name}: {err}".splitlines()[0][:500])


# ---------------------------------------------------------------------------- CLI


def add_calib_args(p: argparse.ArgumentParser) -> None:
    d = CalibConfig()
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per text (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="texts per batch (default %(default)s)")
    p.add_argument("--system-prompt", action="store_true", help="persona description as system prompt")
    p.add_argument("--no-chat-template", action="store_true", help="calibrate on raw statements")
    p.add_argument("--user-prompt", default=None, help="a user turn before each persona reply")
    p.add_argument("--gen-questions", type=int, default=None,
                   help="generic questions for personas given only by a description (default: all)")
    p.add_argument("--gen-max-new-tokens", type=int, default=d.gen_max_new_tokens,
                   help="tokens generated per answer for such personas (default %(default)s)")


def calib_overrides(args) -> dict:
    """The calibration flags as `calibrate.options` (calibration.CalibConfig's fields)."""
    options = {"max_length": args.max_length, "batch_size": args.batch_size, "system_prompt": args.system_prompt,
               "chat_template": not args.no_chat_template, "user_prompt": args.user_prompt,
               "gen_questions": args.gen_questions, "gen_max_new_tokens": args.gen_max_new_tokens}
    return {f"calibrate.options.{k}": v for k, v in options.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, catalog="required", model_default=DEFAULT_MODEL)
    add_list(p, "--personas", help="persona ids (default: all)", metavar="ID")
    p.add_argument("--general", action="store_true", help="also calibrate the neutral 'general' reference set")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="calibration texts per unit (default %(default)s)")
    p.add_argument("--actors", type=int, default=None,
                   help="number of actors (default: one per free GPU, else up to 2 free CPU slots)")
    p.add_argument("--device", default=None, help="torch device in actors (default cuda if a GPU, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU)")
    p.add_argument("--schedule-timeout", type=float, default=300.0,
                   help="seconds to wait for a first actor before failing (default %(default)s)")
    add_calib_args(p)
    p.set_defaults(func=main)


def add_parser(sub) -> None:
    add_arguments(sub.add_parser("calibrate", help="record activation statistics of personas (Ray)",
                                 description=__doc__.splitlines()[0]))


def plan_from_args(args) -> Plan:
    """The flags as config overrides, resolved into a plan; the personas as named (no opposites added)."""
    if args.shard_size is not None and args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    overrides = {**where_overrides(args), **calib_overrides(args), "calibrate.shard_size": args.shard_size,
                 "calibrate.include_general": args.general, "resources.schedule_timeout_s": args.schedule_timeout,
                 "evaluate.enabled": False}
    if args.actors:
        overrides["resources.calibrate_actors"] = args.actors
    return make_plan(load(None, overrides), Selection(personas=tuple(args.personas) if args.personas else None),
                     Placement(device=args.device, dtype=args.dtype))


def main(args) -> int:
    return run_alone(plan_from_args(args), run)


if __name__ == "__main__":
    import sys

    from persona_jobs.cli import main as cli_main

    raise SystemExit(cli_main(["calibrate", *sys.argv[1:]]))
