"""The separation / general-capability frontier of mask methods, and the cost of a budget search.

For opposing pairs of a catalog (default: built-in pairs) on the default model, each method is
scored over a sweep of settings with the budget search's own callables (`PairSearch`): the
WikiText-2 *validation* perplexity ratio (masked / dense, the larger of the pair's two masks) and
the pair's *validation* separation (validation statements carved from the calibration statements;
the masks are built from the statistics without them). Then one budgeted search per pair and
method (``--budget``) is timed. Prints one JSON line:

* ``frontier``: per method and setting, per pair ``[ppl_ratio, separation]`` and the means;
* ``budget``: per method, per pair the chosen setting, its validation figures, points tried and
  seconds; ``seconds_per_pair`` the mean (target <= 60 s on 2 CPU cores).

Statistics are calibrated once into ``--store`` (default: a folder under the system temp dir,
reused by later runs) with the default calibration settings (with ``attribution: true`` when a
method scores MLP channels from it, e.g. ``contrastive-attribution``, whose masks are ffn-channels).

    python benchmarks/frontier.py [--pairs introvert,extrovert] [--sparsities 0.02 0.05 0.1 0.2]
        [--methods contrastive-penalty general-gated] [--budget 1.1] [--no-frontier]
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

from persona_core.masks.budget import Budget, Setting  # noqa: E402
from persona_core.masks.budgeted_build import PairSearch  # noqa: E402
from persona_core.calib.config import CalibConfig  # noqa: E402
from persona_core.calib.recorder import calibrate_persona  # noqa: E402
from persona_core.catalog import reference_persona, load_catalog  # noqa: E402
from persona_core.masks.inputs import LinearWeights  # noqa: E402
from persona_core.masks.methods import METHODS  # noqa: E402
from persona_core.masks.spec import MaskSpec  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL  # noqa: E402
from persona_core.calib.parts import write_stats  # noqa: E402
from persona_core.calib.stored import read_persona_stats, stats_exist  # noqa: E402

log = logging.getLogger("bench.frontier")


def stats_for(ev, people, store, config: CalibConfig) -> dict:
    out = {}
    for p in people:
        if not stats_exist(store, ev.model_key, p.id, p.content_hash):
            t0 = time.time()
            write_stats(store, calibrate_persona(ev.loaded, p, config)[0], calib_config=config.to_dict())
            log.info("calibrated %s in %.0f s", p.id, time.time() - t0)
        out[p.id] = read_persona_stats(store, ev.model_key, p.id, p.content_hash, config.hash)
    return out


def setup(model: str, catalog, pairs, store, attribution: bool = False, config: CalibConfig | None = None):
    """(evaluator, a copy of the prunable weights, the pairs' and general statistics, calibration config:
    `config`, default `CalibConfig` with `attribution`)."""
    from persona_core.eval.engine import Evaluator

    ev = Evaluator(model, device="cpu")
    lw = LinearWeights.from_model(ev.loaded)
    weights = LinearWeights(lw.groups, {k: v.detach().clone() for k, v in lw.tensors.items()})  # never the live ones
    config = config or CalibConfig(attribution=attribution)
    people = [reference_persona()] + [catalog[x] for pair in pairs for x in pair]
    return ev, weights, stats_for(ev, people, store, config), config


def searcher(ev, weights, method: str, a, b, stats, budget: Budget, config: CalibConfig,
             allocation: str = "uniform") -> PairSearch:
    people = {"persona": a, "opposite": b, "general": reference_persona()}
    m = METHODS[method]
    roles = [(r, people[r]) for r in m.needs]
    granularity = "ffn-channels" if m.reads else "unstructured"  # channel-scoring methods build channel masks
    return PairSearch(ev, weights, MaskSpec(method, 0.0, granularity, budget=budget, allocation=allocation), budget,
                      roles, [stats[p.id] for _, p in roles], b, config)


def time_searches(ev, weights, catalog, pairs, methods, stats, budget: Budget, config: CalibConfig) -> dict:
    """One budgeted search per (method, pair), timed: per method and pair the chosen setting, its
    validation figures, points tried and seconds (setup included); ``seconds_per_pair`` the mean."""
    searches: dict = {}
    for method in methods:
        for a_id, b_id in pairs:
            t1 = time.time()
            out = searcher(ev, weights, method, catalog[a_id], catalog[b_id], stats, budget, config).run()
            seconds = time.time() - t1  # setup (held-out statistics, dense references) included
            ch = out.result.to_dict()["chosen"]
            searches.setdefault(method, {})[f"{a_id}/{b_id}"] = {
                "sparsity": ch["sparsity"], "strength": ch["strength"], "val_ppl_ratio": round(out.final_ratio, 4),
                "val_separation": ch["separation"], "within_budget": out.result.within_budget,
                "points": len(out.result.points), "seconds": round(seconds, 1)}
    all_s = [v["seconds"] for per in searches.values() for v in per.values()]
    searches["seconds_per_pair"] = round(sum(all_s) / len(all_s), 1) if all_s else None
    return searches


# The smallest run, on the tiny random model: tests/test_benchmarks.py runs it (make test), so a benchmark
# cannot rot unseen between studies.
SMOKE = ["--model", "tiny-random-llama", "--methods", "contrastive-penalty", "--sparsities", "0.1",
         "--store", "{tmp}/frontier-store", "--threads", "1"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", default="builtin")
    ap.add_argument("--pairs", nargs="+", default=["introvert,extrovert"], help="A,B pairs (or 'all')")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--methods", nargs="+", default=["contrastive-penalty", "general-gated"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--strength", action="append", default=[], metavar="METHOD=V1,V2",
                    help="strength values swept for a method (default: the method's default value)")
    ap.add_argument("--budget", type=float, default=1.10)
    ap.add_argument("--allocation", default="uniform", help="sparsity across layers: uniform, owl or focus")
    ap.add_argument("--no-frontier", action="store_true", help="only time the budget search")
    ap.add_argument("--no-budget", action="store_true", help="only sweep the frontier")
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "persona-bench-frontier"))
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    catalog = load_catalog(args.catalog)
    pairs = catalog.pairs() if args.pairs == ["all"] else [tuple(p.split(",")) for p in args.pairs]
    t0 = time.time()
    ev, weights, stats, config = setup(args.model, catalog, pairs, args.store,
                                       attribution=any(METHODS[m].reads for m in args.methods))
    setup_s = time.time() - t0  # model load and calibration
    budget = Budget(perplexity_ratio=args.budget)
    sweeps = {m: [float(v) for v in vals.split(",")] for m, _, vals in (s.partition("=") for s in args.strength)}

    frontier: dict = {}
    if not args.no_frontier:
        for method in args.methods:
            m = METHODS[method]
            strengths = sweeps.get(method) or ([m.defaults[m.strength[0]]] if m.strength else [None])
            for a_id, b_id in pairs:
                ps = searcher(ev, weights, method, catalog[a_id], catalog[b_id], stats, budget, config,
                              args.allocation)
                for t in strengths:
                    for s in args.sparsities:
                        setting = Setting(s, t)
                        row = frontier.setdefault(method, {}).setdefault(f"s={s:g}" + (f",{m.strength[0]}={t:g}"
                                                                                        if t is not None else ""), {})
                        ratio, sep = ps.perplexity_ratio(setting), ps.separation(setting)
                        row[f"{a_id}/{b_id}"] = [round(ratio, 4), round(sep, 4)]
                        log.info("%s %s %s/%s: ppl x%.4f separation %.3f", method, setting, a_id, b_id, ratio, sep)
                ev.masks.restore()
        for rows in frontier.values():
            for row in rows.values():
                vals = list(row.values())
                row["mean"] = [round(sum(v[0] for v in vals) / len(vals), 4), round(sum(v[1] for v in vals) / len(vals), 4)]

    searches = {} if args.no_budget else time_searches(ev, weights, catalog, pairs, args.methods, stats, budget,
                                                           config)
    print(json.dumps({
        "benchmark": "frontier", "model": args.model, "catalog": catalog.name, "pairs": [list(p) for p in pairs],
        "threads": args.threads, "load_avg": round(os.getloadavg()[0], 1), "setup_s": round(setup_s, 1),
        "val_text": budget.ppl_text, "ppl_windows": budget.ppl_windows, "ppl_window": budget.ppl_window,
        "val_statements": budget.val_statements, "budget": args.budget, "allocation": args.allocation,
        "frontier": frontier, "searches": searches,
        "target_seconds_per_pair": "<=60"}))


if __name__ == "__main__":
    main()
