"""The report: pair separation by hand, the beats-the-prompt table, HTML with PNG plots."""

from __future__ import annotations

import base64
import re

import pyarrow as pa
import pytest

from persona_core.evaluate import RESULT_SCHEMA
from persona_core.report import beats_prompt, build_report, pair_separation, summary, terminal_table

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


def test_summary_counts_pairs_beating_the_prompt():
    s = summary(results()).set_index(["method", "sparsity"])
    cw = s.loc[("contrastive-wanda", 0.3)]
    assert cw.pairs == 2 and cw.beats_prompt == 0  # a/b: 0.4 < 0.5; c/d: 0.15 < 0.8
    assert cw.ppl_ratio == pytest.approx(1.3)
    wins = beats_prompt(results())
    assert set(wins[wins.beats_prompt & (wins.method == "contrastive-wanda")].persona) == {"a"}
    text = terminal_table(results())
    assert "contrastive-wanda" in text and "0/2" in text and "1.300" in text


def test_report_renders_with_plots(tmp_path):
    path = build_report(results(), tmp_path / "sub" / "report.html")
    page = path.read_text()
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) == 3
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "beats the prompt" in page and "a / b" in page and "<script" not in page


def test_empty_results_still_render(tmp_path):
    empty = RESULT_SCHEMA.empty_table()
    assert "No results" in build_report(empty, tmp_path / "r.html").read_text()
    assert terminal_table(empty) == "no masked results"
