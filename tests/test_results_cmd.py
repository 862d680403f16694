"""`persona-jobs results` (list runs, one run's table, two runs' difference) and the one-line
descriptions `persona-jobs methods` / `metrics` print for every registry entry."""

from __future__ import annotations

import time

import pytest

from persona_core.eval.metrics import METRICS
from persona_core.eval.schema import result_table
from persona_core.masks.methods import METHODS
from persona_core.run import runs
from persona_core.store import layout
from persona_core.store.store import open_store
from persona_jobs.cli import describe, main


def write_run(store, run_id: str, masked: dict[str, float], ppl: float) -> None:
    """A run's results (one opposing pair; dense, prompt and masked) in the run's own parts folder."""
    prompt = {"introvert": 0.7, "extrovert": 0.6}
    for pid, opp in (("introvert", "extrovert"), ("extrovert", "introvert")):
        rows = [{"condition": "dense", "metric": "statement-preference", "value": 0.5, "n": 4, "stderr": 0.1},
                {"condition": "dense+prompt", "metric": "statement-preference", "value": prompt[pid], "n": 4,
                 "stderr": 0.1},
                {"condition": "masked", "metric": "statement-preference", "value": masked[pid], "n": 4, "stderr": 0.1},
                {"condition": "masked", "metric": "perplexity-ratio", "value": ppl, "n": 64, "stderr": float("nan")}]
        unit = {"model": "m", "persona": pid, "opposite": opp, "method": "wanda", "sparsity": 0.5,
                "granularity": "unstructured", "mask_hash": "h", "config_hash": "c", "eval_hash": "e",
                "code_version": "v"}
        store.write_parquet(f"{layout.results_prefix(run_id)}/part-{pid}-wanda-0123456789.parquet",
                            result_table(unit, rows))


@pytest.fixture
def store(tmp_path):
    store = open_store(str(tmp_path / "store"))
    write_run(store, "run-aaaa", {"introvert": 0.8, "extrovert": 0.7}, 1.25)
    runs.write_manifest(store, runs.Manifest(run_id="run-aaaa", kind="pipeline", status="succeeded",
                                             inputs={"catalog": "builtin", "model_key": "smollm2-135m-1234abcd"},
                                             started=time.time() - 60, finished=time.time() - 30))
    write_run(store, "eval-bbbb", {"introvert": 0.9, "extrovert": 0.75}, 1.5)
    runs.mark_stage(store, "eval-bbbb", "evaluate", {"done": 2})  # a stage, no manifest: incomplete
    return store


def test_results_lists_runs(store, capsys):
    assert main(["results", "--store", store.uri()]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "date", "catalog", "model", "status", "kind"]
    row = next(line for line in lines if line.startswith("run-aaaa")).split()
    assert row[3:] == ["builtin", "smollm2-135m-1234abcd", "succeeded", "pipeline"]
    assert next(line for line in lines if line.startswith("eval-bbbb")).split()[-2:] == ["incomplete", "-"]


def test_results_prints_one_runs_table(store, capsys):
    assert main(["results", "--store", store.uri(), "run-aaaa"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run run-aaaa: succeeded (pipeline)")
    row = next(line for line in out.splitlines() if line.startswith("wanda s=0.5"))
    assert "0.500" in row and "1.250" in row  # separation 0.8 + 0.7 - 1, perplexity ratio
    store.write_bytes(layout.summary_table("run-aaaa"), b"the published table\n")
    assert main(["results", "--store", store.uri(), "run-aaaa"]) == 0
    assert "the published table" in capsys.readouterr().out


def test_results_diffs_two_runs(store, capsys):
    assert main(["results", "--store", store.uri(), "run-aaaa", "eval-bbbb"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("wanda s=0.5")).split()
    assert row[-6:] == ["0.500", "0.650", "+0.150", "1.250", "1.500", "+0.250"]
    prompt = next(line for line in out.splitlines() if line.startswith("prompt")).split()
    assert prompt[1:4] == ["0.300", "0.300", "+0.000"]


def test_unknown_run_is_one_line(store, capsys):
    assert main(["results", "--store", store.uri(), "run-nope"]) == 2
    assert "run 'run-nope': no results" in capsys.readouterr().err


def test_every_metric_and_method_says_what_it_does(capsys):
    assert all(m.description and describe(m) == m.description for m in METRICS.values())
    assert main(["metrics"]) == 0
    out = capsys.readouterr().out
    assert " - " not in out and "General-text perplexity" in out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "what it does" in out[0]
    described = [m for m in METHODS.values() if describe(m) != "-"]
    assert len(described) >= len(METHODS) - 1  # magnitude: its function has no docstring
    for m in described:
        assert any(line.startswith(m.name + " ") and describe(m)[:40] in line for line in out), m.name
