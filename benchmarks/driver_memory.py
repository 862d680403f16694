"""The build-masks driver's peak memory: what the process that plans and dispatches the tasks holds.

Prints one JSON line:
* ``driver_floor_mb``: the driver process's peak RSS once the library is imported and Ray is
  started (what any driver costs);
* ``driver_peak_mb``: its peak RSS after a real `build-masks` run (local Ray, ``--cpus`` CPUs) of
  ``--methods`` at ``--sparsity`` for one opposing pair, on random statistics of the model's shapes;
* ``driver_build_mb``: their difference, what build-masks itself added on the driver;
* ``weights_fp32_mb``: the model's prunable linear weights in float32, for scale (what a driver
  that loads the model and puts its weights in the object store holds at least).

The store and statistics are prepared in this process; the run is measured in a fresh child process
(`--driver`), so nothing loaded for the preparation counts; the figure is the child's own peak
(``VmHWM``; Ray's processes are its children, not counted).

    python benchmarks/driver_memory.py [--model smollm2-135m] [--methods contrastive-wanda] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from persona_core.calib.parts import write_stats  # noqa: E402
from persona_core.calib.stats import GroupStats, PersonaStats  # noqa: E402
from persona_core.catalog import load_catalog, reference_persona  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL  # noqa: E402
from persona_core.store.store import open_store  # noqa: E402

PAIR = ("introvert", "extrovert")

# The smallest run, on the tiny random model: tests/test_benchmarks.py runs it (make test).
SMOKE = ["--model", "tiny-random-llama", "--cpus", "1"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--methods", default="contrastive-wanda", help="comma-separated mask methods")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster the driver starts")
    ap.add_argument("--store", default=None, help="store folder (default: a temporary one)")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)  # the measured child process
    return ap


def peak_mb() -> float:
    """This process's peak resident set size so far, MiB: VmHWM (its own address space since exec),
    else ru_maxrss (which on Linux also keeps the peak of the process it was forked from)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(model: str, store_url: str) -> tuple[str, int]:
    """Random statistics of the model's shapes for the pair and the reference persona; (model key,
    number of prunable weights). The model is loaded here, in the parent, never in the measured driver."""
    from persona_core.masks.inputs import LinearWeights
    from persona_core.models.loading import load_model

    loaded = load_model(model, device="cpu", dtype="float32")
    lw = LinearWeights.from_model(loaded)
    key, numel = loaded.key, lw.numel
    del loaded
    catalog = load_catalog("builtin")
    store = open_store(store_url)
    g = torch.Generator().manual_seed(0)
    for persona in (catalog[PAIR[0]], catalog[PAIR[1]], reference_persona()):
        groups = {}
        for grp in lw.groups:
            r = lambda: torch.rand(grp.in_features, generator=g, dtype=torch.float64) + 0.1  # noqa: E731
            groups[(grp.layer, grp.name)] = GroupStats(1000, r(), r() * 1000, r(), 10, r(), r())
        write_stats(store, PersonaStats(key, persona.id, persona.content_hash, groups, "bench"))
    return key, numel


def drive(args) -> dict:
    """The measured child: start Ray, run build-masks, report this process's peak RSS."""
    import ray

    from persona_jobs import build_masks
    from persona_jobs.cli import build_parser

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        floor = peak_mb()
        flags = ["build-masks", "--model", args.model, "--store", args.store, "--methods", args.methods,
                 "--sparsity", str(args.sparsity), "--personas", *PAIR, "--catalog", "builtin"]
        t0 = time.perf_counter()
        summary = build_masks.run(build_masks.plan_from_args(build_parser().parse_args(flags)))
        seconds = time.perf_counter() - t0
        if not summary.ok:
            raise SystemExit(f"build-masks failed: {summary.errors}")
        return {"driver_floor_mb": round(floor, 1), "driver_peak_mb": round(peak_mb(), 1),
                "driver_build_mb": round(peak_mb() - floor, 1), "masks": summary.done, "seconds": round(seconds, 2)}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.driver:
        print(json.dumps(drive(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or os.path.join(tmp, "store")
        key, numel = prepare(args.model, store)
        child = [sys.executable, os.path.abspath(__file__), "--driver", "--model", args.model, "--store", store,
                 "--methods", args.methods, "--sparsity", str(args.sparsity), "--cpus", str(args.cpus)]
        env = {**os.environ, "PERSONA_PROGRESS": "0"}
        env.pop("RAY_ADDRESS", None)  # the driver starts its own local cluster
        done = subprocess.run(child, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the driver failed ({done.returncode}):\n{done.stderr[-4000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"benchmark": "driver_memory", "model": key, "methods": args.methods.split(","),
                      "weights_fp32_mb": round(numel * 4 / 2**20, 1), **measured}))


if __name__ == "__main__":
    main()
