"""Reports of evaluation results: a self-contained HTML page and a terminal table.

Input: the rows of `evaluate_unit` (one per persona, method, sparsity,
condition, metric), e.g. every part of ``results/run=<id>/``. Dense rows repeat
in every unit of a persona; they are deduplicated here.

The headline comparison is per opposing pair (A, B): separation =
statement-preference(A) + statement-preference(B) - 1, i.e. how much more A's
condition prefers A's statements than B's condition does. It is exactly 0 for
the dense model without prompt. Baselines: ``dense+prompt`` (prompt),
``dense+fewshot`` (few-shot), ``dense+steer`` (steering); a subnetwork is
``masked`` (no prompt) with A's mask for A and B's for B. Where the results
carry per-statement scores, every separation has a 95% bootstrap interval over
statements and every (subnetwork, baseline) comparison a paired-bootstrap
verdict: win / tie / loss (`persona_core.report.bootstrap`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import pyarrow as pa

from persona_core.report.bootstrap import PairScores, compare, mean_interval, mean_separation_interval, separation_interval

log = logging.getLogger(__name__)

PREF = "statement-preference"
PROMPT = "dense+prompt"
SUBNET = "masked"
# baseline name -> its condition (in this order everywhere)
BASELINES = {"prompt": "dense+prompt", "fewshot": "dense+fewshot", "steer": "dense+steer"}
BASELINE_OF = {c: b for b, c in BASELINES.items()}
PLOT_METRICS = ("statement-preference", "yes-no-agreement", "roleplay-fidelity", "perplexity-ratio")

DEFINITIONS = {
    "separation": "statement-preference(A) + statement-preference(B) - 1 for an opposing pair (A, B), each persona "
                  "under its own condition: 0 = the condition does not tell the personas apart (the dense model "
                  "without prompt is exactly 0), 1 = it always prefers each persona's own statements.",
    "statement-preference": "P(a held-out statement of the persona gets a higher mean token log-prob than one of "
                            "its opposite's), over all (own, opposite) statement pairs (AUC).",
    "interval": "95% percentile bootstrap over statements (each pole's held-out statements resampled with "
                "replacement, 2000 replicates); for a mean over pairs, each pair's statements resampled and the "
                "pairs held fixed (the uncertainty of the mean on these pairs, not over other pairs).",
    "win / tie / loss": "paired bootstrap of separation(subnetwork) - separation(baseline) on the same resampled "
                        "statements: win if its 95% interval lies above 0, loss if below, else tie.",
    "perplexity ratio": "perplexity of the condition on the general text (a fixed set of fixed-length windows) over "
                        "the dense model's without prompt on the same windows; > 1 = general text got harder.",
    "yes-no-agreement": "P(the matching answer) from the next-token probabilities of Yes / No to \"Is the "
                        "following statement something you would say?\", renormalised over the two.",
    "roleplay-fidelity": "mean NLL of the dense model's in-role answers under the condition, relative to the "
                         "dense model without prompt (nats/token, > 0 = closer to the in-role model).",
    "prompt": "baseline: the dense model with the persona description as system prompt.",
    "fewshot": "baseline: the description plus k calibration statements as examples (retrieved by TF-IDF when the "
               "item has a question, else a seeded sample); never an evaluation statement.",
    "steer": "baseline: activation steering, alpha * (mean residual of the persona - of its opposite) added at "
             "decoder layer L; L and alpha chosen per pair on validation statements carved from the calibration "
             "statements, within the general-text perplexity budget on validation text.",
    "masked": "the persona's subnetwork (its mask applied to the dense weights), no prompt.",
}


def _frame(results: pa.Table):
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


def _setting_name(method: str, sparsity: float, condition: str) -> str:
    if method in BASELINES or method == "dense":
        return method
    level = "" if "|" in method else f" s={sparsity:g}"  # a budgeted mask (method|budget): sparsity per pair
    return f"{method}{level}" + ("" if condition == SUBNET else f" ({condition})")


def _pref_rows(frames):
    """statement-preference rows keyed (persona, method, sparsity, condition); baselines as method names."""
    dense, masked = frames
    out = {}
    for r in dense[dense.metric == PREF].itertuples():
        name = "dense" if r.condition == "dense" else BASELINE_OF.get(r.condition, r.condition)
        out[(r.persona, name, 0.0, r.condition)] = r
    for r in masked[masked.metric == PREF].drop_duplicates(["persona", "method", "sparsity", "condition"]).itertuples():
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
        return _frame(self.results)

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
    import pandas as pd

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
    import pandas as pd

    cols = ["pair", "method", "sparsity", "condition", "baseline", "difference", "lo", "hi", "verdict"]
    if an.results.num_rows == 0:
        return pd.DataFrame(columns=cols)
    rows = []
    for a, b in an.pairs:
        pair = f"{a} / {b}"
        base = {name: an.scores[(pair, name, 0.0, cond)] for name, cond in BASELINES.items()
                if (pair, name, 0.0, cond) in an.scores}
        for (persona, method, sparsity, cond), ra in an.pref.items():
            if persona != a or method in BASELINES or method == "dense":
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
    import pandas as pd

    if an.results.num_rows == 0:
        return pd.DataFrame()
    dense, masked = an.frames
    sep, ver, scores = an.separation, an.verdicts, an.scores
    rows = []
    for name, cond in BASELINES.items():
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
        row = {"setting": _setting_name(method, sparsity, cond), "method": method, "sparsity": sparsity,
               "condition": cond, "pairs": len(s), "separation": iv.value, "sep_lo": iv.lo, "sep_hi": iv.hi,
               "ppl_ratio": _metric_mean(g, "perplexity-ratio", [cond]),
               "yes_no": _metric_mean(g, "yes-no-agreement", [cond]),
               "roleplay_fidelity": _metric_mean(g, "roleplay-fidelity", [cond])}
        v = ver[(ver.method == method) & (ver.sparsity == sparsity) & (ver.condition == cond)]
        for name in BASELINES:
            vb = v[v.baseline == name]
            if len(vb):
                row[f"vs_{name}"] = "/".join(str(int((vb.verdict == k).sum())) for k in ("win", "tie", "loss"))
        rows.append(row)
    df = pd.DataFrame(rows)
    always = {"separation", "sep_lo", "sep_hi"}  # NaN intervals (one pair, no items) stay, shown as '-'
    keep = [c for c in df.columns if c in always or not (df[c].isna().all() if df[c].dtype.kind in "fc" else False)]
    order = ["setting", "pairs", *[f"vs_{b}" for b in BASELINES], "separation", "sep_lo", "sep_hi", "ppl_ratio",
             "yes_no", "roleplay_fidelity", "method", "sparsity", "condition"]
    return df[[c for c in order if c in keep]]


def steering_choices(results: "pa.Table | Analysis"):
    """Per pair: the chosen steering layer and coefficient, their validation separation and perplexity ratio."""
    import pandas as pd

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


def headline(results: "pa.Table | Analysis") -> str:
    """One sentence: the best subnetwork against the best baseline, with intervals and verdicts."""
    s = summary(results)
    if s.empty or "separation" not in s:
        return "No separations to report (no statement-preference results for opposing pairs)."
    subs = s[s.condition == SUBNET] if "condition" in s else s.iloc[0:0]
    base = s[s.method.isin(list(BASELINES))] if "method" in s else s.iloc[0:0]
    n_pairs = int(s.pairs.max())
    pairs = f"{n_pairs} opposing pair{'s' if n_pairs != 1 else ''}"

    def iv(r) -> str:
        tail = "" if math.isnan(r.get("sep_lo", math.nan)) else f" [95% CI {r.sep_lo:.3f}, {r.sep_hi:.3f}]"
        return f"{r.separation:.3f}{tail}"

    if subs.empty:
        if base.empty:
            return "No separations to report."
        b = base.sort_values("separation").iloc[-1]
        return f"Over {pairs} the strongest baseline, {b.setting}, separates them by {iv(b)}."
    m = subs.sort_values("separation").iloc[-1]
    text = f"Over {pairs}, the best subnetwork ({m.setting}) separates them by {iv(m)}"
    if not base.empty:
        b = base.sort_values("separation").iloc[-1]
        text += f", against {iv(b)} for the strongest baseline ({b.setting})"
        col = f"vs_{b.setting}"
        if col in subs and isinstance(m.get(col), str):
            w, t, lo = m[col].split("/")
            text += f"; pair by pair it wins {w}, ties {t} and loses {lo} against it"
    if not math.isnan(m.get("ppl_ratio", math.nan)):
        text += f", at {m.ppl_ratio:.2f}x the dense model's general-text perplexity"
    return text + "."


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def terminal_table(results: "pa.Table | Analysis") -> str:
    """Per setting: wins / ties / losses against each baseline, mean separation [95% CI], perplexity cost."""
    s = summary(results)
    if s.empty or "separation" not in s:
        return "no masked results"
    cols = [c for c in ("setting", "pairs", "vs_prompt", "vs_fewshot", "vs_steer") if c in s]
    head = [c.replace("vs_", "W/T/L vs ") for c in cols] + ["separation [95% CI]", "ppl x"]
    rows = [head]
    for r in s.to_dict("records"):
        ci = "" if math.isnan(r["sep_lo"]) else f" [{r['sep_lo']:.3f}, {r['sep_hi']:.3f}]"
        rows.append([str(r.get(c, "-")) if not isinstance(r.get(c), float) else _fmt(r[c]) for c in cols]
                    + [f"{r['separation']:.3f}{ci}", _fmt(r.get("ppl_ratio", math.nan))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _colors(names: list[str]) -> dict[str, str]:
    """One color per setting, the same in every plot: baselines in greys/purple, subnetworks in the cycle."""
    fixed = {"prompt": "black", "fewshot": "dimgray", "steer": "tab:purple"}
    cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    others = sorted(n for n in names if n not in fixed)
    return {**fixed, **{n: cycle[i % len(cycle)] for i, n in enumerate(others)}}


def _settings_order(sep) -> list[str]:
    names = list(dict.fromkeys(_setting_name(m, s, c) for m, s, c in zip(sep.method, sep.sparsity, sep.condition)))
    base = [b for b in BASELINES if b in names]
    return base + sorted(n for n in names if n not in base and n != "dense")


def _plot_separation(sep) -> str | None:
    """Per pair, each setting's separation with its 95% interval (dots and whiskers, no bars)."""
    import matplotlib.pyplot as plt

    sep = sep[sep.method != "dense"]
    if sep.empty:
        return None
    sep = sep.assign(setting=[_setting_name(m, s, c) for m, s, c in zip(sep.method, sep.sparsity, sep.condition)])
    settings = _settings_order(sep)
    pairs = list(dict.fromkeys(sep.pair))
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.32 * len(pairs) * max(1, len(settings)) / 3 + 1.2)))
    step = 0.8 / max(len(settings), 1)
    colors = _colors(settings)
    for k, name in enumerate(settings):
        g = sep[sep.setting == name].set_index("pair").reindex(pairs)
        ys = [i + (k - (len(settings) - 1) / 2) * step for i in range(len(pairs))]
        err = None
        if g.lo.notna().any():
            err = [(g.separation - g.lo).clip(lower=0).fillna(0).values, (g.hi - g.separation).clip(lower=0).fillna(0).values]
        ax.errorbar(g.separation.values, ys, xerr=err, fmt="o", ms=3.5, lw=0.8, capsize=1.5, label=name,
                    color=colors.get(name))
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(pairs)), pairs, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("separation (95% interval over statements)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Separation per opposing pair", fontsize=10)
    return _png(fig)


def _plot_cost(summ) -> str | None:
    """Mean separation against perplexity ratio, one point per setting (with the separation interval)."""
    import matplotlib.pyplot as plt

    if summ.empty or "ppl_ratio" not in summ or summ.ppl_ratio.isna().all():
        return None
    s = summ[summ.ppl_ratio.notna()]
    colors = _colors(list(s.setting))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in s.to_dict("records"):
        err = None if math.isnan(r["sep_lo"]) else [[r["separation"] - r["sep_lo"]], [r["sep_hi"] - r["separation"]]]
        ax.errorbar([r["ppl_ratio"]], [r["separation"]], yerr=err, fmt="s" if r["method"] in BASELINES else "o",
                    capsize=2, label=r["setting"], color=colors[r["setting"]])
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("general-text perplexity ratio (vs dense)")
    ax.set_ylabel("mean separation over pairs (95% interval)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Separation against general-text cost", fontsize=10)
    return _png(fig)


def pareto_points(results: "pa.Table | Analysis"):
    """Per (pair, setting): separation against the general-text perplexity ratio of that setting.

    The ratio is the WikiText-2 *test* one where the results have it (a ``perplexity-ratio:<text>``
    row whose text names ``test``), else the first perplexity ratio recorded; for a subnetwork the
    larger of the pair's two masks, for a baseline the mean of its two conditions. Columns: pair,
    method, sparsity, condition, setting, separation, ppl_ratio, ppl_metric.
    """
    import pandas as pd

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
        if r.method in BASELINES:
            vals = [dense_ppl.get((p, r.condition)) for p in (r.a, r.b)]
            agg = lambda v: sum(v) / len(v)  # noqa: E731
        else:
            vals = [sub_ppl.get((p, r.method, r.sparsity, r.condition)) for p in (r.a, r.b)]
            agg = max
        vals = [v for v in vals if v is not None and not math.isnan(v)]
        if vals:
            rows.append((r.pair, r.method, r.sparsity, r.condition, _setting_name(r.method, r.sparsity, r.condition),
                         r.separation, agg(vals), metric))
    return pd.DataFrame(rows, columns=cols)


def ppl_axis_label(metric: str, general_text: str | None = None) -> str:
    """The x label of a perplexity-ratio axis: the text a ``perplexity-ratio[:<text>]`` row was measured on."""
    text = metric.partition(":")[2] or general_text or "built-in held-out text"
    return f"perplexity ratio vs dense ({text})"


def plot_pareto(results: "pa.Table | Analysis", general_text: str | None = None) -> str | None:
    """Separation against general-text perplexity ratio, per method over its settings: one small point
    per pair, a large one for the mean over pairs, the means of a method joined in order of cost;
    the baselines (prompt, few-shot, steering at their chosen settings) on the same axes.

    `general_text` names the text behind the unsuffixed ``perplexity-ratio`` rows (the run's
    ``evaluate.options.ppl_text``; results rows do not carry it); None: the built-in held-out text."""
    import matplotlib.pyplot as plt

    pts = pareto_points(results)
    if pts.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    family = [m if m in BASELINES else m + ("" if c == SUBNET else f" ({c})") for m, c in zip(pts.method, pts.condition)]
    pts = pts.assign(family=family)
    colors = {"prompt": "black", "fewshot": "dimgray", "steer": "tab:purple"}
    cycle = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for fam, g in pts.groupby("family", sort=False):
        color = colors.get(fam) or next(cycle)
        base = fam in BASELINES
        ax.scatter(g.ppl_ratio, g.separation, s=10, alpha=0.35, color=color, marker="s" if base else "o")
        means = g.groupby("setting").agg(ppl_ratio=("ppl_ratio", "mean"), separation=("separation", "mean")) \
            .sort_values("ppl_ratio")
        ax.plot(means.ppl_ratio, means.separation, marker="s" if base else "o", ms=7, lw=1.2, color=color,
                ls="none" if base else "-", label=f"{fam} (mean of {g.pair.nunique()} pairs)")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel(ppl_axis_label(pts.ppl_metric.iloc[0], general_text))
    ax.set_ylabel("separation")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Who wins at which cost: separation against general-text perplexity", fontsize=10)
    return _png(fig)


def _plot_vs_sparsity(dense, masked, metrics) -> str | None:
    """Metrics against sparsity: only when some method was run at two or more sparsities."""
    import matplotlib.pyplot as plt

    sub = masked[masked.condition == SUBNET]
    if sub.empty or sub.groupby("method").sparsity.nunique().max() < 2:
        return None
    metrics = [m for m in metrics if (sub.metric == m).any()]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        g = sub[sub.metric == metric].groupby(["method", "sparsity"]).value.mean().reset_index()
        for method, gm in g.groupby("method"):
            if gm.sparsity.nunique() >= 2:
                ax.plot(gm.sparsity, gm.value, marker="o", label=method)
        for cond, style in ((PROMPT, "--"), ("dense", ":")):
            ref = dense[(dense.metric == metric) & (dense.condition == cond)].value.mean()
            if not math.isnan(ref):
                ax.axhline(ref, ls=style, color="black", lw=1, label=cond)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("sparsity")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Metric vs sparsity (subnetwork, no prompt; mean over personas)", fontsize=10)
    return _png(fig)


# ---------------------------------------------------------------------------- HTML


LABELS = {"vs_prompt": "W/T/L vs prompt", "vs_fewshot": "W/T/L vs few-shot", "vs_steer": "W/T/L vs steering",
          "ppl_ratio": "perplexity ×dense", "yes_no": "yes-no agreement", "roleplay_fidelity": "role-play fidelity",
          "n_a": "statements A", "n_b": "statements B", "val_separation": "validation separation",
          "val_ppl_ratio": "validation perplexity ×dense", "within_budget": "within budget", "a": "A", "b": "B",
          "difference": "difference", "lo": "95% CI low", "hi": "95% CI high"}


def _with_ci(df):
    """separation, sep_lo, sep_hi -> one 'separation [95% CI]' text column."""
    if "sep_lo" not in df:
        return df
    cell = [("-" if math.isnan(v) else f"{v:.3f}") + ("" if math.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]")
            for v, lo, hi in zip(df.separation, df.sep_lo, df.sep_hi)]
    out = df.drop(columns=["sep_lo", "sep_hi"]).copy()
    out["separation"] = cell
    return out.rename(columns={"separation": "separation [95% CI]"})


def _table_html(df, floatfmt="{:.3f}") -> str:
    if df.empty:
        return "<p>none</p>"
    df = df[[c for c in df.columns if not (df[c].dtype.kind in "fc" and df[c].isna().all())]]
    df = df.rename(columns=LABELS)
    return df.to_html(index=False, float_format=lambda v: floatfmt.format(v), border=0, classes="t", na_rep="-")


def _samples_html(results: pa.Table) -> str:
    """Greedy sample answers per persona: dense, prompted and (first) masked model."""
    if "texts" not in results.column_names:
        return ""
    df = results.to_pandas()
    df = df[(df.metric == "sample-generations") & df.texts.notna()]
    if df.empty:
        return ""
    parts = []
    for persona, g in df.groupby("persona", sort=False):
        cells = []
        picks = [("dense", g[g.condition == "dense"]), ("prompted", g[g.condition == PROMPT]),
                 ("few-shot", g[g.condition == "dense+fewshot"]), ("steered", g[g.condition == "dense+steer"])]
        masked = g[g.condition == SUBNET].sort_values(["method", "sparsity"])
        if len(masked):
            first = masked.iloc[0]
            picks.append((f"masked ({first.method} s={first.sparsity:g})", masked.iloc[:1]))
        for name, rows in picks:
            if rows.empty:
                continue
            texts = list(rows.iloc[0].texts)
            qa = "".join(f"<p><b>{html.escape(t.split(chr(10), 1)[0])}</b><br>"
                         f"{html.escape(t.split(chr(10), 1)[1] if chr(10) in t else '')}</p>" for t in texts)
            cells.append(f"<td><i>{html.escape(name)}</i>{qa}</td>")
        parts.append(f"<h3>{html.escape(persona)}</h3><table class='s'><tr>{''.join(cells)}</tr></table>")
    return "<h2>Sample generations (greedy)</h2>" + "".join(parts)


def _inputs_html(results: pa.Table, inputs: dict | None) -> str:
    info = dict(inputs or {})
    info.setdefault("model", ", ".join(sorted(set(results.column("model").to_pylist()))))
    info.setdefault("personas", len(set(results.column("persona").to_pylist())))
    methods = sorted({m for m in results.column("method").to_pylist() if m != "dense"})
    if methods:
        info.setdefault("methods", ", ".join(methods))
    info.setdefault("report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info.items()
                   if v not in (None, "", []))
    return f"<h2>Inputs</h2><table class='t'>{rows}</table>"


def build_report(results: "pa.Table | Analysis", out_path: str | Path, title: str = "Persona subnetworks: evaluation",
                 inputs: dict | None = None) -> Path:
    """Write a self-contained HTML report (PNG plots embedded) to `out_path`; returns the path.

    `inputs` (catalog, model, methods, budget, general text, date, ...) is shown as the run's inputs.
    """
    import matplotlib

    matplotlib.use("Agg")
    an = analyse(results)
    results = an.results
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if results.num_rows == 0:
        parts.append("<p>No results.</p>")
    else:
        dense, masked = an.frames
        summ = an.summary
        parts.append(f"<p class='headline'>{html.escape(headline(an))}</p>")
        parts.append(_inputs_html(results, inputs))
        if not summ.empty:
            parts.append("<h2>Summary</h2><p>One row per setting: baselines first, then each subnetwork "
                         "(method, sparsity). W/T/L = wins / ties / losses over pairs against that baseline; "
                         "separation = mean over pairs with a 95% bootstrap interval over statements.</p>"
                         + _table_html(_with_ci(summ.drop(columns=[c for c in ("method", "sparsity", "condition")
                                                                  if c in summ]))))
        conditions = set(results.column("condition").to_pylist())
        used = {"separation", "interval"} | {b for b, c in BASELINES.items() if c in conditions}
        used |= {"masked"} if SUBNET in conditions else set()
        used |= {m for m in ("statement-preference", "yes-no-agreement", "roleplay-fidelity")
                 if (results.column("metric").to_pandas() == m).any()}
        if (results.column("metric").to_pandas() == "perplexity-ratio").any():
            used.add("perplexity ratio")
        ver = an.verdicts
        if not ver.empty:
            used.add("win / tie / loss")
        parts.append("<h2>Definitions</h2><dl>" + "".join(
            f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in DEFINITIONS.items() if k in used)
            + "</dl>")
        sep = an.separation
        figs = [("Separation per opposing pair", _plot_separation(sep)),
                ("Separation against general-text cost", _plot_cost(summ)),
                ("Pareto view: separation against perplexity, per pair and method",
                 plot_pareto(an, (inputs or {}).get("general text (reported)"))),
                ("Metrics against sparsity", _plot_vs_sparsity(dense, masked, PLOT_METRICS))]
        for name, png in figs:
            if png:
                parts.append(f"<h2>{name}</h2><img alt='{name}' src='data:image/png;base64,{png}'/>")
        if not ver.empty:
            ver = ver.assign(setting=[_setting_name(m, s, c) for m, s, c in zip(ver.method, ver.sparsity, ver.condition)])
            wide = ver.assign(cell=[f"{v} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for v, d, lo, hi in
                                    zip(ver.verdict, ver.difference, ver.lo, ver.hi)]) \
                .pivot_table(index=["setting", "pair"], columns="baseline", values="cell", aggfunc="first") \
                .reset_index()
            wide.columns.name = None
            parts.append("<h2>Verdicts per pair</h2><p>separation(subnetwork) - separation(baseline) with its "
                         "paired 95% interval.</p>" + _table_html(wide))
        st = steering_choices(an)
        if not st.empty:
            parts.append("<h2>Steering settings chosen per pair</h2><p>Chosen on validation statements carved from "
                         "the calibration statements and validation general text.</p>" + _table_html(st))
        parts.append(_samples_html(results))
        if not sep.empty:
            parts.append("<h2>Pair separations</h2>" + _table_html(sep))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "p.headline{font-size:1.15em;background:#f3f6fa;padding:.6em .9em;border-left:4px solid #3b6ea5}"
            "table.t{border-collapse:collapse;font-size:12px}table.t td,table.t th{padding:2px 8px;"
            "border-bottom:1px solid #ddd;text-align:left}img{max-width:100%}dt{font-weight:bold}"
            "dd{margin:0 0 .4em 1.5em;font-size:13px}table.s td{vertical-align:top;font-size:12px;padding:4px 8px;"
            "width:20%;border-left:2px solid #eee}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")
    out_path.write_text(page, encoding="utf-8")
    log.info("report written to %s", out_path)
    return out_path
