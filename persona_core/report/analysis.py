"""What a report derives from evaluation results: pair separations, intervals, verdicts, the summary.

Input: the rows of `evaluate_unit` (one per persona, method, sparsity, condition, metric), e.g.
every part a run's results index names (`load_results`). Dense rows repeat in every unit of a persona; they are
deduplicated here.

The headline comparison is per opposing pair (A, B): separation = statement-preference(A) +
statement-preference(B) - 1, i.e. how much more A's condition prefers A's statements than B's
condition does. It is exactly 0 for the dense model without prompt. The baseline conditions are
``dense+prompt`` (prompt), ``dense+fewshot`` (few-shot) and ``dense+steer`` (steering); a
subnetwork is ``masked`` (no prompt) with A's mask for A and B's for B. Where the results carry
per-statement scores, every separation has a 95% bootstrap interval over statements and every
(subnetwork, baseline) comparison a paired-bootstrap verdict: win / tie / loss
(`persona_core.report.bootstrap`).
"""

from __future__ import annotations

import logging
import math
from functools import cached_property

import pyarrow as pa

from persona_core.report.bootstrap import PairScores, compare, mean_interval, mean_separation_interval, separation_interval

log = logging.getLogger(__name__)

PREFERENCE_METRIC = "statement-preference"
PROMPT_CONDITION = "dense+prompt"
SUBNETWORK_CONDITION = "masked"
# baseline name -> its condition (in this order everywhere)
BASELINE_CONDITIONS = {"prompt": "dense+prompt", "fewshot": "dense+fewshot", "steer": "dense+steer",
                       "steer-learned": "dense+steer-learned"}
BASELINE_OF_CONDITION = {c: b for b, c in BASELINE_CONDITIONS.items()}


def _dense_and_masked(results: pa.Table):
    """The rows as two frames: dense conditions (each persona's once) and subnetworks."""
    df = results.to_pandas()
    dense = df[df.condition.str.startswith("dense")].drop_duplicates(["model", "persona", "condition", "metric"])
    masked = df[~df.condition.str.startswith("dense") & (df.method != "dense")]
    return dense, masked


def _pairs(results: pa.Table) -> list[tuple[str, str]]:
    seen, out = set(), []
    personas = set(results.column("persona").to_pylist())
    for p, o in zip(results.column("persona").to_pylist(), results.column("opposite").to_pylist()):
        if o and p not in seen and o in personas:
            out.append((p, o))
            seen.update((p, o))
    return out


def setting_name(method: str, sparsity: float, condition: str) -> str:
    """How a setting is shown: a baseline by its name, a subnetwork by method, sparsity and condition."""
    if method in BASELINE_CONDITIONS or method == "dense":
        return method
    level = "" if "|" in method else f" s={sparsity:g}"  # a budgeted mask (method|budget): sparsity per pair
    return f"{method}{level}" + ("" if condition == SUBNETWORK_CONDITION else f" ({condition})")


def _pref_rows(frames):
    """statement-preference rows keyed (persona, method, sparsity, condition); baselines as method names."""
    dense, masked = frames
    out = {}
    for r in dense[dense.metric == PREFERENCE_METRIC].itertuples():
        name = "dense" if r.condition == "dense" else BASELINE_OF_CONDITION.get(r.condition, r.condition)
        out[(r.persona, name, 0.0, r.condition)] = r
    masked_pref = masked[masked.metric == PREFERENCE_METRIC]
    for r in masked_pref.drop_duplicates(["persona", "method", "sparsity", "condition"]).itertuples():
        out[(r.persona, r.method, float(r.sparsity), r.condition)] = r
    return out


class Analysis:
    """One results table and what the report derives from it, each computed once.

    The bootstraps (an interval per pair and setting, a paired verdict per pair, setting and
    baseline) are the report's cost: a page, its headline, its plots and the terminal table all
    read them from here. Every public function below takes a table or an `Analysis`.
    """

    def __init__(self, results: pa.Table):
        self.results = results

    @cached_property
    def frames(self):
        return _dense_and_masked(self.results)

    @cached_property
    def pref(self) -> dict:
        return _pref_rows(self.frames)

    @cached_property
    def pairs(self) -> list[tuple[str, str]]:
        return _pairs(self.results)

    @cached_property
    def scores(self) -> dict:
        return _pair_scores(self)

    @cached_property
    def separation(self):
        return _pair_separation(self)

    @cached_property
    def verdicts(self):
        return _verdicts(self)

    @cached_property
    def summary(self):
        return _summary(self)


def analyse(results: "pa.Table | Analysis") -> Analysis:
    return results if isinstance(results, Analysis) else Analysis(results)


def _scores(ra, rb) -> PairScores | None:
    items_a, items_b = getattr(ra, "items", None), getattr(rb, "items", None)
    if items_a is None or items_b is None or len(items_a) == 0 or len(items_b) == 0:
        return None
    try:
        return PairScores.from_items(items_a, int(ra.items_own), items_b, int(rb.items_own))
    except ValueError:
        return None


def pair_scores(results: "pa.Table | Analysis") -> dict:
    """(pair, method, sparsity, condition) -> `PairScores`, where the results carry per-statement scores."""
    return analyse(results).scores


def _pair_scores(an: Analysis) -> dict:
    pref = an.pref
    out = {}
    for a, b in an.pairs:
        for (persona, method, sparsity, cond), ra in pref.items():
            rb = pref.get((b, method, sparsity, cond))
            if persona == a and rb is not None:
                sc = _scores(ra, rb)
                if sc is not None:
                    out[(f"{a} / {b}", method, sparsity, cond)] = sc
    return out


def pair_separation(results: "pa.Table | Analysis"):
    """One row per (pair, setting): separation and, with per-statement scores, its 95% interval.

    Columns: pair, a, b, method, sparsity, condition, separation, lo, hi, n_a, n_b. ``method``
    is ``prompt`` / ``fewshot`` / ``steer`` / ``dense`` for the dense conditions (sparsity 0).
    """
    return analyse(results).separation


def _pair_separation(an: Analysis):
    import pandas as pd  # heavy: pandas loads only when results are analysed

    cols = ["pair", "a", "b", "method", "sparsity", "condition", "separation", "lo", "hi", "n_a", "n_b"]
    if an.results.num_rows == 0:
        return pd.DataFrame(columns=cols)
    pref = an.pref
    rows = []
    for a, b in an.pairs:
        for (persona, method, sparsity, cond), ra in pref.items():
            rb = pref.get((b, method, sparsity, cond))
            if persona != a or rb is None:
                continue
            sc = an.scores.get((f"{a} / {b}", method, sparsity, cond))
            sep = ra.value + rb.value - 1
            lo = hi = math.nan
            na = nb = 0
            if sc is not None:
                iv = separation_interval(sc)
                sep, lo, hi = iv.value, iv.lo, iv.hi
                na, nb = sc.sizes
            rows.append((f"{a} / {b}", a, b, method, sparsity, cond, sep, lo, hi, na, nb))
    return pd.DataFrame(rows, columns=cols)


def verdicts(results: "pa.Table | Analysis"):
    """Per pair, subnetwork setting and baseline: the paired difference of separations, its interval
    and the verdict (win / tie / loss). Needs per-statement scores (``items``) in the results."""
    return analyse(results).verdicts


def _verdicts(an: Analysis):
    import pandas as pd  # heavy: pandas loads only when results are analysed

    cols = ["pair", "method", "sparsity", "condition", "baseline", "difference", "lo", "hi", "verdict"]
    if an.results.num_rows == 0:
        return pd.DataFrame(columns=cols)
    rows = []
    for a, b in an.pairs:
        pair = f"{a} / {b}"
        base = {name: an.scores[(pair, name, 0.0, cond)] for name, cond in BASELINE_CONDITIONS.items()
                if (pair, name, 0.0, cond) in an.scores}
        for (persona, method, sparsity, cond), ra in an.pref.items():
            if persona != a or method in BASELINE_CONDITIONS or method == "dense":
                continue
            sc = an.scores.get((pair, method, sparsity, cond))
            if sc is None:
                continue
            for name, bs in base.items():
                try:
                    v = compare(sc, bs)
                except ValueError as err:
                    log.warning("%s / %s: %s vs %s not comparable: %s", a, b, method, name, err)
                    continue
                rows.append((pair, method, sparsity, cond, name, v.difference.value, v.difference.lo,
                             v.difference.hi, v.verdict))
    return pd.DataFrame(rows, columns=cols)


def _mean_or_pair_interval(s, scores: dict | None = None):
    """Mean separation over pairs with a 95% interval over statements (each pair's statements
    resampled, the pairs held fixed) when per-statement scores exist, else over pairs."""
    keyed = [scores.get(k) for k in zip(s.pair, s.method, s.sparsity, s.condition)] if scores else []
    if keyed and all(k is not None for k in keyed):
        return mean_separation_interval(keyed)
    return mean_interval(s.separation)


def _metric_mean(df, metric: str, conds) -> float:
    v = df[(df.metric == metric) & df.condition.isin(conds)].value
    return float(v.mean()) if len(v) else math.nan


def summary(results: "pa.Table | Analysis"):
    """One row per subnetwork setting (method, sparsity, condition) and per baseline: the numbers the
    terminal table and the report lead with. Columns that no setting has data for are dropped."""
    return analyse(results).summary


def _summary(an: Analysis):
    import pandas as pd  # heavy: pandas loads only when results are analysed

    if an.results.num_rows == 0:
        return pd.DataFrame()
    dense, masked = an.frames
    sep, ver, scores = an.separation, an.verdicts, an.scores
    rows = []
    for name, cond in BASELINE_CONDITIONS.items():
        s = sep[sep.method == name]
        if s.empty:
            continue
        iv = _mean_or_pair_interval(s, scores)
        rows.append({"setting": name, "method": name, "sparsity": 0.0, "condition": cond, "pairs": len(s),
                     "separation": iv.value, "sep_lo": iv.lo, "sep_hi": iv.hi,
                     "ppl_ratio": _metric_mean(dense, "perplexity-ratio", [cond]),
                     "yes_no": _metric_mean(dense, "yes-no-agreement", [cond]),
                     "roleplay_fidelity": _metric_mean(dense, "roleplay-fidelity", [cond])})
    for (method, sparsity, cond), g in masked.groupby(["method", "sparsity", "condition"]):
        s = sep[(sep.method == method) & (sep.sparsity == sparsity) & (sep.condition == cond)]
        iv = _mean_or_pair_interval(s, scores)
        row = {"setting": setting_name(method, sparsity, cond), "method": method, "sparsity": sparsity,
               "condition": cond, "pairs": len(s), "separation": iv.value, "sep_lo": iv.lo, "sep_hi": iv.hi,
               "ppl_ratio": _metric_mean(g, "perplexity-ratio", [cond]),
               "yes_no": _metric_mean(g, "yes-no-agreement", [cond]),
               "roleplay_fidelity": _metric_mean(g, "roleplay-fidelity", [cond])}
        v = ver[(ver.method == method) & (ver.sparsity == sparsity) & (ver.condition == cond)]
        for name in BASELINE_CONDITIONS:
            vb = v[v.baseline == name]
            if len(vb):
                row[f"vs_{name}"] = "/".join(str(int((vb.verdict == k).sum())) for k in ("win", "tie", "loss"))
        rows.append(row)
    df = pd.DataFrame(rows)
    always = {"separation", "sep_lo", "sep_hi"}  # NaN intervals (one pair, no items) stay, shown as '-'
    keep = [c for c in df.columns if c in always or not (df[c].isna().all() if df[c].dtype.kind in "fc" else False)]
    order = ["setting", "pairs", *[f"vs_{b}" for b in BASELINE_CONDITIONS], "separation", "sep_lo", "sep_hi", "ppl_ratio",
             "yes_no", "roleplay_fidelity", "method", "sparsity", "condition"]
    return df[[c for c in order if c in keep]]


def steering_choices(results: "pa.Table | Analysis"):
    """Per pair: the chosen steering layer and coefficient, their validation separation and perplexity ratio."""
    import pandas as pd  # heavy: pandas loads only when results are analysed

    an = analyse(results)
    cols = ["pair", "layer", "alpha", "val_separation", "val_ppl_ratio", "within_budget"]
    if an.results.num_rows == 0:
        return pd.DataFrame(columns=cols)
    dense, _ = an.frames
    st = dense[dense.condition == "dense+steer"].set_index(["persona", "metric"]).value
    rows = []
    for a, b in an.pairs:
        if (a, "steer-layer") in st.index:
            rows.append((f"{a} / {b}", int(st[(a, "steer-layer")]), st[(a, "steer-alpha")],
                         st.get((a, "steer-val-separation"), math.nan), st.get((a, "steer-val-ppl-ratio"), math.nan),
                         bool(st.get((a, "steer-within-budget"), 1.0))))
    return pd.DataFrame(rows, columns=cols)



def pareto_points(results: "pa.Table | Analysis"):
    """Per (pair, setting): separation against the general-text perplexity ratio of that setting.

    The ratio is the WikiText-2 *test* one where the results have it (a ``perplexity-ratio:<text>``
    row whose text names ``test``), else the first perplexity ratio recorded; for a subnetwork the
    larger of the pair's two masks, for a baseline the mean of its two conditions. Columns: pair,
    method, sparsity, condition, setting, separation, ppl_ratio, ppl_metric.
    """
    import pandas as pd  # heavy: pandas loads only when results are analysed

    an = analyse(results)
    cols = ["pair", "method", "sparsity", "condition", "setting", "separation", "ppl_ratio", "ppl_metric"]
    df = an.results.to_pandas() if an.results.num_rows else None
    names = sorted({m for m in df.metric if m.startswith("perplexity-ratio")}) if df is not None else []
    if not names:
        return pd.DataFrame(columns=cols)
    metric = next((m for m in names if "test" in m), names[0])
    ppl = df[df.metric == metric].drop_duplicates(["persona", "method", "sparsity", "condition"])
    dense_ppl = ppl[ppl.condition.str.startswith("dense")].drop_duplicates(["persona", "condition"]) \
        .set_index(["persona", "condition"]).value
    sub_ppl = ppl.set_index(["persona", "method", "sparsity", "condition"]).value
    rows = []
    for r in an.separation.itertuples():
        if r.method == "dense":
            continue
        if r.method in BASELINE_CONDITIONS:
            vals = [dense_ppl.get((p, r.condition)) for p in (r.a, r.b)]
            agg = lambda v: sum(v) / len(v)  # noqa: E731
        else:
            vals = [sub_ppl.get((p, r.method, r.sparsity, r.condition)) for p in (r.a, r.b)]
            agg = max
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        if vals:
            rows.append((r.pair, r.method, r.sparsity, r.condition, setting_name(r.method, r.sparsity, r.condition),
                         r.separation, agg(vals), metric))
    return pd.DataFrame(rows, columns=cols)

