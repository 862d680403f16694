"""Benchmark the learned budgeted mask: seconds per pair next to the training-free search's, and tokens/s.

One pair at a time, the same evaluator, weights, statistics and budget (x1.10 validation perplexity
on WikiText-2 ``valid.txt`` by default) for both:

* ``training_free``: `PairSearch` for ``--free-method`` (contrastive-penalty), timed as
  `benchmarks/frontier.py` times it (setup included): chosen sparsity, validation figures, points,
  seconds; ``seconds_per_pair`` their mean (issue 26's reference: 148 s on 2 cores).
* ``learned``: `learn_pair` for ``learned-contrastive`` along the budget's k path (the learner's
  Adam steps, each point's validation perplexity and separation, the final check): the same
  figures plus ``steps`` and ``learn_s`` (the stepping alone); ``seconds_per_pair`` their mean.
* ``learner_tokens_per_s``: tokens through the learner's steps (both poles' statement batches and
  general windows, as the steps drew them, each statement counted with its prefix although the
  learner runs the shared prefix once per batch) over ``learn_s``; ``plain_tokens_per_s``: the same
  sequences through a plain forward+backward of the model (gradients to every weight, no gate,
  no optimizer, every sequence whole), best of ``--reference-reps``; ``ratio_vs_plain`` learner
  over plain (above 1: the prefix sharing saves more than the gate and the two poles cost).
* ``learned_vs_free``: learned seconds per pair over training-free seconds per pair (issue 26's
  target: <= 1).

Each pair's ``path`` lists every point the learner judged (sparsity, validation perplexity ratio,
validation separation). ``--setting K=V,K=V`` (repeatable) runs the learner once per setting of its
knobs (`persona-jobs methods` lists them): a knob sweep on validation data only, ``learned`` then maps
each setting to its figures and ``mean_val_separation`` compares them. ``--config`` takes a study
config's model, catalog and split, calibration options and budget.

    python benchmarks/learned_budget.py [--model smollm2-135m] [--pairs introvert,extrovert] [--threads 2]
    python benchmarks/learned_budget.py --config configs/study-learned-anthropic-gemma.yaml --skip-free \
        --pairs high-discount-rate,not-high-discount-rate --setting steps=2,warmup=8 --setting steps=4,warmup=16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from persona_core.calib.config import CalibConfig  # noqa: E402
from persona_core.catalog import load_catalog  # noqa: E402
from persona_core.eval.objective import Objective, draw, pad_sequences  # noqa: E402
from persona_core.learn.contrastive import learn_pair  # noqa: E402
from persona_core.masks.budget import Budget  # noqa: E402
from persona_core.errors import UserError  # noqa: E402
from persona_core.masks.methods import METHODS, parse_params  # noqa: E402
from persona_core.masks.spec import MaskSpec  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL  # noqa: E402
from persona_core.run.config import load_config  # noqa: E402
from persona_core.run.plan import calib_config, split_config  # noqa: E402

log = logging.getLogger("bench.learned_budget")
LEARNED = "learned-contrastive"


def step_sequences(objectives: tuple[Objective, Objective], step: int) -> list[list[int]]:
    """The token sequences the learner's step `step` (0-based) runs forward and backward, both poles
    (the draws `Objective.__call__` makes)."""
    seqs: list[list[int]] = []
    for side, obj in enumerate(objectives):
        oi = draw(len(obj.own), obj.batch, obj.seed, step, 2 * side)
        qi = draw(len(obj.other), obj.batch, obj.seed, step, 2 * side + 1)
        seqs += [obj.own.prefix + obj.own.statements[i] for i in oi]
        seqs += [obj.other.prefix + obj.other.statements[i] for i in qi]
        if obj.general and obj.general_weight > 0 and obj.general_batch > 0:
            gi = draw(len(obj.general), obj.general_batch, obj.seed, step, 7)
            seqs += [list(obj.general[i].ids) for i in gi]
    return seqs


def plain_forward_backward(model, seqs: list[list[int]], pad: int, reps: int, max_logits: int = 2 ** 28) -> float:
    """Best seconds of one forward+backward of `seqs` (padded as the learner pads them), gradients to
    every weight: what training the model itself would cost per token. The sequences go through in
    chunks whose logits stay under `max_logits` floats (a 262k-token vocabulary makes one batch's
    logits, their log-softmax and its gradient tens of GB); the chunks' seconds add up."""
    params = [p for p in model.parameters()]
    before = [p.requires_grad for p in params]
    width = max(map(len, seqs)) * model.config.get_text_config().vocab_size
    size = max(1, max_logits // width)
    chunks = [pad_sequences(seqs[i:i + size], pad, next(model.parameters()).device) for i in range(0, len(seqs), size)]
    best = float("inf")
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(reps):
            model.zero_grad(set_to_none=True)
            total = 0.0
            for ids, att in chunks:
                t0 = time.perf_counter()
                logits = model(input_ids=ids, attention_mask=att).logits
                torch.log_softmax(logits.float(), -1).mean().backward()
                total += time.perf_counter() - t0
                del logits
            best = min(best, total)
    finally:
        model.zero_grad(set_to_none=True)
        for p, rg in zip(params, before):
            p.requires_grad_(rg)
    return best


def time_learned(ev, weights, catalog, pairs, stats, budget: Budget, config, params: dict, reps: int) -> dict:
    out: dict = {}
    tokens = learn_s = 0.0
    ref_tokens = ref_s = 0.0
    for a_id, b_id in pairs:
        roles = [("persona", catalog[a_id]), ("opposite", catalog[b_id])]
        assert tuple(r for r, _ in roles) == METHODS[LEARNED].needs
        spec = MaskSpec(LEARNED, 0.0, "ffn-channels", params=params, budget=budget)
        t0 = time.perf_counter()
        res = learn_pair(ev, weights, spec, roles, [stats[p.id] for _, p in roles], config)
        seconds = time.perf_counter() - t0
        ln = res.learner
        pair_tokens = sum(len(s) for step in range(ln.state.step) for s in step_sequences(ln.objectives, step))
        tokens += pair_tokens
        learn_s += ln.seconds
        sample = step_sequences(ln.objectives, 0)
        if reps > 0:
            ref_tokens += sum(len(s) for s in sample)
            ref_s += plain_forward_backward(ev.model, sample, ln.objectives[0].pad, reps)
        chosen = res.result.to_dict()["chosen"] if res.result is not None else {"sparsity": res.spec.sparsity,
                                                                                 "separation": None}
        path = res.result.points if res.result is not None else []
        out[f"{a_id}/{b_id}"] = {
            "sparsity": chosen["sparsity"], "val_ppl_ratio": round(res.final_ratio, 4),
            "val_separation": chosen["separation"],
            "within_budget": res.result.within_budget if res.result is not None else None,
            "points": len(path) or 1, "steps": ln.state.step,
            "learn_s": round(ln.seconds, 1), "seconds": round(seconds, 1),
            "path": [[p.setting.sparsity, round(p.perplexity_ratio, 4),
                      None if p.separation is None else round(p.separation, 4)] for p in path]}
    per = [v["seconds"] for v in out.values()]
    out["seconds_per_pair"] = round(sum(per) / len(per), 1) if per else None
    out["learner_tokens_per_s"] = round(tokens / learn_s, 1) if learn_s else None
    out["plain_tokens_per_s"] = round(ref_tokens / ref_s, 1) if ref_s else None
    out["ratio_vs_plain"] = (round(out["learner_tokens_per_s"] / out["plain_tokens_per_s"], 3)
                             if out["learner_tokens_per_s"] and out["plain_tokens_per_s"] else None)
    return out


# The smallest run, on the tiny random model: tests/test_benchmarks.py runs it (make test), so a benchmark
# cannot rot unseen between studies.
SMOKE = ["--model", "tiny-random-llama", "--grid-steps", "3", "--setting", "steps=1,warmup=1", "--setting", "steps=1,warmup=1,lr=0",
         "--val-text", "builtin:general", "--reference-reps", "1", "--threads", "1", "--store", "{tmp}/learned-budget"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None,
                    help="a study config: its model, catalog and split, calibration options and budget "
                         "(--model and --budget still override)")
    ap.add_argument("--model", default=None, help=f"default: the config's, else {DEFAULT_MODEL}")
    ap.add_argument("--catalog", default="builtin", help="without --config")
    ap.add_argument("--pairs", nargs="+", default=["introvert,extrovert"], help="A,B pairs of the catalog")
    ap.add_argument("--budget", type=float, default=None,
                    help="perplexity ratio bound on the validation text (default: the config's, else 1.10)")
    ap.add_argument("--val-text", default=None,
                    help="the budget's validation text (a general-text spec; see docs/evaluation.md; "
                         "default: the config's, else wikitext-2-valid)")
    ap.add_argument("--grid-steps", type=int, default=None, help="points of the budget's grid (default: Budget's)")
    ap.add_argument("--free-method", default="contrastive-penalty", help="the training-free method timed beside it")
    ap.add_argument("--setting", action="append", default=None, metavar="K=V,K=V",
                    help="learned-contrastive knobs for one run of the learner (repeatable: a knob sweep; "
                         "\"\": the config's params, else the method's defaults; K=V changes one knob on top)")
    ap.add_argument("--reference-reps", type=int, default=3, help="plain forward+backward repetitions (best of; 0: none)")
    ap.add_argument("--skip-free", action="store_true", help="time only the learner")
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "persona-bench-learned-budget"))
    ap.add_argument("--threads", type=int, default=2)
    return ap


def parse_setting(text: str) -> dict:
    """``steps=4,lr=0.1`` -> {"steps": 4, "lr": 0.1}: `--param`'s parser, one method's keys; an unknown
    knob fails here, before any model loads."""
    items = [f"{LEARNED}.{t.strip()}" for t in text.split(",") if t.strip()]
    try:
        params = parse_params(items).get(LEARNED, {})
        METHODS[LEARNED].resolve(params)
    except (UserError, ValueError) as err:
        raise SystemExit(f"--setting {text!r}: {err}") from None
    return params


def setting(args) -> tuple[str, object, Budget, CalibConfig, dict]:
    """(model, catalog, budget, calibration config, the config's learned-contrastive params)."""
    if args.config is None:
        budget = Budget(perplexity_ratio=args.budget or 1.10, ppl_text=args.val_text or "wikitext-2-valid")
        return args.model or DEFAULT_MODEL, load_catalog(args.catalog), budget, CalibConfig(), {}
    cfg = load_config(args.config)
    budget = Budget.from_value(cfg.masks.budget if cfg.masks.budget is not None else 1.10)
    overrides = {k: v for k, v in (("perplexity_ratio", args.budget), ("ppl_text", args.val_text)) if v is not None}
    params = dict(dict(cfg.masks.options.params).get(LEARNED, {}))
    return (args.model or cfg.model, load_catalog(cfg.catalog, split_config(cfg)), replace(budget, **overrides),
            calib_config(cfg), params)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("PERSONA_PROGRESS", "0")
    torch.set_num_threads(args.threads)
    from frontier import setup, time_searches  # the sibling benchmark's setup and timed training-free search

    model, catalog, budget, calib, base = setting(args)
    if args.grid_steps:
        budget = replace(budget, steps=args.grid_steps)
    settings = {text: {**base, **parse_setting(text)} for text in (args.setting or [""])}
    pairs = [tuple(p.split(",")) for p in args.pairs]
    for a, b in pairs:
        if a not in catalog or b not in catalog:
            raise SystemExit(f"--pairs {a},{b}: not in the catalog ({', '.join(x for x in (a, b) if x not in catalog)})")
    t0 = time.time()
    ev, weights, stats, config = setup(model, catalog, pairs, args.store, config=calib)
    setup_s = time.time() - t0
    free = None if args.skip_free else time_searches(ev, weights, catalog, pairs, [args.free_method], stats,
                                                     budget, config)
    learned = {}
    for text, params in settings.items():
        learned[text] = time_learned(ev, weights, catalog, pairs, stats, budget, config, params, args.reference_reps)
        log.info("setting %r: %s", text, json.dumps(learned[text]))
    free_s = free["seconds_per_pair"] if free else None
    first = next(iter(learned.values()))
    print(json.dumps({
        "benchmark": "learned_budget", "model": ev.model_key, "threads": torch.get_num_threads(), "budget": budget.perplexity_ratio,
        "val_text": budget.ppl_text, "grid": list(budget.grid()), "setup_s": round(setup_s, 1),
        "training_free": free, "learned": first if len(learned) == 1 else learned,
        "mean_val_separation": {text: mean_separation(out) for text, out in learned.items()},
        "learned_vs_free": round(first["seconds_per_pair"] / free_s, 2) if free_s else None}))


def mean_separation(out: dict) -> float | None:
    """Mean over pairs of the chosen point's validation separation (None where a pair has none)."""
    seps = [v["val_separation"] for v in out.values() if isinstance(v, dict)]
    return round(sum(seps) / len(seps), 4) if seps and None not in seps else None


if __name__ == "__main__":
    main()
