"""Persona-Pruner study (issue 14): learned vs training-free FFN-channel masks on persona-pruner-eval.

    python benchmarks/study_pruner.py --config configs/study-pruner.yaml [--personas ID ...]

For every persona of the config (description-only, with the file's own evaluation questions):

1. training data: the dense model with the description as system prompt answers the
   project's generic calibration questions (never an evaluation question);
2. the persona's statistics on those same texts (what the training-free mask and the
   learner's initial scores come from); the ``general`` statistics once, on the built-in
   general set;
3. masks at every sparsity (fraction of FFN channels removed, the same in every layer):
   ``learned-<objective>`` (the learner), ``wanda@ffn-channels`` (training-free, persona
   stats), ``wanda-general@ffn-channels`` (persona-agnostic) and ``magnitude@ffn-channels``;
4. the evaluator scores dense, dense+prompt, masked and masked+prompt: role-play fidelity on
   the file's questions and the WikiText-2 *test* perplexity ratio.

Rows go to ``<out>/results-<persona>.parquet`` as each persona finishes (a stopped study
keeps what it finished; a rerun skips finished personas). Then, once per sparsity, the
exported model's parameter count and forward tokens/s against the dense model, and a
summary (``<out>/summary.json`` + stdout): fidelity retained relative to dense+prompt with a
95% bootstrap interval over (persona, question) pairs, perplexity ratios, and each learned
mask's paired fidelity difference from the training-free masks and from the dense model without
a prompt (same questions; 95% interval).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from persona_core.calib.config import CalibConfig  # noqa: E402
from persona_core.calib.recorder import calibrate  # noqa: E402
from persona_core.calib.texts import render_samples  # noqa: E402
from persona_core.catalog import reference_persona, load_catalog  # noqa: E402
from persona_core.eval.config import EvalConfig  # noqa: E402
from persona_core.eval.engine import Evaluator  # noqa: E402
from persona_core.eval.unit import evaluate_unit  # noqa: E402
from persona_core.learn.config import DataConfig, LearnConfig  # noqa: E402
from persona_core.learn.data import generate_training_data  # noqa: E402
from persona_core.learn.learner import learn_persona  # noqa: E402
from persona_core.masks.build import build_masks  # noqa: E402
from persona_core.masks.spec import MaskSpec  # noqa: E402
from persona_core.eval.metrics import heldout_questions  # noqa: E402
from persona_core.models.loading import load_model  # noqa: E402

log = logging.getLogger("study.pruner")
ROOT = Path(__file__).resolve().parents[1]


def _path(p: str | None) -> str | None:
    return None if p is None else str((ROOT / p).resolve()) if not os.path.isabs(p) else p


def load_config(path: str) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    known = {"catalog", "model", "personas", "sparsities", "objectives", "baselines", "learn", "data", "evaluate",
             "out", "speed_windows"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cfg


def start(args) -> dict:
    """What a script over a study config does first: logging, torch threads, the config. Exits 0
    with a JSON line saying so when the config's catalog (../shared/data) is absent."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "persona_core.learn.learner"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    catalog = _path(cfg["catalog"])
    if catalog and not catalog.startswith("builtin") and not Path(catalog).exists():
        print(json.dumps({"skipped": f"{catalog} is absent"}))
        raise SystemExit(0)
    return cfg


def persona_rows(loaded, ev, persona, cfg, general_stats) -> pa.Table:
    eval_cfg = EvalConfig(**{**cfg["evaluate"], "ppl_text": _path(cfg["evaluate"].get("ppl_text"))})
    held = heldout_questions(EvalConfig(max_questions=10**6), persona)  # every evaluation question
    data = DataConfig(**cfg.get("data", {}))
    t0 = time.perf_counter()
    samples = generate_training_data(loaded, persona, data, held)
    calib = CalibConfig()
    pstats = {k: v.to("cpu") for k, v in calibrate(loaded, render_samples(loaded, persona, samples, calib),
                                                    calib).items()}
    log.info("%s: %d training examples and statistics in %.0f s", persona.id, len(samples), time.perf_counter() - t0)
    tables = [evaluate_unit(ev, persona, None, None, None, eval_cfg)]
    for s in cfg["sparsities"]:
        masks: list[tuple[dict, dict]] = []
        for method in cfg["baselines"]:
            spec = MaskSpec(method, s, "ffn-channels")
            needs = {"wanda": [pstats], "wanda-general": [general_stats], "magnitude": []}[method]
            masks.append((build_masks(loaded, *needs, spec=spec), {"method": method, "sparsity": s,
                                                                    "granularity": "ffn-channels"}))
        for objective in cfg["objectives"]:
            lc = LearnConfig(**{**cfg.get("learn", {}), "objective": objective, "sparsity": s})
            t1 = time.perf_counter()
            result = learn_persona(loaded, persona, [pstats], lc, data, held_out=held, samples=samples)
            log.info("%s: %s at %g learned in %.0f s (loss %.4f -> %.4f, %d channels changed)", persona.id,
                     lc.method, s, time.perf_counter() - t1, result.history[0]["loss"], result.history[-1]["loss"],
                     result.metadata["channels_changed"])
            masks.append((result.masks, {"method": lc.method, "sparsity": s, "granularity": "ffn-channels"}))
        for m, meta in masks:
            t1 = time.perf_counter()
            tables.append(evaluate_unit(ev, persona, None, m, meta, eval_cfg))
            log.info("%s: evaluated %s at %g in %.0f s", persona.id, meta["method"], s, time.perf_counter() - t1)
    return pa.concat_tables(tables)


def speed(loaded, masks: dict, windows: int, reps: int = 3) -> dict:
    """Exported model: parameters and forward tokens/s against the dense model (interleaved, best of reps)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from persona_core.masks.export import export_pruned
    from persona_core.eval.validation import text_windows

    with tempfile.TemporaryDirectory() as tmp:
        out = export_pruned(loaded, masks, Path(tmp) / "m")
        small = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    wins = text_windows(loaded.tokenizer, "wikitext-2-test", 128, windows)  # an error when absent
    ids = torch.tensor([w for w in wins if len(w) == 128])
    best = {"dense": float("inf"), "exported": float("inf")}
    with torch.inference_mode():
        for _ in range(reps):
            for name, model in (("dense", loaded.model), ("exported", small)):
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                best[name] = min(best[name], time.perf_counter() - t)
    n = ids.numel()
    dense_p = sum(p.numel() for p in loaded.model.parameters())
    small_p = sum(p.numel() for p in small.parameters())
    return {"params_dense": dense_p, "params_exported": small_p, "params_ratio": round(small_p / dense_p, 4),
            "intermediate_size": small.config.intermediate_size,
            "tokens_per_s_dense": round(n / best["dense"], 1), "tokens_per_s_exported": round(n / best["exported"], 1),
            "speedup": round(best["dense"] / best["exported"], 3), "tokens": n}


def bootstrap_ratio(num: list[list[float]], den: list[list[float]], n: int = 2000, seed: int = 0) -> tuple:
    """mean(num) / mean(den) over paired items, grouped by persona; 95% interval resampling personas
    and, within each, questions (two-level bootstrap)."""
    g = torch.Generator().manual_seed(seed)
    flat_n = [x for p in num for x in p]
    flat_d = [x for p in den for x in p]
    point = (sum(flat_n) / len(flat_n)) / (sum(flat_d) / len(flat_d))
    stats = []
    for _ in range(n):
        ps = torch.randint(0, len(num), (len(num),), generator=g).tolist()
        sn = sd = 0.0
        cnt = 0
        for p in ps:
            idx = torch.randint(0, len(num[p]), (len(num[p]),), generator=g).tolist()
            sn += sum(num[p][i] for i in idx)
            sd += sum(den[p][i] for i in idx)
            cnt += len(idx)
        if sd != 0:
            stats.append(sn / sd)
    stats.sort()
    return point, stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1]


def summarise(table: pa.Table) -> list[dict]:
    rows = table.to_pylist()
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["sparsity"], r["condition"], r["metric"]), {})[r["persona"]] = r
    personas = sorted({r["persona"] for r in rows})
    ref = by.get(("dense", 0.0, "dense+prompt", "roleplay-fidelity"), {})
    out = []
    for (method, s, cond, metric), per in sorted(by.items()):
        if metric not in ("roleplay-fidelity", "perplexity-ratio") or (method == "dense") != cond.startswith("dense"):
            continue  # dense rows repeat in every unit's table: counted once, under method "dense"
        common = [p for p in personas if p in per and p in ref]
        entry = {"method": method, "sparsity": s, "condition": cond, "personas": len(common)}
        if metric == "roleplay-fidelity":
            num = [per[p]["items"] for p in common]
            den = [ref[p]["items"] for p in common]
            point, lo, hi = bootstrap_ratio(num, den)
            f, flo, fhi = bootstrap_ratio(num, [[1.0] * len(x) for x in num])
            entry.update(fidelity=round(f, 4), fidelity_lo=round(flo, 4), fidelity_hi=round(fhi, 4),
                         retained=round(point, 3), retained_lo=round(lo, 3), retained_hi=round(hi, 3))
        else:
            entry.update(ppl_ratio=round(statistics.mean(per[p]["value"] for p in common), 3))
        out.append(entry)
    merged: dict = {}
    for e in out:
        merged.setdefault((e["method"], e["sparsity"], e["condition"]), {}).update(e)
    return list(merged.values())


def paired_differences(table: pa.Table, against: tuple[str, ...] = ("wanda", "wanda-general")) -> list[dict]:
    """Per learned mask, sparsity and masked condition: its role-play fidelity minus another mask's at the
    same sparsity and condition (nats/token, the same questions), and minus the dense model without a
    prompt (the prompt-free target: > 0 = closer to the in-role answers than no prompt at all); mean
    over (persona, question) with a two-level 95% bootstrap interval."""
    by: dict = {}
    for r in table.to_pylist():
        if r["metric"] == "roleplay-fidelity":
            by.setdefault((r["method"], r["sparsity"], r["condition"]), {})[r["persona"]] = r["items"]
    out = []
    for (method, s, cond), per in sorted(by.items()):
        if not method.startswith("learned-") or cond not in ("masked", "masked+prompt"):
            continue  # (dense rows repeat, under the unit's method, in every unit's table)
        refs = {other: by.get((other, s, cond), {}) for other in against}
        if cond == "masked":  # fidelity is relative to dense without a prompt: the difference is the fidelity
            refs["dense, no prompt"] = {p: [0.0] * len(v) for p, v in per.items()}
        for other, ref in refs.items():
            common = sorted(p for p in per if p in ref and len(ref[p]) == len(per[p]))
            if not common:
                continue
            diff = [[a - b for a, b in zip(per[p], ref[p])] for p in common]
            d, lo, hi = bootstrap_ratio(diff, [[1.0] * len(x) for x in diff])
            out.append({"method": method, "sparsity": s, "condition": cond, "minus": other, "personas": len(common),
                        "difference": round(d, 4), "lo": round(lo, 4), "hi": round(hi, 4)})
    return out


def markdown(doc: dict) -> str:
    """The README table: per method and sparsity, fidelity retained vs dense+prompt (95% CI) under
    masked+prompt and masked, masked fidelity (nats/token), and the WikiText-2 test perplexity ratio."""
    rows = {(r["method"], r["sparsity"], r["condition"]): r for r in doc["rows"]}
    lines = [f"Personas: {', '.join(doc['personas'])}.", "",
             "| mask | removed | retained, masked+prompt | retained, masked | fidelity, masked | ppl ratio, masked |",
             "|---|---|---|---|---|---|"]

    def ci(r, k):
        return f"{r[k]:.2f} [{r[k + '_lo']:.2f}, {r[k + '_hi']:.2f}]" if r and k in r else "-"

    for cond in ("dense", "dense+prompt"):
        r = rows.get(("dense", 0.0, cond))
        if r:
            lines.append(f"| {cond} | 0 | {ci(r, 'retained')} | | {ci(r, 'fidelity')} | {r.get('ppl_ratio', '-')} |")
    methods = sorted({(m, s) for m, s, _ in rows if m != "dense"}, key=lambda x: (x[1], x[0]))
    for m, s in methods:
        mp, mm = rows.get((m, s, "masked+prompt")), rows.get((m, s, "masked"))
        lines.append(f"| {m} | {s:g} | {ci(mp, 'retained')} | {ci(mm, 'retained')} | {ci(mm, 'fidelity')} "
                     f"| {mm.get('ppl_ratio', '-') if mm else '-'} |")
    if doc.get("differences"):
        lines += ["", "| learned mask | removed | condition | minus | difference, nats/token [95% CI] |",
                  "|---|---|---|---|---|"]
        for d in doc["differences"]:
            lines.append(f"| {d['method']} | {d['sparsity']:g} | {d['condition']} | {d['minus']} "
                         f"| {d['difference']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |")
    if doc.get("export"):
        lines += ["", "| removed | params (exported / dense) | forward tokens/s (exported / dense) | speedup |",
                  "|---|---|---|---|"]
        for s, e in doc["export"].items():
            lines.append(f"| {float(s):g} | {e['params_exported']:,} / {e['params_dense']:,} ({e['params_ratio']:.3f}) "
                         f"| {e['tokens_per_s_exported']:,} / {e['tokens_per_s_dense']:,} | {e['speedup']:.2f}x |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/study-pruner.yaml")
    ap.add_argument("--personas", nargs="+", default=None, help="override the config's personas")
    ap.add_argument("--summary-only", action="store_true", help="summarise the stored results only")
    ap.add_argument("--stop-at", default=None, metavar="HH:MM", help="start no new persona after this UTC time")
    ap.add_argument("--out", default=None, help="results folder (default: the config's out, under the checkout)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cfg = start(args)
    out = Path(args.out) if args.out else ROOT / cfg.get("out", "study-pruner")
    out.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(_path(cfg["catalog"]))
    ids = args.personas or cfg.get("personas") or list(catalog.personas)
    if not args.summary_only:
        loaded = load_model(cfg.get("model", "smollm2-135m"), device="cpu")
        ev = Evaluator(loaded, device="cpu")
        general = reference_persona()
        calib = CalibConfig()
        t0 = time.perf_counter()
        gstats = {k: v.to("cpu") for k, v in calibrate(loaded, [t for t in general.calibration], calib).items()}
        log.info("general statistics in %.0f s", time.perf_counter() - t0)
        for pid in ids:
            dest = out / f"results-{pid}.parquet"
            if dest.exists():
                log.info("%s: done before, skipped", pid)
                continue
            if args.stop_at and time.strftime("%H:%M", time.gmtime()) >= args.stop_at:
                log.info("%s: not started (past --stop-at %s)", pid, args.stop_at)
                continue
            t0 = time.perf_counter()
            table = persona_rows(loaded, ev, catalog[pid], cfg, gstats)
            pq.write_table(table, dest.with_suffix(".tmp"))
            os.replace(dest.with_suffix(".tmp"), dest)
            log.info("%s: finished in %.0f s", pid, time.perf_counter() - t0)
        speeds = {}
        for s in cfg["sparsities"]:
            speeds[str(s)] = speed(loaded, build_masks(loaded, spec=MaskSpec("magnitude", s, "ffn-channels")),
                                   int(cfg.get("speed_windows", 8)))
            log.info("export at %g: %s", s, speeds[str(s)])
        (out / "speed.json").write_text(json.dumps(speeds, indent=1))
    tables = [pq.read_table(p) for p in sorted(out.glob("results-*.parquet"))]
    if not tables:
        raise SystemExit(f"no results under {out}")
    table = pa.concat_tables(tables)
    summary = summarise(table)
    speeds = json.loads((out / "speed.json").read_text()) if (out / "speed.json").exists() else {}
    doc = {"personas": sorted({p.stem.removeprefix("results-") for p in out.glob("results-*.parquet")}),
           "rows": summary, "differences": paired_differences(table), "export": speeds}
    (out / "summary.json").write_text(json.dumps(doc, indent=1))
    for e in summary:
        print(json.dumps(e))
    print(json.dumps({"export": speeds}))
    (out / "summary.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))


if __name__ == "__main__":
    main()
