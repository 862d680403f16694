"""The evaluate job: planning from the store, the actor pool on a local Ray cluster, reruns."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from persona_core.store import layout
from persona_core.report.results import load_results, read_results_index
from persona_core.run.units import evaluation_tasks
from persona_core.run.plan import Selection, make_plan
from persona_jobs import evaluate as job
from persona_jobs import report
from persona_jobs.flags import load
from persona_core.catalog import load_catalog
from persona_core.eval.config import EvalConfig
from persona_core.masks.codec import write_mask
from persona_core.masks.spec import mask_key
from persona_core.models.layers import linear_groups
from persona_core.models.loading import load_model, model_key
from persona_core.store.store import open_store
from conftest import EVAL_HOLD

MODEL = "tiny-random-llama"
PERSONAS = ["introvert", "extrovert", "optimist", "pessimist"]
CONFIG = EvalConfig(metrics=("statement-preference", "yes-no-agreement", "perplexity"), max_statements=3,
                    ppl_window=32, ppl_windows=1)


def eval_plan(store):
    """A standalone evaluation of the contrastive-wanda masks (baselines ride along) under run id r1, with
    CONFIG from config overrides (its perplexity windows have no flag) on a pool of two 1-CPU actors."""
    options = {"metrics": list(CONFIG.metrics), "max_statements": 3, "ppl_window": 32, "ppl_windows": 1,
               "actors": 2, "cpus_per_actor": 1}
    overrides = {"model": MODEL, "store": store.url, **{f"evaluate.options.{k}": v for k, v in options.items()}}
    plan = make_plan(load(None, overrides), Selection(personas=tuple(PERSONAS), methods=("contrastive-wanda",),
                                                      run_id="r1"))
    assert plan.eval == CONFIG and plan.run_id == "r1"
    return plan


def _masks(module, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(module.get_submodule(n).weight.shape, generator=g) > 0.5
            for grp in linear_groups(module) for n in grp.modules}


@pytest.fixture
def store(tmp_path):
    """A store holding per-persona contrastive masks and shared baselines."""
    st = open_store(str(tmp_path / "store"))
    model = load_model(MODEL, device="cpu").model
    key = model_key(MODEL)
    for i, pid in enumerate(PERSONAS):
        write_mask(st, mask_key(key, "contrastive-wanda", 0.5, pid), _masks(model, i), {"method": "contrastive-wanda"})
        write_mask(st, mask_key(key, "contrastive-mean", 0.5, pid), _masks(model, 10 + i), {})
    write_mask(st, mask_key(key, "magnitude", 0.5, "general"), _masks(model, 99), {"method": "magnitude"})
    write_mask(st, mask_key(key, "magnitude", 0.3, "general"), _masks(model, 98), {"method": "magnitude"})
    return st


def test_plan_picks_methods_and_baselines(store):
    cat = load_catalog("builtin")
    tasks = evaluation_tasks(store, cat, model_key(MODEL), CONFIG, methods=["contrastive-w*"], personas=PERSONAS)
    assert [t.persona.id for t in tasks] == PERSONAS
    assert tasks[0].opposite.id == "extrovert"
    units = {(u.persona, u.mask.base, u.mask.sparsity, u.mask.owner) for t in tasks for u in t.units}
    # magnitude rides along at 0.5 (the chosen level) from the shared mask, not at 0.3
    assert units == {(p, m, 0.5, p if m != "magnitude" else "general") for p in PERSONAS
                     for m in ("contrastive-wanda", "magnitude")}
    parts = [u.part for t in tasks for u in t.units]
    assert len(set(parts)) == len(parts) and all(layout.parse_result_part(p) for p in parts)  # keyed by content
    again = evaluation_tasks(store, cat, model_key(MODEL), CONFIG, methods=["contrastive-w*"], personas=PERSONAS)
    assert parts == [u.part for t in again for u in t.units]  # deterministic names
    none = evaluation_tasks(store, cat, model_key(MODEL), CONFIG, methods=["nothing"], personas=["introvert"])
    assert [u.mask for u in none[0].units] == [None]  # no mask: the dense conditions alone
    # each persona's opposite comes right after it, whatever order they were asked in: a run stopped
    # midway leaves whole pairs (the Anthropic study listed every behavior before any not-<behavior>)
    mixed = evaluation_tasks(store, cat, model_key(MODEL), CONFIG, methods=["contrastive-w*"],
                             personas=["introvert", "optimist", "extrovert", "pessimist"])
    assert [t.persona.id for t in mixed] == ["introvert", "extrovert", "optimist", "pessimist"]


def test_pool_spreads_over_two_actors_and_gathers_every_row_once(store, ray_cluster):
    plan = eval_plan(store)
    # units wait (conftest's EVAL_HOLD) until two actors hold one each, however slowly the second starts
    EVAL_HOLD.mkdir()
    released = threading.Event()

    def release() -> None:
        while not released.wait(0.1):
            if len({m.name.split(".")[1] for m in EVAL_HOLD.iterdir()}) >= 2:
                break
        shutil.rmtree(EVAL_HOLD, ignore_errors=True)

    watcher = threading.Thread(target=release, daemon=True)
    watcher.start()
    try:
        s = job.run(plan)
    finally:
        released.set()
        watcher.join()
    assert s.ok, s.errors
    report.run(plan)
    assert s.done == 8 and s.skipped == 0
    assert len(s.workers) == 2 and sum(s.workers.values()) == 4  # both actors took personas
    back = load_results(store, "r1")  # raises if any row was gathered twice
    assert back.num_rows == s.rows
    per_unit = len(CONFIG.conditions) * 5  # pref, margin, yes-no, perplexity, perplexity-ratio
    assert s.rows == 8 * per_unit
    assert len(read_results_index(store, "r1")) == 8
    assert store.exists(layout.report("r1")) and store.exists(layout.summary_table("r1"))
    assert set(back.column("method").to_pylist()) == {"contrastive-wanda", "magnitude"}
    from persona_core.masks.codec import MaskFile

    want = {MaskFile(store, mask_key(model_key(MODEL), "contrastive-wanda", 0.5, "optimist")).header["digest"]}
    got = {h for p, m, h in zip(back.column("persona").to_pylist(), back.column("method").to_pylist(),
                                back.column("mask_hash").to_pylist()) if p == "optimist" and m != "magnitude"}
    assert got == want  # the codec's content digest of the mask

    again = job.run(plan)
    assert again.done == 0 and again.skipped == 8 and again.rows == s.rows and again.workers == {}


def test_cli_parses(store):
    from persona_jobs.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--store", store.url, "--model", MODEL, "--methods", "contrastive-*",
                                      "--sparsities", "0.5", "--conditions", "dense", "masked",
                                      "--judge-url", "http://127.0.0.1:9/v1"])
    cfg = job.plan_from_args(args).eval
    assert cfg.conditions == ("dense", "masked") and "judge" in cfg.metrics and cfg.judge.url
    assert args.func is job._main


def test_the_command_writes_the_report_through_the_report_stage(store, ray_cluster, capsys):
    """`persona-jobs evaluate` runs the evaluate stage, then the one report writer (the pipeline's report
    stage), prints the summary table it published and records the evaluation for `status`."""
    from persona_core.run import runs
    from persona_jobs.cli import main as cli_main

    flags = ["evaluate", "--store", store.url, "--model", MODEL, "--methods", "contrastive-wanda", "--personas",
             "introvert", "--conditions", "masked", "--metrics", "statement-preference", "--max-statements", "3",
             "--actors", "1", "--cpus-per-actor", "1", "--run-id", "cli"]
    assert cli_main(flags) == 0
    out = capsys.readouterr().out
    assert store.exists(layout.report("cli")) and f"report: {store.uri(layout.report('cli'))}" in out
    assert store.read_bytes(layout.summary_table("cli")).decode().rstrip("\n") in out
    page = store.read_bytes(layout.report("cli")).decode()
    assert "Inputs" in page and "contrastive-wanda" in page
    m = runs.read_manifest(store, "cli")
    assert m.kind == "evaluate" and m.ok and m.report == store.uri(layout.report("cli"))
    assert cli_main([*flags, "--no-report"]) == 0 and "report:" not in capsys.readouterr().out


def test_a_pair_goes_to_one_evaluator_and_its_shared_work_runs_once(store, monkeypatch):
    """Issue 26: the two poles of a pair were two tasks on two actors, and each learned the pair's steering
    vectors (the evaluate stage's largest cost). `pair_groups` gives one actor both poles; its evaluator
    remembers what the pair shares, so the vectors are learned once."""
    from persona_core.eval import steered

    cfg = EvalConfig(conditions=("dense", "dense+steer-learned"), metrics=("statement-preference",),
                     max_statements=3, steer_layers=(0.5,), val_statements=2)
    tasks = evaluation_tasks(store, load_catalog("builtin"), model_key(MODEL), cfg, methods=["nothing"],
                             personas=PERSONAS)
    groups = job.pair_groups(tasks)
    assert [[t.persona.id for t in g] for g in groups] == [["introvert", "extrovert"], ["optimist", "pessimist"]]
    learned = []
    real = steered.learn_vector
    monkeypatch.setattr(steered, "learn_vector", lambda *a, **k: learned.append(a[1]) or real(*a, **k))
    outs = job.EvalWorker(MODEL, store, cfg).run_pair(groups[0])
    assert [o["persona"] for o in outs] == ["introvert", "extrovert"] and not any(o["errors"] for o in outs)
    assert len(learned) == 1  # one layer, one pair: learned once for both poles
    rows = [r for o in outs for t in o["tables"].values() for r in t.to_pylist()
            if r["condition"] == "dense+steer-learned" and r["metric"] == "steer-layer"]
    assert len(rows) == 2 and len({r["value"] for r in rows}) == 1  # both poles steered at the pair's choice
