"""`persona-jobs calibrate`: activation statistics of every persona, spread over Ray actors.

Work is cut into units, one per (persona, shard of its calibration texts). Each
unit's Parquet part has a deterministic key (a hash of model key, persona hash,
calibration config hash, shard and code version), so the driver skips units
already stored before starting anything, and a retried unit rewrites nothing.
Actors (one per GPU, else one per CPU slot) load the model once and write their
parts straight to the store: activations never pass through the object store.

    persona-jobs calibrate --catalog builtin --model smollm2-135m --store s3://bucket/store
    python -m persona_jobs.calibrate --catalog builtin --model tiny-random-llama --store ./persona-store
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from persona_jobs.cli import UserError
from persona_jobs.common import Summary, add_store_arg, ensure_ray, gpus_available, progress
from persona_core.calibration import CalibConfig, calibrate_persona, shard_count
from persona_core.catalog import GENERAL_ID, Catalog, CatalogError, Persona, general_persona, load_catalog
from persona_core.models import DEFAULT_MODEL, model_key
from persona_core.stats import Shard, list_parts, part_key, read_part, stale_parts, write_stats
from persona_core.store import Store, StoreError, open_store

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 64
FAIL_ONCE_ENV = "PERSONA_CALIBRATE_FAIL_ONCE"  # "<persona>:<shard>:<marker dir>": fail that unit once, after its write


@dataclass(frozen=True)
class Unit:
    """One (persona, shard) to calibrate, and the key its part will have."""

    persona: Persona
    shard: Shard
    key: str

    @property
    def name(self) -> str:
        return f"{self.persona.id}[{self.shard.index + 1}/{self.shard.count}]"


def plan(personas: list[Persona], key: str, calib: CalibConfig, shard_size: int | None) -> list[Unit]:
    units = []
    for p in personas:
        count = shard_count(p, calib, shard_size)
        for i in range(count):
            shard = Shard(i, count, shard_size if count > 1 else None)
            units.append(Unit(p, shard, part_key(key, p.id, p.content_hash, calib.hash, shard)))
    return units


class CalibrationWorker:
    """Holds one loaded model; calibrates units and writes their parts (a Ray actor)."""

    def __init__(self, model: str, store: Store, calib: CalibConfig, expected_key: str,
                 device: str | None = None, dtype: str | None = None, fail_once: str | None = None):
        from persona_core.models import load_model

        logging.basicConfig(level=logging.INFO)
        self.loaded = load_model(model, device=device, dtype=dtype)
        if self.loaded.key != expected_key:
            raise RuntimeError(f"model {model!r} loaded as {self.loaded.key}, the driver expected {expected_key}")
        self.store, self.calib, self.fail_once = store, calib, fail_once

    def run(self, unit: Unit) -> dict:
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

    def _maybe_fail(self, unit: Unit) -> None:
        """Test hook: fail a chosen unit once, after its part is written (a retry must not duplicate it)."""
        if not self.fail_once:
            return
        pid, shard, marker_dir = self.fail_once.split(":", 2)
        marker = Path(marker_dir) / f"{pid}-{shard}.failed"
        if unit.persona.id == pid and unit.shard.index == int(shard) and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(unit.key)
            raise RuntimeError(f"injected failure in {unit.name} ({FAIL_ONCE_ENV})")


# ---------------------------------------------------------------------------- driver


def resolve(catalog: Catalog | str | Path, personas: list[str] | None, include_general: bool
            ) -> list[Persona]:
    """The personas to calibrate; bad input raises UserError before any work."""
    try:
        cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        ids = list(personas or [])
        if GENERAL_ID in ids and GENERAL_ID not in cat:
            ids.remove(GENERAL_ID)
            include_general = True
            if not ids:
                return [general_persona()]
        chosen = list(cat.select(ids))
    except CatalogError as err:
        raise UserError(str(err)) from err
    if include_general and all(p.id != GENERAL_ID for p in chosen):
        chosen.append(general_persona())
    return chosen


def run(catalog: Catalog | str | Path, model: str = DEFAULT_MODEL, store: Store | str | None = None,
        personas: list[str] | None = None, shard_size: int | None = DEFAULT_SHARD_SIZE,
        address: str | None = None, calib: CalibConfig = CalibConfig(), *, include_general: bool = False,
        num_actors: int | None = None, device: str | None = None, dtype: str | None = None,
        prune_stale: bool = True) -> Summary:
    """Calibrate `personas` of `catalog` (all when None) on `model`, writing stats parts to `store`."""
    summary = Summary("calibrate")
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    chosen = resolve(catalog, personas, include_general)
    store = open_store(store)
    try:
        store.check_writable()
    except (StoreError, OSError, ValueError) as err:
        raise UserError(f"store {store.url} cannot be written: {err}") from err
    try:
        key = model_key(model)
    except (ValueError, OSError) as err:
        raise UserError(f"model {model!r} cannot be loaded: {err}") from err

    units = plan(chosen, key, calib, shard_size)
    existing = set(list_parts(store, key))
    todo = [u for u in units if u.key not in existing]
    summary.skipped = len(units) - len(todo)
    log.info("calibrate %s: %d personas, %d units (%d already stored)", key, len(chosen), len(units),
             summary.skipped)
    if todo:
        ensure_ray(address)
        _execute(todo, summary, model, store, calib, key, num_actors, device, dtype)
    if prune_stale:
        _prune(store, key, units, summary, calib.hash)
    summary.finish()
    log.info(summary.line())
    return summary


def _execute(todo: list[Unit], summary: Summary, model: str, store: Store, calib: CalibConfig, key: str,
             num_actors: int | None, device: str | None, dtype: str | None) -> None:
    import ray

    gpus = gpus_available()
    if num_actors is None:
        num_actors = gpus or max(1, min(2, int(ray.cluster_resources().get("CPU", 1))))
    num_actors = max(1, min(num_actors, len(todo)))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    device = device or ("cuda" if gpus else "cpu")
    Worker = ray.remote(max_restarts=2, max_task_retries=2, **resources)(CalibrationWorker)
    actors = [Worker.remote(model, store, calib, key, device, dtype, os.environ.get(FAIL_ONCE_ENV))
              for _ in range(num_actors)]
    pending = list(reversed(todo))
    running: dict = {}

    def submit(actor) -> None:
        unit = pending.pop()
        running[actor.run.options(retry_exceptions=True).remote(unit)] = (actor, unit)

    bar = progress(len(todo), f"calibrate {key}")
    try:
        for actor in actors:
            if pending:
                submit(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, unit = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
                summary.done += 1
                summary.tokens += result["tokens"]
            except ray.exceptions.RayActorError as err:
                _failed(summary, unit, err)
                actors.remove(actor)  # gone for good (restarts used up)
                if not actors:
                    for u in pending:
                        _failed(summary, u, "no calibration actor left")
                    pending.clear()
            except Exception as err:  # the unit failed on every attempt
                _failed(summary, unit, err)
            bar.update(1)
            if pending and actor in actors:
                submit(actor)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)


def _failed(summary: Summary, unit: Unit, err) -> None:
    summary.failed += 1
    summary.errors.append(f"{unit.name}: {err}".splitlines()[0][:500])
    log.error("calibrate %s failed: %s", unit.name, err)


def _prune(store: Store, key: str, units: list[Unit], summary: Summary, calib_hash: str) -> None:
    """Delete parts of a persona that this plan no longer produces (an older persona version, other
    sharding); another calibration config's statistics of the same persona version stay.

    Only for personas whose every unit is now stored, so a failed run never loses statistics,
    and only files `stale_parts` can prove this code wrote for that persona.
    """
    failed = {e.split("[", 1)[0] for e in summary.errors}
    by_persona: dict[str, set[str]] = {}
    for u in units:
        by_persona.setdefault(u.persona.id, set()).add(u.key)
    hashes = {u.persona.id: u.persona.content_hash for u in units}
    for pid, keep in by_persona.items():
        if pid in failed:
            continue
        for k in stale_parts(store, key, pid, keep, persona_hash=hashes[pid], calib_hash=calib_hash):
            log.info("removing stale part %s", store.uri(k))
            store.delete(k)


# ---------------------------------------------------------------------------- CLI


def add_calib_args(p: argparse.ArgumentParser) -> None:
    d = CalibConfig()
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per text (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="texts per batch (default %(default)s)")
    p.add_argument("--system-prompt", action="store_true", help="persona description as system prompt")
    p.add_argument("--no-chat-template", action="store_true", help="calibrate on raw statements")
    p.add_argument("--user-prompt", default=None, help="a user turn before each persona reply")
    p.add_argument("--gen-questions", type=int, default=None, help="generic questions for generated personas")
    p.add_argument("--gen-max-new-tokens", type=int, default=d.gen_max_new_tokens)


def calib_from_args(args) -> CalibConfig:
    try:
        return replace(CalibConfig(), max_length=args.max_length, batch_size=args.batch_size,
                       system_prompt=args.system_prompt, chat_template=not args.no_chat_template,
                       user_prompt=args.user_prompt, gen_questions=args.gen_questions,
                       gen_max_new_tokens=args.gen_max_new_tokens)
    except ValueError as err:
        raise UserError(str(err)) from err


def _ids(text: str | None) -> list[str] | None:
    return [i.strip() for i in text.split(",") if i.strip()] if text else None


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", required=True, help="catalog file, folder, URL, or 'builtin'")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default %(default)s)")
    add_store_arg(p)
    p.add_argument("--personas", default=None, help="comma-separated persona ids (default: all)")
    p.add_argument("--general", action="store_true", help="also calibrate the neutral 'general' reference set")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="calibration texts per unit (default %(default)s)")
    p.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS or a local cluster)")
    p.add_argument("--actors", type=int, default=None, help="number of actors (default: one per GPU, else 2)")
    p.add_argument("--device", default=None, help="torch device in actors (default cuda if a GPU, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU)")
    add_calib_args(p)
    p.set_defaults(func=main)


def add_parser(sub) -> None:
    configure(sub.add_parser("calibrate", help="record activation statistics of personas (Ray)",
                             description=__doc__.splitlines()[0]))


def main(args) -> int:
    summary = run(args.catalog, args.model, args.store, _ids(args.personas), args.shard_size, args.address,
                  calib_from_args(args), include_general=args.general, num_actors=args.actors,
                  device=args.device, dtype=args.dtype)
    print(summary.line())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    import sys

    from persona_jobs.cli import main as cli_main

    raise SystemExit(cli_main(["calibrate", *sys.argv[1:]]))
