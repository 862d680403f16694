"""Benchmark the reducer: masks per minute on the default model for every catalog persona.

Prints one JSON line:
* ``masks_per_min``: the real `build-masks` job (Ray, local cluster, store, codec) building
  contrastive-wanda masks at 50% for every persona of the catalog (both sides of each
  opposing pair from one task); ``seconds`` is its wall time.
* ``speedup_vs_loop``: our selection against a straightforward per-row Python loop
  (seed-1 style: sort each row, zero the first k) on the same layers, one thread each,
  best of 3 runs of each.
* ``bits_per_weight_plain`` / ``bits_per_weight_delta``: stored size over weights, for a
  plain mask file and for the opposing persona's mask delta-coded against it.
* ``opposing_diff_fraction``: fraction of weights where opposing personas' masks differ.
* ``real_stats``: the diff and delta figures again, from statistics calibrated on real
  statements of ``--sample-pairs`` opposing pairs, for `wanda` (per-persona masks) and
  `contrastive-wanda`: the synthetic perturbation above exaggerates persona differences.
* ``budget``: seconds per budgeted pair (target <= 60 s on 2 CPU cores): one capability-budget
  search (x1.10 WikiText-2 validation perplexity) per ``--budget-methods`` method on each
  ``--budget-pairs`` pair of the built-in catalog, statistics calibrated on the default model
  (`benchmarks/frontier.py`'s timed search; ``--budget-pairs`` with no value skips it).

Statistics: ``--stats synthetic`` (default) uses real default-model activations on the
general texts with channel scales perturbed per persona (seconds); ``--stats calibrated``
runs `calibrate_persona` on a few statements per persona (slow on 2 shared cores).
``stats`` in the JSON says which.

    python benchmarks/masks.py [--model smollm2-135m] [--catalog PATH] [--statements 4] [--sample-pairs 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from persona_core.catalog import SplitConfig, load_catalog  # noqa: E402
from persona_core.masks.codec import encode_mask, read_mask  # noqa: E402
from persona_core.masks.build import iter_masks  # noqa: E402
from persona_core.masks.inputs import LinearWeights  # noqa: E402
from persona_core.masks.select import n_pruned  # noqa: E402
from persona_core.masks.spec import MaskSpec, spec_key  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from persona_core.store.store import open_store  # noqa: E402

log = logging.getLogger("bench.masks")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "anthropic-persona")


def calibrate_all(loaded, catalog, store) -> float:
    from persona_core.calib.config import CalibConfig
    from persona_core.calib.recorder import calibrate_persona
    from persona_core.calib.parts import write_stats

    config = CalibConfig(batch_size=8)
    t0 = time.time()
    for i, persona in enumerate(catalog):
        stats, _ = calibrate_persona(loaded, persona, config)
        write_stats(store, stats)
        if i % 50 == 0:
            log.info("calibrated %d/%d personas", i + 1, len(catalog))
    return time.time() - t0


def synthetic_all(loaded, catalog, store, seed: int = 0) -> float:
    """Real activations of the default model on the general texts, channel scales perturbed per persona.

    Each persona's channel j is scaled by exp(0.15 * N(0, 1)) (seeded by its position):
    realistic magnitudes and outlier channels, persona-specific differences. Seconds, not minutes.
    """
    from persona_core.calib.config import CalibConfig
    from persona_core.calib.recorder import calibrate
    from persona_core.catalog import reference_persona
    from persona_core.calib.parts import write_stats
    from persona_core.calib.stats import GroupStats, PersonaStats

    t0 = time.time()
    base = calibrate(loaded, list(reference_persona().calibration[:16]), CalibConfig(batch_size=8))
    for i, persona in enumerate(catalog):
        g = torch.Generator().manual_seed(seed + i)
        groups = {}
        for key, s in base.items():
            f = torch.exp(0.15 * torch.randn(s.width, generator=g, dtype=torch.float64))
            groups[key] = GroupStats(s.tokens, s.sum * f, s.sumsq * f * f, s.sumabs * f, s.samples,
                                     s.norm_sum * f, s.norm_sumsq * f * f)
        write_stats(store, PersonaStats(loaded.key, persona.id, persona.content_hash, groups, "synthetic"))
    return time.time() - t0


def real_pairs(catalog, n_pairs: int, statements: int, model: str = DEFAULT_MODEL) -> dict:
    """Diff and delta figures from *calibrated* statistics of opposing pairs (synthetic
    per-persona noise exaggerates how much opposing masks differ).

    For each pair: both sides' `wanda` masks (seed 1's per-persona masks) and the
    `contrastive-wanda` pair at 50%; the opposite's mask delta-coded against the persona's.
    """
    from persona_core.calib.config import CalibConfig
    from persona_core.calib.recorder import calibrate_persona
    from persona_core.masks.build import build_pair_masks

    loaded = load_model(model, device="cpu", dtype="float32")
    config = CalibConfig(batch_size=8)
    figures: dict[str, list[float]] = {}
    t0 = time.time()
    for a, b in catalog.pairs()[:n_pairs]:
        sa, sb = (calibrate_persona(loaded, _cap(catalog[p], statements), config)[0] for p in (a, b))
        for method in ("wanda", "contrastive-wanda"):
            spec = MaskSpec(method, 0.5)
            if method == "wanda":
                ma, mb = (build_pair_masks(loaded, s, spec=spec)[0] for s in (sa, sb))
            else:
                ma, mb = build_pair_masks(loaded, sa, sb, spec=spec)
            numel = sum(m.numel() for m in ma.values())
            figures.setdefault(f"{method}_opposing_diff_fraction", []).append(
                sum(int((ma[n] ^ mb[n]).sum()) for n in ma) / numel)
            figures.setdefault(f"{method}_bits_per_weight_delta", []).append(
                8 * len(encode_mask(mb, {}, base=ma, base_key="base")) / numel)
    out = {k: round(sum(v) / len(v), 5) for k, v in figures.items()}
    out.update(pairs=min(n_pairs, len(catalog.pairs())), statements=statements, seconds=round(time.time() - t0, 1))
    return out


def _cap(persona, n: int):
    from dataclasses import replace

    return replace(persona, calibration=persona.calibration[:n])


def reference_loop(weights: LinearWeights, stats, sparsity: float) -> dict[str, torch.Tensor]:
    """Seed-1 style: Wanda score, then a Python loop over rows, sorting each."""
    out = {}
    for g in weights.groups:
        rms = stats.groups[(g.layer, g.name)].rms.float()
        for name in g.modules:
            w = weights.weight(name)
            score = w.abs() * rms
            mask = torch.ones_like(score, dtype=torch.bool)
            k = n_pruned(score.shape[1], sparsity)
            for i in range(score.shape[0]):
                idx = torch.sort(score[i], stable=True)[1][:k]
                mask[i, idx] = False
            out[name] = mask
    return out


def speedup(weights: LinearWeights, stats, layers: int = 2, repeats: int = 3) -> tuple[float, float]:
    sub = LinearWeights([g for g in weights.groups if g.layer < layers], weights.tensors)
    spec = MaskSpec("wanda", 0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # best of `repeats` for each (timeit's convention: the least disturbed run)
        t_ours = t_ref = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours = dict((n, m[0]) for n, m in iter_masks(sub, [stats], spec))
            t_ours = min(t_ours, time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = reference_loop(sub, stats, 0.5)
            t_ref = min(t_ref, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    # the loop keeps ties in index order; ours orders them by |W| first: compare kept counts only
    assert all(int(ours[n].sum()) == int(ref[n].sum()) for n in ours)
    return t_ref / t_ours, t_ours


def budget_seconds(pairs: list[str], methods: list[str], tmp: str, model: str = DEFAULT_MODEL) -> dict:
    """Seconds per budgeted pair on the default model (frontier.py's timed search, built-in catalog)."""
    from frontier import setup, time_searches

    from persona_core.masks.budget import Budget

    builtin = load_catalog("builtin")
    pairs_ = [tuple(p.split(",")) for p in pairs]
    ev, weights, stats, config = setup(model, builtin, pairs_, os.path.join(tmp, "budget-store"))
    budget = Budget(perplexity_ratio=1.10)
    out = time_searches(ev, weights, builtin, pairs_, methods, stats, budget, config)
    return {"budget": budget.perplexity_ratio, "val_text": budget.ppl_text, "threads": torch.get_num_threads(), **out}


# The smallest run, on the tiny random model: tests/test_benchmarks.py runs it (make test), so a benchmark
# cannot rot unseen between studies.
SMOKE = ["--model", "tiny-random-llama", "--catalog", "builtin", "--sample-pairs", "1", "--real-statements", "2",
         "--budget-pairs"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--catalog", default=SHARED if os.path.isdir(SHARED) else "builtin")
    ap.add_argument("--statements", type=int, default=4, help="calibration statements per persona")
    ap.add_argument("--sample-pairs", type=int, default=8, help="pairs read back for diff and delta figures")
    ap.add_argument("--stats", choices=["synthetic", "calibrated"], default="synthetic",
                    help="synthetic: real activations on general texts, perturbed per persona (fast); "
                         "calibrated: calibrate_persona on --statements statements each (slow on 2 cores)")
    ap.add_argument("--real-statements", type=int, default=16,
                    help="statements per persona calibrated for the real-statistics diff/delta figures")
    ap.add_argument("--store", default=None, help="store URL (default: a temporary folder)")
    ap.add_argument("--budget-pairs", nargs="*", default=["introvert,extrovert"],
                    help="built-in A,B pairs whose budgeted search is timed (none: skip)")
    ap.add_argument("--budget-methods", nargs="+", default=["contrastive-penalty"])
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("PERSONA_PROGRESS", "0")

    catalog = load_catalog(args.catalog, SplitConfig(max_calibration=args.statements))
    tmp = tempfile.mkdtemp(prefix="bench-masks-")
    store = open_store(args.store or os.path.join(tmp, "store"))
    loaded = load_model(args.model, device="cpu", dtype="float32")
    weights = LinearWeights.from_model(loaded)
    calib_s = (calibrate_all if args.stats == "calibrated" else synthetic_all)(loaded, catalog, store)

    from persona_core.calib.stored import read_persona_stats

    first = read_persona_stats(store, loaded.key, next(iter(catalog)).id)
    ratio, t_ours = speedup(weights, first)
    del loaded, weights

    import ray

    from persona_core.run.plan import Selection, make_plan
    from persona_jobs import build_masks
    from persona_jobs.flags import load

    plan = make_plan(load(None, {"catalog": args.catalog, "model": args.model, "store": store.url,
                                 "split.max_calibration": args.statements, "masks.methods": ["contrastive-wanda"],
                                 "masks.baselines": [], "masks.sparsities": [0.5], "evaluate.enabled": False}),
                     Selection())  # what `persona-jobs build-masks` plans: the statistics stored
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    summary = build_masks.run(plan)
    seconds = time.time() - t0
    ray.shutdown()

    spec = MaskSpec("contrastive-wanda", 0.5)
    from persona_core.models.loading import model_key

    mkey = model_key(args.model)
    pairs = catalog.pairs()[: args.sample_pairs]
    plain_bits, delta_bits, diff = [], [], []
    for a, b in pairs:
        # masks derived from statistics live under calib=<the statistics' calibration config>
        ka, kb = (spec_key(mkey, spec, p, calib=first.calib_hash) for p in (a, b))
        ma, _ = read_mask(store, ka)
        mb, _ = read_mask(store, kb)
        numel = sum(m.numel() for m in ma.values())
        plain_bits.append(8 * store.fs.size(store.path(ka)) / numel)
        delta_bits.append(8 * len(encode_mask(mb, {}, base=ma, base_key=ka)) / numel)
        diff.append(sum(int((ma[n] ^ mb[n]).sum()) for n in ma) / numel)
    n_weights = numel
    real = real_pairs(catalog, args.sample_pairs, args.real_statements, args.model)
    budget = budget_seconds(args.budget_pairs, args.budget_methods, tmp, args.model) if args.budget_pairs else None
    print(json.dumps({
        "benchmark": "masks", "model": args.model, "catalog": catalog.name, "personas": len(catalog),
        "pairs": len(catalog.pairs()), "method": "contrastive-wanda", "sparsity": 0.5,
        "stats": (f"calibrated: calibrate_persona, {args.statements} statements per persona ({calib_s:.0f} s)"
                  if args.stats == "calibrated" else
                  f"synthetic: real default-model activations on 16 general texts, channel scales x exp(0.15 N(0,1)) "
                  f"per persona ({calib_s:.0f} s)"),
        "cpus": os.cpu_count(), "weights_per_mask": n_weights,
        "masks": summary.done, "failed": summary.failed, "seconds": round(seconds, 1),
        "masks_per_min": round(60 * summary.done / seconds, 1),
        "speedup_vs_loop": round(ratio, 1), "selection_s_2_layers": round(t_ours, 3),
        "bits_per_weight_plain": round(sum(plain_bits) / len(plain_bits), 4),
        "bits_per_weight_delta": round(sum(delta_bits) / len(delta_bits), 4),
        "opposing_diff_fraction": round(sum(diff) / len(diff), 5),
        "real_stats": real, "budget": budget,
        "targets": {"speedup": ">=20", "seconds_216": "<300", "plain": "<=1", "delta": "<=0.2",
                    "budget_seconds_per_pair": "<=60"},
    }))


if __name__ == "__main__":
    main()
