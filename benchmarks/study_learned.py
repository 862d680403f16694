"""Issue 26 study tables from a finished run: every subnetwork setting against every baseline, per pair.

Reads one or more runs' results (``results/run=<id>/`` in ``--store``; several runs of disjoint pairs
are read as one, the way a study split into batches is pooled) and prints one JSON line: per pair and
setting its separation with a 95% interval over statements; per (setting, baseline) and pair the
paired-bootstrap difference of separations with its 95% interval and verdict, and W/T/L; mean
separations with intervals; the WikiText-2 test perplexity ratio of each setting; each pair's few-shot
k and steering choices; and ``pooled``, issue 26's target figures per subnetwork setting (pairs that
beat every baseline, per baseline W/T/L and the mean difference with a 95% interval over pairs, the
setting's mean over the strongest baseline's, pairs within the budget on the test text). With
``--other-run`` (one or more runs, pooled): every baseline both scored, this run's against the other's
on the same statements (e.g. few-shot k chosen on validation against k = 8; learned steering with
``steer_refine`` against its grid), and every subnetwork setting of this run against the other's
baselines, with the pairs that beat every baseline of both runs. ``--markdown`` prints the tables instead (for results/).
``--archive DIR`` first copies the runs' results (the index and its parts, each verified) into the store at DIR:
a study that spans several sessions keeps its rows in ``results/data/`` and its tables are recomputed from there
(``--store results/data/<study>``) after the store that made them is gone.

    python benchmarks/study_learned.py --store ./persona-store-learned RUN_ID [RUN_ID ...] [--other-run RUN_ID ...] [--markdown]
    python benchmarks/study_learned.py --store ./persona-store-learned-gemma RUN_ID --archive results/data/issue26-gemma
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from persona_core.report.analysis import (BASELINE_CONDITIONS, analyse, pareto_points, steering_choices,  # noqa: E402
                                          summary)
from persona_core.report.bootstrap import compare, mean_interval  # noqa: E402
from persona_core.eval.result_parts import read_result_part  # noqa: E402
from persona_core.report.results import gather, load_results, read_results_index, write_results_index  # noqa: E402
from persona_core.store.store import StoreError, open_store  # noqa: E402

POOL_REPLICATES = 10_000  # bootstrap over pairs for the pooled means (percentile interval, seed 0)


def _f(x, nd: int = 3):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def fewshot_choices(results) -> dict:
    df = results.to_pandas()
    few = df[(df.condition == "dense+fewshot") & df.metric.str.startswith("fewshot-")]
    return {p: {m: float(v) for m, v in zip(g.metric, g.value)} for p, g in few.groupby("persona")}


def load_runs(store: str, runs: list[str]):
    """The rows of every run as one table (the runs must score disjoint pairs)."""
    tables = [load_results(store, r) for r in runs]
    try:
        return gather(tables)
    except RuntimeError as err:
        raise SystemExit(f"runs {', '.join(runs)} cannot be pooled: {err} (the same pair in two runs?)") from None


def archive(store: str, runs: list[str], dest: str) -> int:
    """Copy each run's result parts (verified against the run's index) and then its index into the store at
    `dest`; the number of parts copied. Parts are keyed by content: one `dest` holds intact is kept."""
    src, out = open_store(store), open_store(dest)
    copied = 0
    for run in runs:
        index = read_results_index(src, run)
        if index is None:
            raise SystemExit(f"{src.uri()}: run {run} has no results index (not evaluated, or from before the index)")
        for key, digest in sorted(index.items()):
            read_result_part(src, key, digest)
            try:
                read_result_part(out, key, digest)  # already there, and intact
            except (FileNotFoundError, StoreError):
                out.write_bytes(key, src.read_bytes(key))
                copied += 1
        write_results_index(out, run, index)
    return copied


def _interval(values) -> tuple[dict, float]:
    """(rounded mean and 95% interval over pairs, the unrounded mean)."""
    iv = mean_interval(values, replicates=POOL_REPLICATES)
    return {"mean": _f(iv.value), "lo": _f(iv.lo), "hi": _f(iv.hi)}, iv.value


def pooled(an, budget: float) -> list[dict]:
    """Issue 26's target figures per subnetwork setting (method, condition; the sparsity is each pair's own)."""
    sep = an.separation
    ver = an.verdicts
    if not len(ver):
        return []
    base_sep = {(r.pair, r.method): r.separation for r in sep.itertuples() if r.method in BASELINE_CONDITIONS}
    pts = pareto_points(an)
    ppl = {(r.pair, r.method, r.condition): r.ppl_ratio for r in pts.itertuples()}
    out = []
    for (method, condition), v in ver.groupby(["method", "condition"], sort=True):
        mine = sep[(sep.method == method) & (sep.condition == condition)].set_index("pair").separation
        pairs = sorted(mine.index)
        baselines = [b for b in BASELINE_CONDITIONS if b in set(v.baseline)]
        wins = v[v.verdict == "win"].groupby("pair").baseline.nunique()
        separation, mean = _interval([mine[p] for p in pairs])
        row: dict = {"method": method, "condition": condition, "pairs": len(pairs), "separation": separation,
                     "beats_all": int(sum(wins.get(p, 0) == len(baselines) for p in pairs)), "baselines": {}}
        means = {}
        for b in baselines:
            vb = v[v.baseline == b].set_index("pair")
            common = [p for p in pairs if p in vb.index and (p, b) in base_sep]
            base, means[b] = _interval([base_sep[(p, b)] for p in common])
            row["baselines"][b] = {
                "wtl": "/".join(str(int((vb.verdict == k).sum())) for k in ("win", "tie", "loss")),
                "separation": base, "difference": _interval([vb.difference[p] for p in common])[0]}
        means = {b: x for b, x in means.items() if not math.isnan(x)}
        if means:
            strongest = max(means, key=means.get)
            row["strongest_baseline"] = strongest
            row["ratio_vs_strongest"] = _f(mean / means[strongest]) if means[strongest] else None
        ratios = [ppl.get((p, method, condition)) for p in pairs]
        row["within_budget_on_test"] = f"{sum(r is not None and r <= budget for r in ratios)}/{len(pairs)}"
        out.append(row)
    return out


def _theirs(ob, a: str, b: str, key: tuple):
    """`ob`'s scores of pair (a, b) at (method, sparsity, condition) `key`, whichever pole `ob` names first
    (that follows the order its rows were read in); None where it has none."""
    theirs = ob.scores.get((f"{a} / {b}", *key))
    if theirs is None and (flipped := ob.scores.get((f"{b} / {a}", *key))) is not None:
        theirs = flipped.swapped()
    return theirs


def _versus(pair: str, mine, theirs) -> dict:
    v = compare(mine, theirs)
    return {"pair": pair, "this": _f(mine.separation()), "other": _f(theirs.separation()),
            "difference": _f(v.difference.value), "lo": _f(v.difference.lo), "hi": _f(v.difference.hi),
            "verdict": v.verdict}


def baselines_vs(an, ob) -> list[dict]:
    """Per pair of `an` and baseline both analyses scored: this one's separation against the other's on the
    same statements (paired bootstrap: difference, 95% interval, verdict)."""
    rows = []
    for a, b in an.pairs:
        pair = f"{a} / {b}"
        for baseline, condition in BASELINE_CONDITIONS.items():
            mine = an.scores.get((pair, baseline, 0.0, condition))
            theirs = _theirs(ob, a, b, (baseline, 0.0, condition))
            if mine is not None and theirs is not None:
                rows.append({**_versus(pair, mine, theirs), "baseline": baseline})
    return rows


def settings_vs(an, ob) -> dict:
    """Every subnetwork setting of `an` against every baseline of `ob` on the same statements (e.g. the
    masks against learned steering bisected at the budget's edge in a side run), and per setting the pairs
    that beat every baseline of both runs (where a baseline is in both, the mask must win against each)."""
    rows, beats, compared = [], {}, {}
    ver = an.verdicts
    for (pair, method, sparsity, condition), mine in sorted(an.scores.items(), key=lambda kv: kv[0][:2]):
        if method in BASELINE_CONDITIONS or method == "dense":
            continue
        a, b = pair.split(" / ")
        setting = method + ("" if condition == "masked" else f" ({condition})")
        against = [{**_versus(pair, mine, theirs), "setting": setting, "baseline": baseline}
                   for baseline, cond in BASELINE_CONDITIONS.items()
                   if (theirs := _theirs(ob, a, b, (baseline, 0.0, cond))) is not None]
        if not against:
            continue
        rows += against
        own = ver[(ver.pair == pair) & (ver.method == method) & (ver.condition == condition)].verdict
        compared[setting] = compared.get(setting, 0) + 1
        beats[setting] = beats.get(setting, 0) + int(len(own) > 0 and (own == "win").all()
                                                     and all(r["verdict"] == "win" for r in against))
    return {"pairs": rows, "beats_all_both": beats, "compared": compared}


def tables(store: str, runs: list[str], other: list[str] | None, budget: float = 1.10) -> dict:
    res = load_runs(store, runs)
    an = analyse(res)
    sep = an.separation
    run = " + ".join(runs)
    out: dict = {"run": run, "pairs": [f"{a} / {b}" for a, b in an.pairs]}
    out["separation"] = [{"pair": r.pair, "method": r.method, "condition": r.condition, "sparsity": _f(r.sparsity, 4),
                          "separation": _f(r.separation), "lo": _f(r.lo), "hi": _f(r.hi)}
                         for r in sep.itertuples() if r.method != "dense"]
    ver = an.verdicts
    out["verdicts"] = [{"pair": r.pair, "method": r.method, "condition": r.condition, "baseline": r.baseline,
                        "difference": _f(r.difference), "lo": _f(r.lo), "hi": _f(r.hi), "verdict": r.verdict}
                       for r in ver.itertuples()]
    s = summary(an)
    out["summary"] = json.loads(s.to_json(orient="records")) if len(s) else []
    pts = pareto_points(an)
    out["ppl_ratio"] = [{"pair": r.pair, "setting": r.setting, "ppl_ratio": _f(r.ppl_ratio, 4), "metric": r.ppl_metric}
                        for r in pts.itertuples()]
    st = steering_choices(an)
    out["steering"] = json.loads(st.to_json(orient="records")) if len(st) else []
    out["fewshot"] = fewshot_choices(res)
    out["pooled"] = pooled(an, budget)
    if other:
        ob = analyse(load_runs(store, other))
        out["baselines_vs_other_run"] = {"other": " + ".join(other), "pairs": baselines_vs(an, ob)}
        out["settings_vs_other_run"] = {"other": " + ".join(other), **settings_vs(an, ob)}
    return out


def markdown(t: dict) -> str:
    lines = [f"Run `{t['run']}`, pairs: {', '.join(t['pairs'])}.", "", "| pair | setting | baseline | difference [95% CI] | verdict |",
             "|---|---|---|---|---|"]
    for v in t["verdicts"]:
        setting = v["method"] + ("" if v["condition"] == "masked" else f" ({v['condition']})")
        lines.append(f"| {v['pair']} | {setting} | {v['baseline']} | {v['difference']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] "
                     f"| {v['verdict']} |")
    lines += ["", "| pair | setting | separation [95% CI] |", "|---|---|---|"]
    for r in t["separation"]:
        setting = r["method"] + ("" if r["condition"] in ("masked",) or r["method"] in BASELINE_CONDITIONS
                                 else f" ({r['condition']})")
        lines.append(f"| {r['pair']} | {setting} | {r['separation']:.3f} [{r['lo']}, {r['hi']}] |")
    if t.get("pooled"):
        lines += ["", f"Pooled over {len(t['pairs'])} pairs (means over pairs, 95% interval: bootstrap over pairs, "
                  f"{POOL_REPLICATES:,} resamples):", "",
                  "| setting | beats all | mean separation [95% CI] | baseline | W/T/L | baseline mean | "
                  "mean difference [95% CI] |", "|---|---|---|---|---|---|---|"]
        notes = []
        for r in t["pooled"]:
            head = f"{r['method']} ({r['condition']}) | {r['beats_all']}/{r['pairs']} | {_ci(r['separation'])}"
            for i, (b, d) in enumerate(r["baselines"].items()):
                lines.append(f"| {head if i == 0 else ' | | '} | {b} | {d['wtl']} | {d['separation']['mean']:.3f} | "
                             f"{_ci(d['difference'], signed=True)} |")
            if r.get("strongest_baseline"):
                notes.append(f"- {r['method']} ({r['condition']}): {r['ratio_vs_strongest']}x the strongest baseline "
                             f"({r['strongest_baseline']}); within the budget on the test text: {r['within_budget_on_test']}")
        lines += ["", *notes] if notes else []
    if t.get("baselines_vs_other_run"):
        lines += ["", "| pair | baseline | this run | other run | difference [95% CI] | verdict |", "|---|---|---|---|---|---|"]
        for r in t["baselines_vs_other_run"]["pairs"]:
            lines.append(f"| {r['pair']} | {r['baseline']} | {r['this']:.3f} | {r['other']:.3f} | {r['difference']:+.3f} "
                         f"[{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['verdict']} |")
    sv = t.get("settings_vs_other_run")
    if sv and sv["pairs"]:
        lines += ["", "| pair | setting (this run) | baseline (other run) | this run | other run | difference [95% CI] | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in sv["pairs"]:
            lines.append(f"| {r['pair']} | {r['setting']} | {r['baseline']} | {r['this']:.3f} | {r['other']:.3f} | "
                         f"{r['difference']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['verdict']} |")
        lines += ["", *(f"- {s}: beats every baseline of both runs on {n}/{sv['compared'][s]} pairs"
                        for s, n in sv["beats_all_both"].items())]
    return "\n".join(lines)


def _ci(d: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    bounds = "-" if d["lo"] is None else f"[{f.format(d['lo'])}, {f.format(d['hi'])}]"
    return f"{f.format(d['mean'])} {bounds}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="run ids (results/run=<id>/ in the store); several: pooled as one")
    ap.add_argument("--store", default="./persona-store-learned")
    ap.add_argument("--other-run", nargs="+", default=None,
                    help="runs (pooled) whose baselines this run's are compared with (those both scored)")
    ap.add_argument("--budget", type=float, default=1.10, help="perplexity ratio bound for within_budget_on_test")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown instead of JSON")
    ap.add_argument("--archive", default=None, metavar="DIR",
                    help="first copy the runs' results (index and verified parts) into the store at DIR")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not args.runs:
        raise SystemExit("name a run id (persona-jobs results --store STORE lists them)")
    if args.archive:
        n = archive(args.store, args.runs, args.archive)
        print(f"archived {len(args.runs)} run(s), {n} new part(s), into {args.archive}", file=sys.stderr)
    t = tables(args.store, args.runs, args.other_run, args.budget)
    print(markdown(t) if args.markdown else json.dumps({"benchmark": "study_learned", **t}))


if __name__ == "__main__":
    main()
