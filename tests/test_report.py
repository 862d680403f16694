"""The report: pair separation by hand, intervals and verdicts, HTML with PNG plots and samples."""

from __future__ import annotations

import base64
import re

import pyarrow as pa
import pytest

from persona_core.eval.schema import RESULT_SCHEMA
from persona_core.report.analysis import pair_separation, steering_choices, summary, verdicts
from persona_core.report.html import build_report
from persona_core.report.terminal import headline, terminal_table

PREF = {  # persona -> condition -> statement-preference
    "a": {"dense": 0.6, "dense+prompt": 0.7, "masked": 0.9, "masked+prompt": 0.95},
    "b": {"dense": 0.4, "dense+prompt": 0.8, "masked": 0.5, "masked+prompt": 0.6},
    "c": {"dense": 0.5, "dense+prompt": 0.9, "masked": 0.55, "masked+prompt": 0.6},
    "d": {"dense": 0.5, "dense+prompt": 0.9, "masked": 0.6, "masked+prompt": 0.6},
}
OPP = {"a": "b", "b": "a", "c": "d", "d": "c"}


def results() -> pa.Table:
    rows = []
    for method in ("contrastive-wanda", "magnitude"):
        for sparsity in (0.3, 0.5):
            for p, conds in PREF.items():
                for cond, v in conds.items():
                    shift = 0.0 if method == "contrastive-wanda" and cond.startswith("masked") else (
                        -0.1 if cond.startswith("masked") else 0.0)
                    shift -= 0.05 * (sparsity - 0.3) if cond.startswith("masked") else 0.0
                    base = dict(model="m-1", persona=p, opposite=OPP[p], method=method, sparsity=sparsity,
                                granularity="unstructured", mask_hash=f"{method}{sparsity}{p}", condition=cond,
                                n=4, stderr=0.01, config_hash="c", eval_hash="e", code_version="v")
                    rows.append({**base, "metric": "statement-preference", "value": v + shift})
                    rows.append({**base, "metric": "perplexity-ratio",
                                 "value": 1.0 if cond.startswith("dense") else 1 + sparsity})
                    rows.append({**base, "metric": "yes-no-agreement", "value": 0.5 + shift})
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def test_pair_separation_by_hand():
    sep = pair_separation(results())
    get = lambda pair, method, cond, s=0.0: sep[(sep.pair == pair) & (sep.method == method) & (sep.condition == cond)  # noqa: E731
                                                & (sep.sparsity == s)].separation.item()
    assert get("a / b", "dense", "dense") == pytest.approx(0.0)
    assert get("a / b", "prompt", "dense+prompt") == pytest.approx(0.7 + 0.8 - 1)
    assert get("a / b", "contrastive-wanda", "masked", 0.3) == pytest.approx(0.9 + 0.5 - 1)
    assert get("c / d", "contrastive-wanda", "masked", 0.3) == pytest.approx(0.55 + 0.6 - 1)
    assert get("a / b", "magnitude", "masked", 0.5) == pytest.approx(0.9 + 0.5 - 1 - 2 * 0.11)
    assert len(sep[(sep.method == "prompt")]) == 2  # dense rows deduplicated across units


def test_summary_without_item_scores_has_no_interval_or_verdict_columns():
    s = summary(results()).set_index("setting")
    cw = s.loc["contrastive-wanda s=0.3"]
    assert cw.pairs == 2 and cw.separation == pytest.approx(((0.9 + 0.5 - 1) + (0.55 + 0.6 - 1)) / 2)
    assert cw.ppl_ratio == pytest.approx(1.3)
    assert "vs_prompt" not in s and "roleplay_fidelity" not in s  # nothing to show: no column
    text = terminal_table(results())
    assert "contrastive-wanda s=0.3" in text and "1.300" in text


def scored_results() -> pa.Table:
    """Two pairs with per-statement scores: the mask separates clearly; prompt a little; few-shot = prompt."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 60
    rows = []
    shifts = {"dense": 0.0, "dense+prompt": 0.2, "dense+fewshot": 0.2, "masked": 1.5}
    own_noise = {p: rng.normal(0, 1, n) for p in "abcd"}
    for p, o in OPP.items():
        for cond, shift in shifts.items():
            method = "contrastive-penalty" if cond == "masked" else "contrastive-penalty"
            # the same statement noise under every condition (paired), own statements moved by `shift`
            items = list(own_noise[p] + shift) + list(own_noise[o])
            base = dict(model="m-1", persona=p, opposite=o, method=method, sparsity=0.3, granularity="unstructured",
                        mask_hash="h", condition=cond, n=n * n, stderr=0.01, config_hash="c", eval_hash="e",
                        code_version="v")
            rows.append({**base, "metric": "statement-preference", "value": float(np.mean(
                np.asarray(items[:n])[:, None] > np.asarray(items[n:])[None, :])), "items": items, "items_own": n})
            rows.append({**base, "metric": "perplexity-ratio", "value": 1.4 if cond == "masked" else 1.0})
            rows.append({**base, "metric": "sample-generations", "value": 1.0,
                         "texts": [f"What do you like?\n{p} under {cond} says hi"]})
        rows.append({**base, "condition": "dense+steer", "metric": "steer-layer", "value": 12.0})
        rows.append({**base, "condition": "dense+steer", "metric": "steer-alpha", "value": 4.0})
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def test_intervals_verdicts_and_headline():
    r = scored_results()
    sep = pair_separation(r)
    assert (sep.lo <= sep.separation).all() and (sep.separation <= sep.hi).all()
    dense = sep[sep.method == "dense"]
    assert dense.separation.abs().max() == pytest.approx(0.0) and (dense.lo == 0).all()
    v = verdicts(r)
    assert set(v.baseline) == {"prompt", "fewshot"}
    assert (v.verdict == "win").all()  # 1.5 vs 0.2 on 60 statements per pole
    s = summary(r).set_index("setting")
    assert s.loc["contrastive-penalty s=0.3"].vs_prompt == "2/0/0"
    assert s.loc["prompt"].separation == pytest.approx(s.loc["fewshot"].separation)
    line = headline(r)
    assert "2 opposing pairs" in line and "95% CI" in line and "wins 2, ties 0 and loses 0" in line
    assert "W/T/L vs prompt" in terminal_table(r)
    st = steering_choices(r)
    assert list(st.layer) == [12, 12] and list(st.alpha) == [4.0, 4.0]


def test_report_renders_with_plots(tmp_path):
    path = build_report(scored_results(), tmp_path / "sub" / "report.html",
                        inputs={"catalog": "builtin", "perplexity budget": "1.10x"})
    page = path.read_text()
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 3  # separation per pair, vs cost, Pareto view; one sparsity: no vs-sparsity plot
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for text in ("class='headline'", "Definitions", "win / tie / loss", "Verdicts per pair", "catalog",
                 "builtin", "Sample generations", "a under dense+prompt says hi", "Steering settings"):
        assert text in page, text
    assert "<script" not in page and ">nan<" not in page.lower()
    two = build_report(results(), tmp_path / "two.html").read_text()
    assert len(re.findall(r"data:image/png;base64,", two)) == 4  # two sparsities: the vs-sparsity plot too


def test_empty_results_still_render(tmp_path):
    empty = RESULT_SCHEMA.empty_table()
    assert "No results" in build_report(empty, tmp_path / "r.html").read_text()
    assert terminal_table(empty) == "no masked results"


def test_pareto_points_use_the_test_split_and_the_worse_mask_of_a_pair(tmp_path):
    from persona_core.report.analysis import pareto_points
    from persona_core.report.plots import plot_pareto

    rows = results().to_pylist()
    extra = []
    for r in rows:
        if r["metric"] == "perplexity-ratio":  # a WikiText-2 test ratio beside the built-in one
            bump = 0.0 if r["condition"].startswith("dense") else (0.2 if r["persona"] in ("a", "c") else 0.1)
            extra.append({**r, "metric": "perplexity-ratio:test.txt", "value": r["value"] + bump})
    table = pa.Table.from_pylist(rows + extra, schema=RESULT_SCHEMA)
    pts = pareto_points(table)
    assert set(pts.ppl_metric) == {"perplexity-ratio:test.txt"}
    cw = pts[(pts.pair == "a / b") & (pts.method == "contrastive-wanda") & (pts.sparsity == 0.3)
             & (pts.condition == "masked")]
    assert cw.ppl_ratio.item() == pytest.approx(1.3 + 0.2)  # max of the pair's two masks
    assert cw.separation.item() == pytest.approx(0.9 + 0.5 - 1)
    prompt = pts[(pts.pair == "a / b") & (pts.method == "prompt")]
    assert prompt.ppl_ratio.item() == pytest.approx(1.0)
    assert "dense" not in set(pts.method)
    png = plot_pareto(table)
    assert png and base64.b64decode(png)[:4] == b"\x89PNG"
    # without any perplexity rows there is nothing to draw
    no_ppl = table.filter(pa.compute.invert(pa.compute.starts_with(table.column("metric"), "perplexity")))
    assert plot_pareto(no_ppl) is None and pareto_points(no_ppl).empty
    page = build_report(table, tmp_path / "r.html").read_text()
    assert "Pareto view" in page


def test_pareto_axis_names_the_text_the_ratio_was_measured_on():
    from persona_core.report.plots import ppl_axis_label

    wiki = "../shared/data/wikitext-2/test.txt (4 windows x 128 tokens)"
    assert ppl_axis_label("perplexity-ratio", wiki) == f"perplexity ratio vs dense ({wiki})"
    assert ppl_axis_label("perplexity-ratio:extra.txt", wiki) == "perplexity ratio vs dense (extra.txt)"
    assert ppl_axis_label("perplexity-ratio") == "perplexity ratio vs dense (built-in held-out text)"


def test_report_and_table_bootstrap_once(tmp_path, monkeypatch):
    """The page, its headline, its plots, the published summary table: one bootstrap per interval and verdict."""
    import persona_core.report.analysis as report
    from persona_core.store import layout
    from persona_core.report.results import write_report
    from persona_core.store.store import open_store

    calls = {"interval": 0, "compare": 0}

    def counted(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(report, "separation_interval", counted("interval", report.separation_interval))
    monkeypatch.setattr(report, "compare", counted("compare", report.compare))
    r = scored_results()
    an = report.analyse(r)
    store = open_store(str(tmp_path / "store"))
    write_report(store, "r1", an)
    assert calls["interval"] == len(an.separation) and calls["compare"] == len(an.verdicts) > 0
    assert store.read_bytes(layout.summary_table("r1")).decode() == terminal_table(an) + "\n"
    assert calls["interval"] == len(an.separation)  # the table reused them too
