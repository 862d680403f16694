"""The report's plots, each a base64 PNG (None when there is nothing to draw)."""

from __future__ import annotations

import base64
import io
import math

import pyarrow as pa

from persona_core.report.analysis import (BASELINE_CONDITIONS, PROMPT_CONDITION, SUBNETWORK_CONDITION, Analysis,
                                          pareto_points, setting_name)

PLOT_METRICS = ("statement-preference", "yes-no-agreement", "roleplay-fidelity", "perplexity-ratio")
# the baselines' colors, the same in every plot; subnetworks take the color cycle
BASELINE_COLORS = {"prompt": "black", "fewshot": "dimgray", "steer": "tab:purple", "steer-learned": "indigo"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt  # heavy: matplotlib loads only when a plot is drawn

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _colors(names: list[str]) -> dict[str, str]:
    """One color per setting, the same in every plot: baselines in greys/purple, subnetworks in the cycle."""
    cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    others = sorted(n for n in names if n not in BASELINE_COLORS)
    return {**BASELINE_COLORS, **{n: cycle[i % len(cycle)] for i, n in enumerate(others)}}


def _settings_order(sep) -> list[str]:
    names = list(dict.fromkeys(setting_name(m, s, c) for m, s, c in zip(sep.method, sep.sparsity, sep.condition)))
    base = [b for b in BASELINE_CONDITIONS if b in names]
    return base + sorted(n for n in names if n not in base and n != "dense")


def plot_separation(sep) -> str | None:
    """Per pair, each setting's separation with its 95% interval (dots and whiskers, no bars)."""
    import matplotlib.pyplot as plt  # heavy: matplotlib loads only when a plot is drawn

    sep = sep[sep.method != "dense"]
    if sep.empty:
        return None
    sep = sep.assign(setting=[setting_name(m, s, c) for m, s, c in zip(sep.method, sep.sparsity, sep.condition)])
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


def plot_cost(summ) -> str | None:
    """Mean separation against perplexity ratio, one point per setting (with the separation interval)."""
    import matplotlib.pyplot as plt  # heavy: matplotlib loads only when a plot is drawn

    if summ.empty or "ppl_ratio" not in summ or summ.ppl_ratio.isna().all():
        return None
    s = summ[summ.ppl_ratio.notna()]
    colors = _colors(list(s.setting))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in s.to_dict("records"):
        err = None if math.isnan(r["sep_lo"]) else [[r["separation"] - r["sep_lo"]], [r["sep_hi"] - r["separation"]]]
        ax.errorbar([r["ppl_ratio"]], [r["separation"]], yerr=err, fmt="s" if r["method"] in BASELINE_CONDITIONS else "o",
                    capsize=2, label=r["setting"], color=colors[r["setting"]])
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("general-text perplexity ratio (vs dense)")
    ax.set_ylabel("mean separation over pairs (95% interval)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Separation against general-text cost", fontsize=10)
    return _png(fig)



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
    import matplotlib.pyplot as plt  # heavy: matplotlib loads only when a plot is drawn

    pts = pareto_points(results)
    if pts.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    family = [m if m in BASELINE_CONDITIONS else m + ("" if c == SUBNETWORK_CONDITION else f" ({c})")
              for m, c in zip(pts.method, pts.condition)]
    pts = pts.assign(family=family)
    cycle = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for fam, g in pts.groupby("family", sort=False):
        color = BASELINE_COLORS.get(fam) or next(cycle)
        base = fam in BASELINE_CONDITIONS
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


def plot_vs_sparsity(dense, masked, metrics) -> str | None:
    """Metrics against sparsity: only when some method was run at two or more sparsities."""
    import matplotlib.pyplot as plt  # heavy: matplotlib loads only when a plot is drawn

    sub = masked[masked.condition == SUBNETWORK_CONDITION]
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
        for cond, style in ((PROMPT_CONDITION, "--"), ("dense", ":")):
            ref = dense[(dense.metric == metric) & (dense.condition == cond)].value.mean()
            if not math.isnan(ref):
                ax.axhline(ref, ls=style, color="black", lw=1, label=cond)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("sparsity")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Metric vs sparsity (subnetwork, no prompt; mean over personas)", fontsize=10)
    return _png(fig)

