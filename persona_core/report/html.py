"""The report page: one self-contained HTML file with the headline, tables, definitions and PNG plots."""

from __future__ import annotations

import html
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from persona_core.report.analysis import (BASELINE_CONDITIONS, PROMPT_CONDITION, SUBNETWORK_CONDITION, Analysis,
                                          analyse, setting_name, steering_choices)
from persona_core.report.plots import PLOT_METRICS, plot_cost, plot_pareto, plot_separation, plot_vs_sparsity
from persona_core.report.terminal import headline

log = logging.getLogger(__name__)

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
    "steer-learned": "baseline: one residual-stream vector per pair learned with the learned masks' objective "
                     "(statement margin + general-text KL), layer and scale chosen per pair on validation statements "
                     "within the same perplexity budget.",
    "masked": "the persona's subnetwork (its mask applied to the dense weights), no prompt.",
}



LABELS = {"vs_prompt": "W/T/L vs prompt", "vs_fewshot": "W/T/L vs few-shot", "vs_steer": "W/T/L vs steering",
          "vs_steer-learned": "W/T/L vs learned steering",
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
        picks = [("dense", g[g.condition == "dense"]), ("prompted", g[g.condition == PROMPT_CONDITION]),
                 ("few-shot", g[g.condition == "dense+fewshot"]), ("steered", g[g.condition == "dense+steer"])]
        masked = g[g.condition == SUBNETWORK_CONDITION].sort_values(["method", "sparsity"])
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
    import matplotlib  # heavy: matplotlib loads only when a report is drawn

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
        used = {"separation", "interval"} | {b for b, c in BASELINE_CONDITIONS.items() if c in conditions}
        used |= {"masked"} if SUBNETWORK_CONDITION in conditions else set()
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
        figs = [("Separation per opposing pair", plot_separation(sep)),
                ("Separation against general-text cost", plot_cost(summ)),
                ("Pareto view: separation against perplexity, per pair and method",
                 plot_pareto(an, (inputs or {}).get("general text (reported)"))),
                ("Metrics against sparsity", plot_vs_sparsity(dense, masked, PLOT_METRICS))]
        for name, png in figs:
            if png:
                parts.append(f"<h2>{name}</h2><img alt='{name}' src='data:image/png;base64,{png}'/>")
        if not ver.empty:
            ver = ver.assign(setting=[setting_name(m, s, c) for m, s, c in zip(ver.method, ver.sparsity, ver.condition)])
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
