"""`persona-jobs evaluate`: score every persona subnetwork in the store, on Ray actors.

One actor per GPU (CPU actors where there is none); each loads the model once
into an `persona_core.evaluate.Evaluator` and, for each persona it is handed,
computes the dense conditions once, then applies every mask of that persona in
place, scores it, and restores the dense weights. Work is spread with an
`ActorPool` one persona at a time; each (persona, mask) unit is written as its
own Parquet part, ``results/run=<run-id>/part-<persona>-<method>-s<sparsity>-<hash>.parquet``
(deterministic names: a rerun skips the parts already there), and returned to
the driver as an Arrow table, which gathers them into the report
``runs/<run-id>/report.html``.

Masks are found under ``masks/model=<model-key>/method=<m>/sparsity=<s>/``;
methods shared by every persona (``magnitude``, ``wanda-general``) live there
once as ``general.safetensors`` and ride along as baselines.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from persona_jobs.common import Summary, add_store_arg, ensure_ray, gpus_per_node, progress
from persona_core.catalog import GENERAL_ID, BUILTIN, Catalog, CatalogError, Persona, load_catalog
from persona_core.evaluate import CONDITIONS, DEFAULT_CONDITIONS, RESULT_SCHEMA, EvalConfig, JudgeSettings
from persona_core.hashing import content_hash
from persona_core.models import DEFAULT_MODEL
from persona_core.store import Store, open_store

log = logging.getLogger(__name__)

BASELINES = ("magnitude", "wanda-general")
UNIT_KEY = ("persona", "method", "sparsity", "condition", "metric")


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class MaskRef:
    """One mask file in the store, parsed from its key."""

    key: str
    method: str  # the whole method segment, e.g. contrastive-wanda@2of4+1a2b3c4d or wanda~owl
    base: str  # the method's registered name, e.g. contrastive-wanda
    sparsity: float  # NaN for a budgeted mask (its metadata holds the sparsity the search chose)
    owner: str  # a persona id, or "general" for masks shared by every persona
    budget: str = ""  # the budget segment of a budgeted mask's key, e.g. ppl1.1
    calib: str = ""  # the calibration config of the statistics it derives from ("" for none, or an old key)

    @property
    def level(self) -> str:
        """What the mask was asked for: a sparsity or a budget (baselines ride along at the same level)."""
        return f"budget={self.budget}" if self.budget else f"sparsity={self.sparsity:g}"

    @property
    def granularity(self) -> str:
        m = re.search(r"@([^~+]+)", self.method)
        return m[1].replace("of", ":") if m else "unstructured"

    @property
    def allocation(self) -> str:
        m = re.search(r"~([^@+]+)", self.method)
        return m[1] if m else "uniform"


_MASK_RE = re.compile(r"^masks/model=(?P<model>[^/]+)/(?:calib=(?P<calib>[^/]+)/)?method=(?P<method>[^/]+)/"
                      r"(?:sparsity=(?P<sparsity>[^/]+)|budget=(?P<budget>[^/]+))/(?P<owner>[^/]+)\.safetensors$")


def list_masks(store: Store, model_key: str) -> list[MaskRef]:
    refs = []
    for key in store.list(f"masks/model={model_key}/", suffix=".safetensors"):
        m = _MASK_RE.match(key)
        if not m:
            continue
        try:
            sparsity = float(m["sparsity"]) if m["sparsity"] is not None else float("nan")
        except ValueError:
            log.warning("skipping %s: sparsity %r is not a number", key, m["sparsity"])
            continue
        base = re.split(r"[@~+]", m["method"], maxsplit=1)[0]
        refs.append(MaskRef(key, m["method"], base, sparsity, m["owner"], m["budget"] or "", m["calib"] or ""))
    return refs


@dataclass(frozen=True)
class Unit:
    """One (persona, mask) to score; `mask` None scores the dense conditions only."""

    persona: str
    mask: MaskRef | None
    part: str  # the results key this unit writes


@dataclass
class Task:
    """One persona and all its units: the actor computes the dense state once for them."""

    persona: Persona
    opposite: Persona | None
    units: list[Unit] = field(default_factory=list)


def _matches(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def part_key(run_id: str, persona: Persona, opposite: Persona | None, mask: MaskRef | None,
             model_key: str, config: EvalConfig) -> str:
    ident = content_hash(model_key, persona.evaluation_hash, opposite.evaluation_hash if opposite else None,
                         mask.key if mask else None, config.hash)[:10]
    what = (f"{_safe(mask.method)}-" + (f"b{_safe(mask.budget)}" if mask.budget else f"s{mask.sparsity:g}")
            if mask else "dense")
    return f"results/run={run_id}/part-{_safe(persona.id)}-{what}-{ident}.parquet"


def plan(store: Store, catalog: Catalog, model_key: str, run_id: str, config: EvalConfig,
         methods: list[str] | None = None, sparsities: list[float] | None = None,
         personas: list[str] | None = None, budgets: list[str] | None = None,
         calib_hash: str | None = None) -> list[Task]:
    """Tasks for every selected persona: its own masks of the chosen methods, the shared
    baselines at the same sparsities, or (no mask found) the dense conditions alone.

    Only masks of calibration config `calib_hash` (and masks that read no statistics) take
    part; with None, the masks must all come from one config (else a UserError names them).
    """
    selected = catalog.select(personas)
    refs = of_calibration(list_masks(store, model_key), calib_hash)
    chosen = [r for r in refs if _matches(r.base, methods) or _matches(r.method, methods)]
    if sparsities is not None or budgets is not None:  # budgeted masks only when their budget is asked for
        chosen = [r for r in chosen if (r.budget in (budgets or ()) if r.budget else
                                        any(abs(r.sparsity - s) < 1e-9 for s in sparsities or ()))]
    if methods is not None:  # baselines ride along at the sparsities of the chosen masks
        levels = {r.level for r in chosen}
        chosen += [r for r in refs if r.base in BASELINES and r.level in levels and r not in chosen]
    tasks = []
    for p in selected:
        opposite = catalog.personas.get(p.opposite) if p.opposite else None
        task = Task(p, opposite)
        for r in sorted(chosen, key=lambda r: (r.method, r.budget, r.sparsity)):
            if r.owner == p.id or (r.owner == GENERAL_ID and not any(
                    o.owner == p.id and o.method == r.method and o.level == r.level for o in chosen)):
                task.units.append(Unit(p.id, r, part_key(run_id, p, opposite, r, model_key, config)))
        if not task.units and any(c.startswith("dense") for c in config.conditions):
            task.units.append(Unit(p.id, None, part_key(run_id, p, opposite, None, model_key, config)))
        tasks.append(task)
    return tasks


def of_calibration(refs: list[MaskRef], calib_hash: str | None) -> list[MaskRef]:
    """The masks of one calibration config, plus those that read no statistics (e.g. magnitude).

    A mask key without a config is one written before keys named it: with a config asked
    for, it is never used in its place (its statistics may be another config's).
    """
    from persona_jobs.cli import UserError
    from persona_core.masks import get_method

    def reads_stats(r: MaskRef) -> bool:
        try:
            return bool(get_method(r.base).needs)
        except ValueError:
            return True

    if calib_hash is None:
        configs = sorted({r.calib for r in refs if r.calib})
        if len(configs) > 1:
            raise UserError(f"masks of {len(configs)} calibration configs are stored ({', '.join(configs)}): "
                            f"choose one with --calib-hash")
        return refs
    return [r for r in refs if r.calib == calib_hash or (not r.calib and not reads_stats(r))]


def default_run_id(model_key: str, catalog: Catalog, config: EvalConfig, methods, sparsities,
                   calib_hash: str | None = None) -> str:
    parts = (model_key, catalog.content_hash, config.hash, methods, sparsities) + ((calib_hash,) if calib_hash else ())
    return "eval-" + content_hash(*parts)[:16]


def report_key(run_id: str) -> str:
    return f"runs/{run_id}/report.html"


# ---------------------------------------------------------------------------- the worker


def read_mask(store: Store, key: str) -> tuple[dict, dict]:
    """A verified mask and its metadata; ``content_hash`` is the digest of the masks actually
    decoded from the bytes read (checked against the digest written with them)."""
    from persona_core.maskcodec import MaskFile

    f = MaskFile(store, key)
    masks = f.read()
    return masks, {**f.metadata, "content_hash": f.read_digest}


class EvalWorker:
    """Holds one Evaluator (one loaded model) for its whole life; scores persona tasks."""

    def __init__(self, model: str, store: Store, config: EvalConfig, *, device_map: str | None = None,
                 threads: int | None = None, calib_hash: str | None = None):
        import torch

        from persona_core.evaluate import Evaluator

        if threads:
            torch.set_num_threads(threads)
        self.evaluator = Evaluator(model, device_map=device_map)
        self.store, self.config, self.calib_hash = store, config, calib_hash
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def model_key(self) -> str:
        return self.evaluator.model_key

    def steering_stats(self, task: Task) -> dict | None:
        """The calibration statistics dense+steer needs: the persona's and its opposite's (or general's)."""
        if "dense+steer" not in self.config.conditions:
            return None
        from persona_core.stats import read_persona_stats

        ids = [task.persona.id, task.opposite.id if task.opposite else GENERAL_ID]
        return {pid: read_persona_stats(self.store, self.evaluator.model_key, pid, calib_hash=self.calib_hash)
                for pid in ids}

    def run_task(self, task: Task) -> dict:
        """Score every unit of one persona; write each unit's part; return tables and errors."""
        from persona_core.evaluate import evaluate_unit

        out = {"worker": self.name, "persona": task.persona.id, "tables": [], "parts": [], "errors": [],
               "seconds": 0.0, "skipped": 0}
        t0 = time.perf_counter()
        stats: dict | None = None
        for i, unit in enumerate(task.units):
            if self.store.exists(unit.part):  # another attempt already wrote it
                out["tables"].append(self.store.read_parquet(unit.part))
                out["skipped"] += 1
                continue
            try:
                if unit.mask is None:
                    masks, meta = None, None
                else:
                    masks, meta = read_mask(self.store, unit.mask.key)
                    if unit.mask.budget:  # one setting per budget; the sparsity each pair got: budget-* rows
                        meta = {**meta, "method": f"{unit.mask.method}|{unit.mask.budget}", "sparsity": 0.0,
                                "granularity": unit.mask.granularity}
                    else:
                        meta = {**meta, "method": unit.mask.method, "sparsity": unit.mask.sparsity,
                                "granularity": unit.mask.granularity}
                if stats is None:
                    stats = self.steering_stats(task)
                # masks swap straight into one another; the dense weights return after the last
                table = evaluate_unit(self.evaluator, task.persona, task.opposite, masks, meta, self.config,
                                      restore=i == len(task.units) - 1, stats=stats)
                self.store.write_parquet(unit.part, table)
                out["tables"].append(table)
                out["parts"].append(unit.part)
            except Exception as err:  # one bad mask must not sink the persona's other units
                log.exception("unit %s failed", unit.part)
                out["errors"].append(f"{unit.part}: {type(err).__name__}: {err}")
        self.evaluator.masks.restore()
        out["seconds"] = time.perf_counter() - t0
        return out


# ---------------------------------------------------------------------------- the job


def run(store: str | Store | None, model: str = DEFAULT_MODEL, catalog: str | Catalog = BUILTIN,
        methods: list[str] | None = None, sparsities: list[float] | None = None,
        personas: list[str] | None = None, conditions: list[str] | None = None,
        run_id: str | None = None, address: str | None = None, *, metrics: list[str] | None = None,
        config: EvalConfig | None = None, actors: int | None = None, cpus_per_actor: int | None = None,
        device_map: str | None = None, gpus_per_actor: int | None = None, report: bool = True,
        budgets: list[str] | None = None, calib_hash: str | None = None) -> Summary:
    """Evaluate every selected (persona, mask) unit on a pool of Ray actors.

    Returns a `Summary` (done / skipped / failed units); ``summary.report`` holds the
    report's URL and ``summary.run_id`` the run id. Already written parts are skipped.
    """
    import ray
    from ray.util import ActorPool

    from persona_core.models import model_key as get_model_key
    from persona_core.report import build_report, terminal_table

    summary = Summary("evaluate")
    store = open_store(store)
    if isinstance(catalog, (str, os.PathLike)):
        catalog = load_catalog(catalog)
    config = config or EvalConfig()
    if conditions:
        config = replace(config, conditions=tuple(conditions))
    if metrics:
        config = replace(config, metrics=tuple(metrics))
    key = get_model_key(model)
    run_id = run_id or default_run_id(key, catalog, config, methods, sparsities, calib_hash)
    tasks = plan(store, catalog, key, run_id, config, methods, sparsities, personas, budgets, calib_hash)
    n_units = sum(len(t.units) for t in tasks)
    tables: list[pa.Table] = []
    todo = []
    for t in tasks:  # parts already written are read back, not recomputed
        pending = [u for u in t.units if not store.exists(u.part)]
        for u in t.units:
            if u not in pending:
                tables.append(store.read_parquet(u.part))
                summary.skipped += 1
        if pending:
            todo.append(Task(t.persona, t.opposite, pending))
    log.info("evaluate %s: %d personas, %d units (%d already written), run %s",
             key, len(tasks), n_units, summary.skipped, run_id)
    summary.workers = {}
    if todo:
        ensure_ray(address)
        n_actors, opts, threads = actor_resources(
            gpus_per_node(), int(ray.cluster_resources().get("CPU", 1)), len(todo), actors=actors,
            cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, device_map=device_map)
        log.info("evaluate: %d actor(s), each %s", n_actors, opts)
        remote = ray.remote(**opts)(EvalWorker)
        workers = [remote.remote(model, store, config, device_map=device_map, threads=threads, calib_hash=calib_hash)
                   for _ in range(n_actors)]
        pool = ActorPool(workers)
        bar = progress(len(todo), f"evaluate ({n_actors} actor{'s' * (n_actors > 1)})")
        try:
            for res in pool.map_unordered(lambda a, t: a.run_task.remote(t), todo):
                tables.extend(res["tables"])
                summary.done += len(res["parts"])
                summary.skipped += res["skipped"]
                summary.failed += len(res["errors"])
                summary.errors.extend(res["errors"])
                summary.workers[res["worker"]] = summary.workers.get(res["worker"], 0) + 1
                bar.update(1)
        finally:
            bar.close()
            for w in workers:
                ray.kill(w)
    results = gather(tables)
    summary.rows = results.num_rows
    summary.run_id = run_id
    summary.report = None
    if report and results.num_rows:
        summary.report = write_report(store, run_id, results)
        log.info("report: %s", summary.report)
        summary.table = terminal_table(results)
    return summary.finish()


def actor_resources(gpus_per_node: list[int], cpus: int, n_tasks: int, *, actors: int | None = None,
                    cpus_per_actor: int | None = None, gpus_per_actor: int | None = None,
                    device_map: str | None = None) -> tuple[int, dict, int | None]:
    """(number of actors, Ray options of each, torch threads) for the evaluator pool.

    One GPU per actor, except with ``device_map="auto"``: then one model spreads over several
    GPUs of one node, and the actor must hold all of them (Ray sets CUDA_VISIBLE_DEVICES to
    the GPUs it grants; without asking for them the placement sees one GPU, or none).
    `gpus_per_actor` sets how many; by default every GPU of the largest node.
    """
    from persona_jobs.cli import UserError

    gpus = sum(gpus_per_node)
    if gpus:
        per = 1
        if device_map == "auto":
            per = gpus_per_actor or max(gpus_per_node)
            if per > max(gpus_per_node):
                raise UserError(f"--gpus-per-actor {per}: one model's placement must fit on one node, and the "
                                f"largest has {max(gpus_per_node)} GPU(s)")
        elif gpus_per_actor not in (None, 1):
            raise UserError("--gpus-per-actor needs --device-map auto (one model over several GPUs)")
        slots = sum(g // per for g in gpus_per_node)
        n_actors = max(1, min(actors or slots, slots, n_tasks))
        return n_actors, {"num_gpus": per, "num_cpus": 1}, cpus_per_actor
    per = cpus_per_actor or max(1, min(4, cpus))
    n_actors = max(1, min(actors or max(1, cpus // per), n_tasks))
    return n_actors, {"num_cpus": per}, per


def gather(tables: list[pa.Table]) -> pa.Table:
    """Concatenate unit tables; every (persona, method, sparsity, condition, metric) once."""
    if not tables:
        return RESULT_SCHEMA.empty_table()
    results = pa.concat_tables([_conform(t) for t in tables])
    keys = list(zip(*(results.column(c).to_pylist() for c in UNIT_KEY)))
    if len(set(keys)) != len(keys):
        dupes = len(keys) - len(set(keys))
        raise RuntimeError(f"{dupes} result row(s) gathered twice: parts of different configs in one run?")
    return results


def _conform(t: pa.Table) -> pa.Table:
    """A part in today's schema (columns added since it was written are null)."""
    for f in RESULT_SCHEMA:
        if f.name not in t.column_names:
            t = t.append_column(f.name, pa.nulls(t.num_rows, f.type))
    return t.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)


def write_report(store: Store, run_id: str, results: pa.Table, inputs: dict | None = None) -> str:
    from persona_core.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        path = build_report(results, Path(tmp) / "report.html", title=f"Persona subnetworks: {run_id}",
                            inputs=inputs)
        store.write_bytes(report_key(run_id), path.read_bytes())
    return store.uri(report_key(run_id))


def load_results(store: str | Store, run_id: str) -> pa.Table:
    """Every row of a run, read back from its parts."""
    store = open_store(store)
    parts = store.list(f"results/run={run_id}/", suffix=".parquet")
    return gather([store.read_parquet(k) for k in parts])


# ---------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score every persona subnetwork (Ray actors, one per GPU)",
                       description=__doc__.split("\n\n")[0])
    add_args(p)
    p.set_defaults(func=_main)


def add_args(p: argparse.ArgumentParser) -> None:
    add_store_arg(p)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default %(default)s)")
    p.add_argument("--catalog", default=BUILTIN, help="catalog file, folder, URL or 'builtin'")
    p.add_argument("--methods", nargs="+", help="mask methods, globs allowed (contrastive-*); default: all found")
    p.add_argument("--sparsities", nargs="+", type=float, help="default: every sparsity found")
    p.add_argument("--personas", nargs="+", help="persona ids (default: the whole catalog)")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS,
                   help=f"default: {' '.join(DEFAULT_CONDITIONS)} (dense+steer needs residual statistics)")
    p.add_argument("--metrics", nargs="+", help="metric names (default: every default metric)")
    p.add_argument("--run-id", help="default: a hash of the inputs")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--actors", type=int, help="actors (default: one per GPU; CPU: cpus / cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=int, help="CPU threads per actor (default: up to 4)")
    p.add_argument("--device-map", choices=["auto"], help="spread a model too big for one GPU over several")
    p.add_argument("--calib-hash", default=None, metavar="HASH",
                   help="score the masks of this calibration config (default: the only one stored)")
    p.add_argument("--gpus-per-actor", type=int, default=None,
                   help="with --device-map auto: GPUs each evaluator holds (default: all GPUs of the largest node)")
    p.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    p.add_argument("--max-statements", type=int, default=EvalConfig.max_statements)
    p.add_argument("--max-questions", type=int, default=EvalConfig.max_questions)
    p.add_argument("--ppl-text", nargs="+", default=[], help="extra perplexity texts: URL or URL::field")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for the judge metric (adds 'judge')")
    p.add_argument("--judge-model", default="", help="model name sent to the judge endpoint")
    p.add_argument("--judge-local", help="a local model spec as judge instead of an endpoint (adds 'judge')")
    p.add_argument("--no-report", action="store_true")


def config_from_args(args) -> EvalConfig:
    from persona_core.metrics import default_metrics

    judge = None
    metrics = list(args.metrics or default_metrics())
    if args.judge_url or args.judge_local:
        judge = JudgeSettings(url=args.judge_url, model=args.judge_model, local=args.judge_local)
        metrics += [] if "judge" in metrics else ["judge"]
    return EvalConfig(conditions=tuple(args.conditions or DEFAULT_CONDITIONS), metrics=tuple(metrics),
                      batch_size=args.batch_size, max_statements=args.max_statements,
                      max_questions=args.max_questions, ppl_texts=tuple(args.ppl_text), judge=judge)


def record_run(store: Store, summary: Summary, started: float, inputs: dict) -> None:
    """A manifest (kind ``evaluate``) for a standalone evaluation, so `status` lists it; never over a
    manifest of another kind (a pipeline run evaluated again under its own id keeps its record)."""
    from persona_core import runs

    existing = runs.read_manifest(store, summary.run_id)
    if existing is not None and existing.kind != "evaluate":
        return
    error = "; ".join(summary.errors[:3]) or None
    runs.write_manifest(store, runs.Manifest(
        run_id=summary.run_id, kind="evaluate", status=runs.FAILED if error else runs.SUCCEEDED, inputs=inputs,
        stages={"evaluate": summary.to_dict()}, started=started, finished=time.time(), error=error,
        store=store.uri(), results=store.uri(f"results/run={summary.run_id}"), report=summary.report))


def _main(args) -> int:
    from persona_jobs.cli import UserError

    try:
        config = config_from_args(args)
        catalog = load_catalog(args.catalog)
    except (ValueError, CatalogError) as err:
        raise UserError(str(err)) from err
    started = time.time()
    summary = run(args.store, args.model, catalog, args.methods, args.sparsities, args.personas,
                  run_id=args.run_id, address=args.address, config=config, actors=args.actors,
                  cpus_per_actor=args.cpus_per_actor, device_map=args.device_map,
                  gpus_per_actor=args.gpus_per_actor, report=not args.no_report, calib_hash=args.calib_hash)
    record_run(open_store(args.store), summary, started, {
        "model": args.model, "catalog": args.catalog, "methods": args.methods, "sparsities": args.sparsities,
        "personas": args.personas, "config_hash": config.hash})
    if getattr(summary, "table", None):
        print(summary.table)
    print(summary.line())
    if summary.report:
        print(f"report: {summary.report}")
    for e in summary.errors[:10]:
        print(f"  failed: {e}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    from persona_jobs.cli import main

    raise SystemExit(main(["evaluate", *__import__("sys").argv[1:]]))
