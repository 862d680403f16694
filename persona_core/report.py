"""Reports of evaluation results: a self-contained HTML page and a terminal table.

Input: the rows of `evaluate_unit` (one per persona, method, sparsity,
condition, metric), e.g. every part of ``results/run=<id>/``. Dense rows repeat
in every unit of a persona; they are deduplicated here.

The headline comparison is per opposing pair (A, B): separation =
statement-preference(A) + statement-preference(B) - 1, i.e. how much more A's
condition prefers A's statements than B's condition does. It is exactly 0 for
the dense model without prompt; the prompting baseline is ``dense+prompt`` and
the subnetwork is ``masked`` (no prompt), with A's mask for A and B's for B.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path

import pyarrow as pa

log = logging.getLogger(__name__)

PREF = "statement-preference"
PROMPT = "dense+prompt"
SUBNET = "masked"
PLOT_METRICS = ("statement-preference", "yes-no-agreement", "roleplay-fidelity", "perplexity-ratio")


def _frame(results: pa.Table):
    df = results.to_pandas()
    dense = df[df.condition.str.startswith("dense")].drop_duplicates(["model", "persona", "condition", "metric"])
    masked = df[~df.condition.str.startswith("dense") & (df.method != "dense")]
    return dense, masked


def pair_separation(results: pa.Table):
    """One row per (pair, setting): separation under the prompt baseline and each method/sparsity.

    Columns: pair, a, b, method, sparsity, condition, separation. ``method`` is
    ``prompt`` for the dense+prompt baseline (sparsity 0).
    """
    import pandas as pd

    cols = ["pair", "a", "b", "method", "sparsity", "condition", "separation"]
    if results.num_rows == 0:
        return pd.DataFrame(columns=cols)
    dense, masked = _frame(results)
    pref_d = dense[dense.metric == PREF].set_index(["persona", "condition"]).value
    pref_m = masked[masked.metric == PREF].drop_duplicates(["persona", "method", "sparsity", "condition"]) \
        .set_index(["persona", "method", "sparsity", "condition"]).value
    rows = []
    for a, b in _pairs(results):
        for cond in ("dense", PROMPT):
            if (a, cond) in pref_d.index and (b, cond) in pref_d.index:
                rows.append((f"{a} / {b}", a, b, "prompt" if cond == PROMPT else "dense", 0.0, cond,
                             pref_d[(a, cond)] + pref_d[(b, cond)] - 1))
        for (persona, method, sparsity, cond) in pref_m.index:
            if persona == a and (b, method, sparsity, cond) in pref_m.index:
                rows.append((f"{a} / {b}", a, b, method, sparsity, cond,
                             pref_m[(a, method, sparsity, cond)] + pref_m[(b, method, sparsity, cond)] - 1))
    return pd.DataFrame(rows, columns=cols)


def _pairs(results: pa.Table) -> list[tuple[str, str]]:
    seen, out = set(), []
    for p, o in zip(results.column("persona").to_pylist(), results.column("opposite").to_pylist()):
        if o and p not in seen and o in set(results.column("persona").to_pylist()):
            out.append((p, o))
            seen.update((p, o))
    return out


def beats_prompt(results: pa.Table):
    """Per persona and method/sparsity: the subnetwork's statement-preference against the prompt's."""
    import pandas as pd

    cols = ["persona", "method", "sparsity", "subnetwork", "prompt", "dense", "beats_prompt"]
    if results.num_rows == 0:
        return pd.DataFrame(columns=cols)
    dense, masked = _frame(results)
    d = dense[dense.metric == PREF].set_index(["persona", "condition"]).value
    m = masked[(masked.metric == PREF) & (masked.condition == SUBNET)]
    rows = []
    for r in m.itertuples():
        prompt, plain = d.get((r.persona, PROMPT), math.nan), d.get((r.persona, "dense"), math.nan)
        rows.append((r.persona, r.method, r.sparsity, r.value, prompt, plain, bool(r.value > prompt)))
    return pd.DataFrame(rows, columns=cols).sort_values(["method", "sparsity", "persona"]).reset_index(drop=True)


def summary(results: pa.Table):
    """One row per (method, sparsity): the numbers the terminal table and the report lead with."""
    import pandas as pd

    if results.num_rows == 0:
        return pd.DataFrame()
    dense, masked = _frame(results)
    sep = pair_separation(results)
    prompt_sep = sep[sep.method == "prompt"].set_index("pair").separation
    rows = []
    for (method, sparsity), g in masked[masked.condition == SUBNET].groupby(["method", "sparsity"]):
        s = sep[(sep.method == method) & (sep.sparsity == sparsity) & (sep.condition == SUBNET)]
        wins = sum(1 for r in s.itertuples() if r.pair in prompt_sep.index and r.separation > prompt_sep[r.pair])
        mean = lambda metric: g[g.metric == metric].value.mean()  # noqa: E731
        rows.append({"method": method, "sparsity": sparsity, "pairs": len(s), "beats_prompt": wins,
                     "separation": s.separation.mean(), "prompt_separation": prompt_sep.reindex(s.pair).mean(),
                     "preference": mean(PREF), "yes_no": mean("yes-no-agreement"),
                     "roleplay_fidelity": mean("roleplay-fidelity"), "ppl_ratio": mean("perplexity-ratio")})
    return pd.DataFrame(rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def terminal_table(results: pa.Table) -> str:
    """A compact table: per method and sparsity, pairs where the prompt-free subnetwork
    separates more than prompting, mean separations, metrics, perplexity cost."""
    s = summary(results)
    if s.empty:
        return "no masked results"
    head = ["method", "sparsity", "beats prompt", "sep", "prompt sep", "pref", "yes-no", "roleplay", "ppl x"]
    rows = [head] + [[r.method, f"{r.sparsity:g}", f"{r.beats_prompt}/{r.pairs}", _fmt(r.separation),
                      _fmt(r.prompt_separation), _fmt(r.preference), _fmt(r.yes_no), _fmt(r.roleplay_fidelity),
                      _fmt(r.ppl_ratio)] for r in s.itertuples()]
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


def _plot_separation(sep) -> str | None:
    import matplotlib.pyplot as plt

    sep = sep[sep.condition.isin([PROMPT, SUBNET])]
    if sep.empty:
        return None
    sep = sep.assign(setting=[("prompt" if m == "prompt" else f"{m} s={s:g}") for m, s in zip(sep.method, sep.sparsity)])
    table = sep.pivot_table(index="pair", columns="setting", values="separation", aggfunc="mean")
    cols = ["prompt"] + [c for c in table.columns if c != "prompt"] if "prompt" in table.columns else list(table.columns)
    table = table[cols]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table) + 2), 4))
    width = 0.8 / max(len(cols), 1)
    for k, col in enumerate(cols):
        xs = [i + (k - (len(cols) - 1) / 2) * width for i in range(len(table))]
        ax.bar(xs, table[col].values, width, label=col, color="black" if col == "prompt" else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(table)), table.index, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("separation (pref A + pref B - 1)")
    ax.set_title("Opposing pairs: prompt-free subnetwork vs prompting")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _plot_vs_sparsity(dense, masked, metrics) -> str | None:
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if (masked.metric == m).any()]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.3), squeeze=False)
    sub = masked[masked.condition == SUBNET]
    for ax, metric in zip(axes[0], metrics):
        g = sub[sub.metric == metric].groupby(["method", "sparsity"]).value.mean().reset_index()
        for method, gm in g.groupby("method"):
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


def _table_html(df, floatfmt="{:.3f}") -> str:
    if df.empty:
        return "<p>none</p>"
    return df.to_html(index=False, float_format=lambda v: floatfmt.format(v), border=0, classes="t")


def build_report(results: pa.Table, out_path: str | Path, title: str = "Persona subnetworks: evaluation") -> Path:
    """Write a self-contained HTML report (PNG plots embedded) to `out_path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if results.num_rows == 0:
        parts.append("<p>No results.</p>")
    else:
        dense, masked = _frame(results)
        models = sorted(set(results.column("model").to_pylist()))
        parts.append(f"<p>Model: {html.escape(', '.join(models))}. {results.num_rows} rows, "
                     f"{len(set(results.column('persona').to_pylist()))} personas.</p>")
        parts.append("<h2>Summary</h2>" + _table_html(summary(results)))
        sep = pair_separation(results)
        figs = [("Separation per opposing pair", _plot_separation(sep)),
                ("Metrics against sparsity", _plot_vs_sparsity(dense, masked, PLOT_METRICS[:3])),
                ("Perplexity cost (relative to dense)", _plot_vs_sparsity(dense, masked, ("perplexity-ratio",)))]
        for name, png in figs:
            if png:
                parts.append(f"<h2>{name}</h2><img alt='{name}' src='data:image/png;base64,{png}'/>")
        wins = beats_prompt(results)
        parts.append("<h2>Personas where the subnetwork beats the prompt</h2>"
                     "<p>statement-preference of the masked model without prompt vs the dense model with the "
                     "persona description as system prompt.</p>" + _table_html(wins[wins.beats_prompt]))
        parts.append("<h2>Pair separations</h2>" + _table_html(sep))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table.t{border-collapse:collapse;"
            "font-size:12px}table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd}img{max-width:100%}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>")
    out_path.write_text(page, encoding="utf-8")
    log.info("report written to %s", out_path)
    return out_path
