"""Evaluation throughput and mask-swap cost on the default model; prints ONE JSON line.

* ``units_per_min``: persona-condition units scored per minute (each persona's two
  dense conditions once, then masked and masked+prompt per mask), every default
  metric, the evaluator's default batch size.
* ``swap_fraction``: one mask swap (mask -> next mask, as the job does between a
  persona's units, masks already on the device; ``restore_s``: back to dense)
  over the time of one scoring batch (``batch_size`` statement sequences).
  Target < 0.05. Medians of interleaved repeats, so background load hits both.

    python benchmarks/evaluate.py [--model smollm2-135m] [--personas 1] [--masks 2]
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
from persona_core.evaluate import EvalConfig, Evaluator, evaluate_unit  # noqa: E402
from persona_core.metrics import STATEMENT_QUESTION  # noqa: E402


def magnitude_masks(ev: Evaluator, sparsity: float, jitter: int) -> dict[str, torch.Tensor]:
    """Per output row, keep the largest |W| (rows shifted by `jitter` so masks differ)."""
    out = {}
    for name in ev.prunable:
        w = ev.model.get_submodule(name).weight.detach().abs().float()
        k = max(1, int(w.shape[1] * sparsity))
        thresh = w.kthvalue(k, dim=1, keepdim=True).values
        out[name] = torch.roll(w > thresh, shifts=jitter, dims=0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--personas", type=int, default=1)
    ap.add_argument("--masks", type=int, default=2, help="masks per persona")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    ev = Evaluator(args.model)
    cfg = EvalConfig(max_statements=4, max_questions=2, max_new_tokens=24, ppl_windows=1)  # small: CPU-friendly
    cat = load_catalog("builtin")
    pairs = cat.pairs()
    personas = [cat[p] for pair in pairs for p in pair][: args.personas]
    masks = [magnitude_masks(ev, 0.5, j) for j in range(args.masks)]

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
        "swap_target": 0.05, "metric_seconds": {k: round(v, 1) for k, v in ev.timings.items()},
    }))


if __name__ == "__main__":
    main()
