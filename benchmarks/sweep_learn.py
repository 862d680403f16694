"""The learner's defaults, chosen on validation data (issue 14): a one-at-a-time sweep of steps,
learning rate and general-text weight around the study's setting.

    python benchmarks/sweep_learn.py --config configs/study-pruner.yaml [--personas ID ...] [--out DIR]

Per persona (description only): the training data is the study's (the dense+prompt model's
answers to `data.examples` of the generic calibration questions); the *validation* questions are
the generic calibration questions left over, never a training question and never one of the
persona's evaluation questions (the file's questions are what the study reports on; the sweep
never reads them). Each setting learns a mask at `--sparsity` and is scored by role-play fidelity
on the validation questions (the dense+prompt model's answers) and by the perplexity ratio on
WikiText-2 *validation* windows; step 0 (the training-free `wanda@ffn-channels` mask the scores
start from) is scored alongside. Prints one JSON line per setting (mean over personas with a 95%
bootstrap interval over (persona, question)) and the chosen one: the highest validation fidelity
under the objective's own condition.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from study_pruner import ROOT, _path, bootstrap_ratio, start  # noqa: E402

from persona_core.calib.config import CalibConfig  # noqa: E402
from persona_core.calib.recorder import calibrate  # noqa: E402
from persona_core.calib.texts import render_samples  # noqa: E402
from persona_core.catalog import load_catalog  # noqa: E402
from persona_core.eval.config import EvalConfig  # noqa: E402
from persona_core.eval.engine import Evaluator  # noqa: E402
from persona_core.eval.unit import evaluate_unit  # noqa: E402
from persona_core.learn.config import DataConfig, LearnConfig  # noqa: E402
from persona_core.learn.data import GENERAL_TEXT, generate_training_data, training_instructions  # noqa: E402
from persona_core.learn.learner import learn_persona  # noqa: E402
from persona_core.masks.build import build_masks  # noqa: E402
from persona_core.masks.spec import MaskSpec  # noqa: E402
from persona_core.eval.metrics import heldout_questions  # noqa: E402
from persona_core.models.loading import load_model  # noqa: E402

log = logging.getLogger("sweep.learn")

# One knob at a time around the study's setting (steps 12, lr 0.1, general weight 0.5).
GRID = {
    "steps=12": {"steps": 12},
    "steps=36": {"steps": 36},
    "steps=36,lr=0.3": {"steps": 36, "lr": 0.3},
    "steps=36,lr=0.03": {"steps": 36, "lr": 0.03},
    "steps=36,general=0": {"steps": 36, "general_weight": 0.0},
    "steps=36,general=2": {"steps": 36, "general_weight": 2.0},
}


def validation_persona(persona, data: DataConfig, held: list[str], samples) -> tuple:
    """The persona with its questions swapped for the calibration questions not trained on."""
    trained = {s["question"] for s in samples}
    pool = training_instructions(replace(data, examples=10**6), held)
    val = tuple(q for q in pool if q not in trained)
    if not val:
        raise SystemExit(f"{persona.id}: no validation questions left (lower data.examples)")
    return replace(persona, questions=val), val


def persona_rows(loaded, ev, persona, cfg, sparsity: float, objective: str, grid: dict) -> pa.Table:
    held = heldout_questions(EvalConfig(max_questions=10**6), persona)  # excluded from training and validation
    data = DataConfig(**cfg.get("data", {}))
    samples = generate_training_data(loaded, persona, data, held)
    val_persona, val = validation_persona(persona, data, held, samples)
    calib = CalibConfig()
    pstats = {k: v.to("cpu") for k, v in calibrate(loaded, render_samples(loaded, persona, samples, calib),
                                                    calib).items()}
    ev_cfg = EvalConfig(**{**cfg["evaluate"], "max_questions": len(val), "ppl_text": GENERAL_TEXT,
                           "conditions": ("dense", "dense+prompt", "masked", "masked+prompt")})
    log.info("%s: %d training examples, %d validation questions", persona.id, len(samples), len(val))
    tables = [evaluate_unit(ev, val_persona, None, None, None, ev_cfg)]
    start = build_masks(loaded, pstats, spec=MaskSpec("wanda", sparsity, "ffn-channels"))
    tables.append(evaluate_unit(ev, val_persona, None, start,
                                {"method": "step 0 (wanda)", "sparsity": sparsity, "granularity": "ffn-channels"},
                                ev_cfg))
    for name, knobs in grid.items():
        lc = LearnConfig(**{**cfg.get("learn", {}), **knobs, "objective": objective, "sparsity": sparsity})
        t0 = time.perf_counter()
        res = learn_persona(loaded, persona, [pstats], lc, data, held_out=held, samples=samples)
        secs = time.perf_counter() - t0
        log.info("%s: %s learned in %.0f s (loss %.4f -> %.4f)", persona.id, name, secs, res.history[0]["loss"],
                 res.history[-1]["loss"])
        t = evaluate_unit(ev, val_persona, None, res.masks,
                          {"method": name, "sparsity": sparsity, "granularity": "ffn-channels"}, ev_cfg)
        tables.append(t.append_column("learn_seconds", pa.array([secs] * t.num_rows)))
    return pa.concat_tables(tables, promote_options="default")


def summarise(table: pa.Table, objective: str) -> tuple[list[dict], dict | None]:
    rows = table.to_pylist()
    by: dict = {}
    for r in rows:
        by.setdefault((r["method"], r["condition"], r["metric"]), {})[r["persona"]] = r
    ref = by.get(("dense", "dense+prompt", "roleplay-fidelity"), {})
    own = "masked+prompt" if objective == "with-prompt" else "masked"
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        if method == "dense":
            continue
        e: dict = {"setting": method}
        for cond in ("masked", "masked+prompt"):
            per = by.get((method, cond, "roleplay-fidelity"), {})
            common = sorted(p for p in per if p in ref)
            if not common:
                continue
            num = [per[p]["items"] for p in common]
            f, lo, hi = bootstrap_ratio(num, [[1.0] * len(x) for x in num])
            e[cond] = {"fidelity": round(f, 4), "lo": round(lo, 4), "hi": round(hi, 4)}
            ppl = by.get((method, cond, "perplexity-ratio"), {})
            if ppl:
                e[cond]["val_ppl_ratio"] = round(sum(ppl[p]["value"] for p in ppl) / len(ppl), 3)
        secs = [r.get("learn_seconds") for r in rows if r["method"] == method and r.get("learn_seconds")]
        if secs:
            e["learn_seconds_per_persona"] = round(sum(secs) / len(secs), 1)
        out.append(e)
    dense = {c: round(sum(by[("dense", c, "roleplay-fidelity")][p]["value"] for p in ref) / max(len(ref), 1), 4)
             for c in ("dense", "dense+prompt") if ("dense", c, "roleplay-fidelity") in by}
    out.insert(0, {"setting": "dense", **{c: {"fidelity": v} for c, v in dense.items()}})
    learned = [e for e in out if e["setting"] in GRID and own in e]
    best = max(learned, key=lambda e: e[own]["fidelity"]) if learned else None
    # paired (same questions): each setting minus the study's setting and minus step 0, own condition
    fid = {m: per for (m, c, metric), per in by.items() if c == own and metric == "roleplay-fidelity"}
    for e in out:
        for ref in ("steps=12", "step 0 (wanda)"):
            a, b = fid.get(e["setting"]), fid.get(ref)
            if a and b and e["setting"] != ref:
                common = sorted(set(a) & set(b))
                diff = [[x - y for x, y in zip(a[p]["items"], b[p]["items"])] for p in common]
                d, lo, hi = bootstrap_ratio(diff, [[1.0] * len(x) for x in diff])
                e[f"{own} minus {ref}"] = {"difference": round(d, 4), "lo": round(lo, 4), "hi": round(hi, 4)}
    return out, best


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/study-pruner.yaml")
    ap.add_argument("--personas", nargs="+", default=["rolebench-0", "persona-alpaca-0"])
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--objective", default="with-prompt")
    ap.add_argument("--out", default=None, help="results folder (default: <config's out>/sweep)")
    ap.add_argument("--settings", nargs="+", default=list(GRID), choices=list(GRID), help="a subset of the grid")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cfg = start(args)
    out = Path(args.out) if args.out else ROOT / cfg.get("out", "study-pruner") / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(_path(cfg["catalog"]))
    loaded = ev = None
    for pid in args.personas:
        dest = out / f"sweep-{pid}-{args.objective}-{args.sparsity:g}.parquet"
        if dest.exists():
            log.info("%s: done before, skipped", pid)
            continue
        if loaded is None:
            loaded = load_model(cfg.get("model", "smollm2-135m"), device="cpu")
            ev = Evaluator(loaded, device="cpu")
        t0 = time.perf_counter()
        grid = {k: GRID[k] for k in args.settings}
        table = persona_rows(loaded, ev, catalog[pid], cfg, args.sparsity, args.objective, grid)
        pq.write_table(table, dest.with_suffix(".tmp"))
        os.replace(dest.with_suffix(".tmp"), dest)
        log.info("%s: swept in %.0f s", pid, time.perf_counter() - t0)
    tables = [pq.read_table(out / f"sweep-{p}-{args.objective}-{args.sparsity:g}.parquet") for p in args.personas]
    rows, best = summarise(pa.concat_tables(tables, promote_options="default"), args.objective)
    for e in rows:
        print(json.dumps(e))
    print(json.dumps({"objective": args.objective, "sparsity": args.sparsity, "personas": args.personas,
                      "chosen": best["setting"] if best else None}))


if __name__ == "__main__":
    main()
