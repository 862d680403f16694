"""Evaluation throughput and mask-swap cost on the default model; prints ONE JSON line.

* ``units_per_min``: persona-condition units scored per minute (each persona's two
  dense conditions once, then masked and masked+prompt per mask), every default
  metric, the evaluator's default batch size.
* ``swap_fraction``: one mask swap (mask -> next mask, as the job does between a
  persona's units, masks already on the device; ``restore_s``: back to dense)
  over the time of one scoring batch (``batch_size`` statement sequences).
  Target < 0.05. Medians of interleaved repeats, so background load hits both.
* ``pref_tokens_per_s`` / ``plain_tokens_per_s`` / ``pref_vs_plain``: statement-preference
  scoring (shared prefix, KV cache reused, LM head on scored positions only) against a
  plain batched forward pass of the model (full logits) over the same token batches
  (prefix + statement, sorted by length, ``batch_size`` per batch); same real tokens
  counted on both sides. Target >= 0.8.
* ``fewshot_stmts_per_s_reuse`` / ``_noreuse`` / ``fewshot_reuse_speedup``: statements
  scored per second under the few-shot condition (description + k calibration examples)
  with and without reusing the prefix's key/value cache.
* ``fewshot_windows_per_s_reuse`` / ``_noreuse`` / ``fewshot_ppl_reuse_speedup``: perplexity
  windows (128 tokens of general text) scored per second after the same few-shot prompt
  (the ``dense+fewshot`` / ``masked+fewshot`` perplexity), with and without the reused cache.

    python benchmarks/evaluate.py [--model smollm2-135m] [--personas 1] [--masks 2] [--statements 48]
                                  [--skip-units]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from persona_core.catalog import load_catalog  # noqa: E402
from persona_core.eval.config import EvalConfig  # noqa: E402
from persona_core.eval.engine import Evaluator  # noqa: E402
from persona_core.eval.unit import evaluate_unit  # noqa: E402
from persona_core.eval.fewshot import FewShot  # noqa: E402
from persona_core.eval.validation import STATEMENT_QUESTION  # noqa: E402
from persona_core.eval.validation import statement_scores, text_windows, window_nlls  # noqa: E402


def magnitude_masks(ev: Evaluator, sparsity: float, jitter: int) -> dict[str, torch.Tensor]:
    """Per output row, keep the largest |W| (rows shifted by `jitter` so masks differ)."""
    out = {}
    for name in ev.prunable:
        w = ev.model.get_submodule(name).weight.detach().abs().float()
        k = max(1, int(w.shape[1] * sparsity))
        thresh = w.kthvalue(k, dim=1, keepdim=True).values
        out[name] = torch.roll(w > thresh, shifts=jitter, dims=0)
    return out


# The smallest run, on the tiny random model: tests/test_benchmarks.py runs it (make test), so a benchmark
# cannot rot unseen between studies.
SMOKE = ["--model", "tiny-random-llama", "--repeats", "1", "--statements", "4"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--personas", type=int, default=1)
    ap.add_argument("--masks", type=int, default=2, help="masks per persona")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--statements", type=int, default=48, help="statements for the scoring throughput")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows after the few-shot prompt")
    ap.add_argument("--skip-units", action="store_true", help="only the scoring throughput figures")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    ev = Evaluator(args.model)
    cfg = EvalConfig(max_statements=4, max_questions=2, max_new_tokens=24, ppl_windows=1)  # small: CPU-friendly
    cat = load_catalog("builtin")
    pairs = cat.pairs()
    personas = [cat[p] for pair in pairs for p in pair][: args.personas]
    masks = [magnitude_masks(ev, 0.5, j) for j in range(args.masks)]

    scoring = scoring_figures(ev, args.statements, args.repeats, args.windows)
    if args.skip_units:
        print(json.dumps({"benchmark": "evaluate", "model": ev.model_key, "device": str(ev.device),
                          "threads": torch.get_num_threads(), **scoring}))
        return

    # --- throughput
    t0 = time.perf_counter()
    units = 0
    for p in personas:
        for j, m in enumerate(masks):
            table = evaluate_unit(ev, p, cat[p.opposite], m, {"method": "magnitude", "sparsity": 0.5 + j}, cfg)
            units += len(set(table.column("condition").to_pylist())) - (2 if j else 0)
    minutes = (time.perf_counter() - t0) / 60

    # --- swap vs one scoring batch (interleaved)
    device_masks = [{n: t.to(ev.device) for n, t in m.items()} for m in masks[:2]]
    ev.masks.apply(device_masks[0])
    ev.masks.restore()  # the dense snapshot exists from here on
    prefix = ev.encode(ev.prompt(None, STATEMENT_QUESTION))
    stmts = list(personas[0].evaluation)[: ev.batch_size]
    stmts = (stmts * ev.batch_size)[: ev.batch_size]
    batch = [(prefix, ev.encode(s, continuation=True)) for s in stmts]
    sync = torch.cuda.synchronize if ev.device.type == "cuda" else (lambda: None)
    swaps, restores, batches = [], [], []
    for r in range(args.repeats):
        ev.masks.apply(device_masks[r % len(device_masks)])
        sync(); t = time.perf_counter()
        ev.masks.apply(device_masks[(r + 1) % len(device_masks)]); sync()  # mask -> mask, as the job swaps
        swaps.append(time.perf_counter() - t)
        t = time.perf_counter()
        ev.masks.restore(); sync()  # -> dense, once per persona
        restores.append(time.perf_counter() - t)
        t = time.perf_counter()
        ev.continuation_logprobs(batch); sync()
        batches.append(time.perf_counter() - t)
    swap, score = statistics.median(swaps), statistics.median(batches)
    print(json.dumps({
        "benchmark": "evaluate", "model": ev.model_key, "device": str(ev.device), "dtype": str(ev.model.dtype),
        "threads": torch.get_num_threads(), "personas": len(personas), "masks_per_persona": len(masks),
        "units": units, "units_per_min": round(units / minutes, 2), "seconds": round(minutes * 60, 1),
        "batch_size": ev.batch_size, "batch_tokens": sum(len(a) + len(b) for a, b in batch),
        "swap_s": round(swap, 4), "restore_s": round(statistics.median(restores), 4), "batch_s": round(score, 4), "swap_fraction": round(swap / score, 4),
        "swap_target": 0.05, "metric_seconds": {k: round(v, 1) for k, v in ev.timings.items()}, **scoring,
    }))


def scoring_figures(ev: Evaluator, n: int, repeats: int, windows: int) -> dict:
    """Statement-preference scoring vs a plain batched forward; few-shot with and without KV reuse."""
    ev.configure(EvalConfig())
    cat = load_catalog("builtin")
    stmts = [s for p in cat for s in p.evaluation][:n]
    prefix = ev.encode(ev.prompt(None, STATEMENT_QUESTION))
    seqs = sorted((prefix + c for c in ev.encode_many(stmts, continuation=True)), key=len, reverse=True)
    tokens = sum(len(q) for q in seqs)
    sync = torch.cuda.synchronize if ev.device.type == "cuda" else (lambda: None)

    def plain():
        for b in range(0, len(seqs), ev.batch_size):
            ids, att = ev._pad(seqs[b: b + ev.batch_size])
            ev._forward(ids, att)
        sync()

    def ours():
        statement_scores(ev, stmts)
        sync()

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    plain(); ours()  # warm up
    tp, to = [], []
    for _ in range(repeats):  # interleaved, so background load hits both
        tp.append(timed(plain))
        to.append(timed(ours))
    t_plain, t_ours = statistics.median(tp), statistics.median(to)

    persona = cat["introvert"]
    fewshot = FewShot.for_persona(persona, cat[persona.opposite], k=8).system(None)

    def with_and_without_reuse(fn) -> tuple[float, float]:
        """Median seconds of `fn` with the prefix cache reused and without (interleaved)."""
        reuse, fresh = [], []
        for _ in range(repeats):
            ev.reuse_prefix = True
            reuse.append(timed(fn))
            ev.reuse_prefix = False
            fresh.append(timed(fn))
        ev.reuse_prefix = True
        return statistics.median(reuse), statistics.median(fresh)

    t_reuse, t_fresh = with_and_without_reuse(lambda: statement_scores(ev, stmts, fewshot))
    windows = text_windows(ev.tokenizer, None, 128, windows)
    w_reuse, w_fresh = with_and_without_reuse(lambda: window_nlls(ev, windows, fewshot))
    return {"pref_statements": len(stmts), "pref_tokens": tokens, "prefix_tokens": len(prefix),
            "plain_tokens_per_s": round(tokens / t_plain, 1), "pref_tokens_per_s": round(tokens / t_ours, 1),
            "pref_vs_plain": round(t_plain / t_ours, 3), "pref_vs_plain_target": 0.8,
            "fewshot_prefix_tokens": len(ev.encode(ev.prompt(fewshot, STATEMENT_QUESTION))),
            "fewshot_stmts_per_s_reuse": round(len(stmts) / t_reuse, 2),
            "fewshot_stmts_per_s_noreuse": round(len(stmts) / t_fresh, 2),
            "fewshot_reuse_speedup": round(t_fresh / t_reuse, 2),
            "fewshot_windows": len(windows), "fewshot_windows_per_s_reuse": round(len(windows) / w_reuse, 2),
            "fewshot_windows_per_s_noreuse": round(len(windows) / w_fresh, 2),
            "fewshot_ppl_reuse_speedup": round(w_fresh / w_reuse, 2)}


if __name__ == "__main__":
    main()
