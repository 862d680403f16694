"""Learned steering's step size against what the budget lets it separate (validation data only).

``dense+steer-learned`` trains one residual vector per pair and candidate layer with Adam at
``lr`` x the dense residual RMS at that layer (`persona_core.eval.steering.LearnedSteer`), then
picks (layer, alpha) within the perplexity budget on validation statements and validation text.
A step size that is too large for a model shows up as a vector that is only ever usable at a
small fraction of its length. This sweep learns the vector at each ``--lrs`` value and runs that
same choice, so the question "is the baseline held back by its step size?" is answered on the
data the choice may see: per pair and lr the chosen layer and alpha, the validation separation
and perplexity ratio, the vector's norm per layer and every setting tried; per lr the mean
validation separation over pairs. Nothing here reads evaluation statements or test text.

    python benchmarks/sweep_steer_learned.py --config configs/study-learned-anthropic-gemma.yaml \
        --pairs conscientiousness,not-conscientiousness --lrs 0.05 0.01 0.0025

Without ``--config``: the builtin catalog, the default model and `EvalConfig`'s defaults.
Prints one JSON line per (pair, lr), then one with the per-lr means.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from persona_core.catalog import load_catalog  # noqa: E402
from persona_core.eval.config import EvalConfig  # noqa: E402
from persona_core.eval.engine import Evaluator  # noqa: E402
from persona_core.eval.steered import LEARNED_STEER, learned_choice  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL  # noqa: E402
from persona_core.run.config import load_config  # noqa: E402
from persona_core.run.plan import eval_config, split_config  # noqa: E402


def setting(args):
    """(model, catalog, EvalConfig) from the study config, or the defaults."""
    if args.config is None:
        return args.model or DEFAULT_MODEL, load_catalog(args.catalog), EvalConfig(val_text=args.val_text)
    cfg = load_config(args.config)
    return args.model or cfg.model, load_catalog(cfg.catalog, split_config(cfg)), eval_config(cfg)[0]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="a study config: its model, catalog, split and evaluate options")
    ap.add_argument("--model", default=None, help="overrides the config's model")
    ap.add_argument("--catalog", default="builtin", help="without --config")
    ap.add_argument("--val-text", default=None, help="without --config: the validation text (default builtin:general)")
    ap.add_argument("--pairs", nargs="+", default=["introvert,extrovert"], help="A,B opposing pairs of the catalog")
    ap.add_argument("--lrs", nargs="+", type=float, default=[LEARNED_STEER.lr, LEARNED_STEER.lr / 5])
    ap.add_argument("--steps", type=int, default=None, help="Adam steps (default: LearnedSteer's)")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model, catalog, config = setting(args)
    pairs = [tuple(p.split(",")) for p in args.pairs]
    for a, b in pairs:
        if a not in catalog or b not in catalog:
            raise SystemExit(f"--pairs {a},{b}: not in the catalog ({', '.join(x for x in (a, b) if x not in catalog)})")
    ev = Evaluator(model, device="cpu")
    by_lr: dict[float, list[float]] = {}
    for a, b in pairs:
        for lr in args.lrs:
            knobs = replace(LEARNED_STEER, lr=lr, **({"steps": args.steps} if args.steps else {}))
            t0 = time.perf_counter()
            vectors, choice = learned_choice(ev, catalog[a], catalog[b], config, knobs)
            by_lr.setdefault(lr, []).append(choice.separation)
            print(json.dumps({
                "pair": f"{a}/{b}", "lr": lr, "layer": choice.layer, "alpha": choice.alpha,
                "val_separation": round(choice.separation, 4), "val_ppl_ratio": round(choice.ppl_ratio, 4),
                "within_budget": choice.within_budget,
                "norms": {str(k): round(float(v.norm()), 2) for k, v in vectors.items()},
                "tried": [[t["layer"], t["alpha"], round(t["separation"], 3), round(t["ppl_ratio"], 3)]
                          for t in choice.tried],
                "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    print(json.dumps({"benchmark": "sweep_steer_learned", "model": ev.model_key, "budget": config.ppl_budget,
                      "pairs": len(pairs), "mean_val_separation": {str(lr): round(sum(v) / len(v), 4)
                                                                   for lr, v in by_lr.items()}}))


if __name__ == "__main__":
    main()
