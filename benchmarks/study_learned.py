"""Issue 26 study tables from a finished run: every subnetwork setting against every baseline, per pair.

Reads a run's results (``results/run=<id>/`` in ``--store``) and prints one JSON line: per pair and
setting its separation with a 95% interval over statements; per (setting, baseline) and pair the
paired-bootstrap difference of separations with its 95% interval and verdict, and W/T/L; mean
separations with intervals; the WikiText-2 test perplexity ratio of each setting; each pair's few-shot
k and steering choices. With ``--other-run``: every baseline both runs scored, this run's against the
other's on the same statements (e.g. few-shot k chosen on validation against k = 8; learned steering
with ``steer_refine`` against its grid). ``--markdown`` prints the tables instead (for results/).

    python benchmarks/study_learned.py --store ./persona-store-learned RUN_ID [--other-run RUN_ID] [--markdown]
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
from persona_core.report.bootstrap import compare  # noqa: E402
from persona_core.report.results import load_results  # noqa: E402


def _f(x, nd: int = 3):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def fewshot_choices(results) -> dict:
    df = results.to_pandas()
    few = df[(df.condition == "dense+fewshot") & df.metric.str.startswith("fewshot-")]
    return {p: {m: float(v) for m, v in zip(g.metric, g.value)} for p, g in few.groupby("persona")}


def tables(store: str, run: str, other: str | None) -> dict:
    res = load_results(store, run)
    an = analyse(res)
    sep = an.separation
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
    if other:
        ob = analyse(load_results(store, other))
        rows = []
        for a, b in an.pairs:
            pair = f"{a} / {b}"
            for baseline, condition in BASELINE_CONDITIONS.items():
                mine = an.scores.get((pair, baseline, 0.0, condition))
                theirs = ob.scores.get((pair, baseline, 0.0, condition))
                if mine is None or theirs is None:
                    continue
                v = compare(mine, theirs)
                rows.append({"pair": pair, "baseline": baseline, "this": _f(mine.separation()),
                             "other": _f(theirs.separation()), "difference": _f(v.difference.value),
                             "lo": _f(v.difference.lo), "hi": _f(v.difference.hi), "verdict": v.verdict})
        out["baselines_vs_other_run"] = {"other": other, "pairs": rows}
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
    if t.get("baselines_vs_other_run"):
        lines += ["", "| pair | baseline | this run | other run | difference [95% CI] | verdict |", "|---|---|---|---|---|---|"]
        for r in t["baselines_vs_other_run"]["pairs"]:
            lines.append(f"| {r['pair']} | {r['baseline']} | {r['this']:.3f} | {r['other']:.3f} | {r['difference']:+.3f} "
                         f"[{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['verdict']} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default=None, help="run id (results/run=<id>/ in the store)")
    ap.add_argument("--store", default="./persona-store-learned")
    ap.add_argument("--other-run", default=None, help="a run whose baselines this run's are compared with (those both scored)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown instead of JSON")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.run is None:
        raise SystemExit("name a run id (persona-jobs results --store STORE lists them)")
    t = tables(args.store, args.run, args.other_run)
    print(markdown(t) if args.markdown else json.dumps({"benchmark": "study_learned", **t}))


if __name__ == "__main__":
    main()
