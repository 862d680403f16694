"""How precisely does a perplexity check decide a x1.10 budget? Stored masks re-measured on more windows.

A budget is checked on a few fixed windows of a general text (`Budget.ppl_windows` of the
validation text when a mask is chosen, `EvalConfig.ppl_windows` of the test text when it is
reported). For every budgeted mask a store holds for the model (``--method`` filters by a glob), the
masked / dense perplexity ratio is measured on each text with each window count of ``--windows``
(the windows the pipeline itself would take: `text_windows`, spread evenly over the text), with
the standard error of the log ratio from the spread over windows. Without ``--store``, ``--random``
unstructured random masks at ``--sparsity`` are measured instead (no pipeline run needed).

Prints one JSON line: ``masks`` (per mask: sparsity, and per text and window count the ratio and
its standard error), and ``summary`` per text and window count: the mean standard error and the
largest gap between that ratio's log and the log of the ratio on the most windows. Texts default to
WikiText-2 valid and test (builtin:general where they are absent). Nothing is written.

    python benchmarks/budget_precision.py --store ./persona-store-learned --model smollm2-135m
        [--method 'learned-*'] [--windows 4 8 32 64] [--texts wikitext-2-valid wikitext-2-test]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from persona_core import apply_mask, list_masks, read_mask  # noqa: E402
from persona_core.calib.general_text import GeneralTextError, resolve_general_text  # noqa: E402
from persona_core.eval.validation import text_windows, window_nlls  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL  # noqa: E402

log = logging.getLogger("bench.budget_precision")

SMOKE = ["--model", "tiny-random-llama", "--random", "2", "--sparsity", "0.3", "--windows", "2", "4",
         "--texts", "builtin:general", "--threads", "1"]


def per_window(ev, windows: list[list[int]], memo: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's NLL and scored tokens (`window_nlls`), each distinct window scored once per model
    state: the window counts' sets overlap, and `memo` (one per mask) keeps what was scored."""
    todo = list(dict.fromkeys(tuple(w) for w in windows if tuple(w) not in memo))
    memo.update(zip(todo, window_nlls(ev, [list(w) for w in todo])))
    got = [memo[tuple(w)] for w in windows]
    return (torch.tensor([nll for nll, _ in got], dtype=torch.float64),
            torch.tensor([n for _, n in got], dtype=torch.float64))


def ratio_and_se(masked: tuple[torch.Tensor, torch.Tensor], dense: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[float, float | None]:
    """Pooled perplexity ratio over the windows, and the standard error of its log from the
    per-window log ratios (None with one window)."""
    (nll, n), (d_nll, _) = masked, dense
    ratio = math.exp(float((nll.sum() - d_nll.sum()) / n.sum()))
    per = (nll - d_nll) / n
    se = float(per.std() / math.sqrt(len(per))) if len(per) > 1 else None
    return ratio, se


def random_masks(ev, count: int, sparsity: float, seed: int = 0) -> list[tuple[str, float, dict]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        masks = {name: torch.rand(ev.model.get_submodule(name).weight.shape, generator=g) >= sparsity
                 for name in ev.prunable}
        out.append((f"random-{i}", sparsity, masks))
    return out


def stored_masks(ev, store: str, method: str):
    for ref in list_masks(store, ev):
        if ref.budget and fnmatch.fnmatch(ref.base, method):
            mask = read_mask(store, ref)
            yield f"{ref.owner} {ref.method} {ref.budget}", round(mask.sparsity, 4), mask


def measure(ev, masks, texts: list[str], counts: list[int]) -> tuple[list[dict], dict]:
    most = max(counts)
    windows = {t: {c: text_windows(ev.tokenizer, t, 128, c) for c in counts} for t in texts}
    dense_memo: dict = {}
    dense = {t: {c: per_window(ev, w, dense_memo) for c, w in per.items()} for t, per in windows.items()}
    rows = []
    for name, sparsity, mask in masks:
        row: dict = {"mask": name, "sparsity": sparsity}
        memo: dict = {}
        with apply_mask(ev, mask):
            for t, per in windows.items():
                for c, w in per.items():
                    ratio, se = ratio_and_se(per_window(ev, w, memo), dense[t][c])
                    row[f"{t}@{c}"] = {"ratio": round(ratio, 4), "se_log": None if se is None else round(se, 4),
                                       "windows": len(w)}
        log.info("%s: %s", name, {k: v["ratio"] for k, v in row.items() if isinstance(v, dict)})
        rows.append(row)
    summary = {}
    for t in texts:
        for c in counts:
            cells = [r[f"{t}@{c}"] for r in rows]
            ses = [x["se_log"] for x in cells if x["se_log"] is not None]
            gaps = [abs(math.log(r[f"{t}@{c}"]["ratio"]) - math.log(r[f"{t}@{most}"]["ratio"])) for r in rows]
            summary[f"{t}@{c}"] = {"mean_se_log": round(sum(ses) / len(ses), 4) if ses else None,
                                   "max_gap_log_to_most": round(max(gaps), 4) if gaps else None}
    return rows, summary


def default_texts() -> list[str]:
    try:
        resolve_general_text("wikitext-2-valid")
        resolve_general_text("wikitext-2-test")
        return ["wikitext-2-valid", "wikitext-2-test"]
    except GeneralTextError as err:
        log.warning("%s: measuring on builtin:general", err)
        return ["builtin:general"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--store", default=None, help="measure this store's budgeted masks for the model")
    ap.add_argument("--method", default="*", help="only masks whose method matches this glob")
    ap.add_argument("--random", type=int, default=3, help="without --store: this many random masks")
    ap.add_argument("--sparsity", type=float, default=0.05, help="the random masks' (unstructured) sparsity")
    ap.add_argument("--windows", nargs="+", type=int, default=[4, 8, 32, 64], help="window counts (128 tokens each)")
    ap.add_argument("--texts", nargs="+", default=None,
                    help="general texts (default: wikitext-2-valid and -test, builtin:general where WikiText-2 is absent)")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv: list[str] | None = None) -> None:
    from persona_core.eval.engine import Evaluator

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if any(c < 1 for c in args.windows):
        raise SystemExit(f"--windows must be counts >= 1, got {args.windows}")
    texts = args.texts or default_texts()
    t0 = time.time()
    ev = Evaluator(args.model, device="cpu")
    masks = (stored_masks(ev, args.store, args.method) if args.store
             else random_masks(ev, args.random, args.sparsity))
    rows, summary = measure(ev, masks, texts, sorted(set(args.windows)))
    if not rows:
        raise SystemExit(f"no budgeted masks for {ev.model_key} matching {args.method!r} in {args.store}")
    print(json.dumps({"benchmark": "budget_precision", "model": ev.model_key, "masks": rows, "summary": summary,
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
