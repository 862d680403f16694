"""The report in words: its headline sentence and the summary table printed in a terminal."""

from __future__ import annotations

import math

import pyarrow as pa

from persona_core.report.analysis import BASELINE_CONDITIONS, SUBNETWORK_CONDITION, Analysis, summary


def headline(results: "pa.Table | Analysis") -> str:
    """One sentence: the best subnetwork against the best baseline, with intervals and verdicts."""
    s = summary(results)
    if s.empty or "separation" not in s:
        return "No separations to report (no statement-preference results for opposing pairs)."
    subs = s[s.condition == SUBNETWORK_CONDITION] if "condition" in s else s.iloc[0:0]
    base = s[s.method.isin(list(BASELINE_CONDITIONS))] if "method" in s else s.iloc[0:0]
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

