"""Benchmarks cannot rot unseen between studies.

Cheap (make check): every file under benchmarks/ imports, builds its argument parser, and names
only what the library has: each `persona_core` / `persona_jobs` import in it, function-local ones
included, resolves (a name moved inside the library breaks this test, not the next study).

Slow (make test): every benchmark `make bench` runs, run once on its smallest arguments (its
``SMOKE`` list, on the tiny random model), exits 0 and prints one JSON line.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ALL = sorted(p.stem for p in BENCH.glob("*.py"))
# the Makefile's `bench` target: every benchmark but the studies and sweeps (hours each) and gpu.py
# (`make gpu-check`: full-size models; its CPU smoke run is tested below)
MAKE_BENCH = [n for n in ALL if not n.startswith(("study_", "sweep_")) and n != "gpu"]
LIBRARY = ("persona_core", "persona_jobs")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def library_imports(path: Path):
    """(line, module, name or None) for every import of the library (or of a sibling benchmark, as
    masks.py imports frontier.py's timed search) in `path`, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in (*LIBRARY, *ALL):
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARY:
                    yield node.lineno, alias.name, None


def test_benchmarks_are_found():
    assert {"masks", "evaluate", "calibration"} <= set(MAKE_BENCH)


@pytest.mark.parametrize("name", ALL)
def test_benchmark_imports_and_builds_its_parser(name):
    module = load(name)
    ap = module.parser()
    ap.parse_args([])  # every flag has a default
    if name in MAKE_BENCH:
        smoke = [a.format(tmp="/tmp") for a in module.SMOKE]
        ap.parse_args(smoke)
        assert "--model" in smoke, f"{name}: its SMOKE run should use the tiny random model"


@pytest.mark.parametrize("name", ALL)
def test_benchmark_imports_only_what_the_library_has(name):
    missing = []
    for line, mod, attr in library_imports(BENCH / f"{name}.py"):
        try:
            module = load(mod) if mod in ALL else importlib.import_module(mod)  # a sibling benchmark, or the library
        except ImportError as err:
            missing.append(f"benchmarks/{name}.py:{line}: import {mod}: {err}")
            continue
        if attr is not None and not hasattr(module, attr) and not (
                hasattr(module, "__path__") and importlib.util.find_spec(f"{mod}.{attr}") is not None):
            missing.append(f"benchmarks/{name}.py:{line}: {mod} has no {attr}")
    assert not missing, "\n".join(missing)


def _starts_ray(name: str) -> bool:
    return re.search(r"^\s*import ray\b", (BENCH / f"{name}.py").read_text(), re.M) is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.ray] if _starts_ray(n) else []) for n in MAKE_BENCH])
def test_benchmark_runs_on_its_smallest_arguments(name, tmp_path):
    args = [a.format(tmp=tmp_path) for a in load(name).SMOKE]
    env = {**os.environ, "PERSONA_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # a benchmark that uses Ray starts its own local one
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"benchmarks/{name}.py {' '.join(args)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"benchmarks/{name}.py printed {len(lines)} lines, not one JSON line:\n{done.stdout[-2000:]}"
    out = json.loads(lines[0])
    assert out["benchmark"] == name


# ---------------------------------------------------------------------------- benchmarks/gpu.py


def test_gpu_shapes_are_the_published_llama_configs():
    """Llama-3.2-1B and Llama-3.1-8B as published: parameter counts (on the meta device, no memory),
    tied embeddings for the 1B only, grouped-query attention 32:8, llama3 rope at theta 500,000."""
    from transformers import LlamaForCausalLM

    import torch

    gpu = load("gpu")
    tok = gpu.byte_tokenizer()
    expected = {"1b": ("llama-3.2-1b", 1_235_814_400, True, 32.0), "8b": ("llama-3.1-8b", 8_030_261_248, False, 8.0)}
    assert set(gpu.SHAPES) == set(expected)
    for key, (name, params, tied, factor) in expected.items():
        label, shape = gpu.SHAPES[key]
        cfg = gpu.llama_config(shape, tok)
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        assert label == name
        assert sum(p.numel() for p in model.parameters()) == params, name
        assert cfg.tie_word_embeddings is tied
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (32, 8, 128256)
        assert cfg.rope_parameters["rope_theta"] == 500000.0 and cfg.rope_parameters["factor"] == factor


def test_gpu_swap_bound_counts_every_byte_moved():
    """apply reads the dense copy and the 1-byte mask and writes the weight; restore reads and writes."""
    import torch

    gpu = load("gpu")
    masks = {"a": torch.ones(3, 4, dtype=torch.bool), "b": torch.zeros(5, dtype=torch.bool)}
    assert gpu.swap_bytes(masks, 2) == (17 * 5, 17 * 4)  # bf16
    assert gpu.swap_bytes(masks, 4) == (17 * 9, 17 * 8)  # fp32


@pytest.mark.slow
def test_gpu_benchmark_small_runs_on_cpu_without_ray(tmp_path):
    """`benchmarks/gpu.py --small`: exit 0, one JSON line on stdout (logs on stderr), every phase's
    figures against its plain baseline, peak memory per phase, the bound's bytes, and Ray never imported."""
    gpu = BENCH / "gpu.py"
    wrapper = ("import runpy, sys; sys.argv = [sys.argv[1], *sys.argv[2:]]; runpy.run_path(sys.argv[0], "
               "run_name='__main__'); assert 'ray' not in sys.modules, 'benchmarks/gpu.py imported ray'")
    env = {**os.environ, "PERSONA_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", wrapper, str(gpu), *load("gpu").SMOKE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"benchmarks/gpu.py printed {len(lines)} lines, not one JSON line:\n{done.stdout[-2000:]}"
    out = json.loads(lines[0])
    assert (out["benchmark"], out["device"], out["dtype"], out["small"]) == ("gpu", "cpu", "float32", True)
    assert out["bandwidth_gb_s"] > 0
    (model,) = out["models"].values()
    assert set(model["peak_gib"]) == {"calibration", "scoring", "swap", "learner"}
    assert all(v > 0 for v in model["peak_gib"].values())
    cal, score, swap, learn = (model[k] for k in ("calibration", "scoring", "swap", "learner"))
    assert cal["plain_tokens_per_s"] > 0 and cal["stats_tokens_per_s"] > 0 and cal["ratio"] > 0
    assert score["statements"] == 4 and score["pref_tokens_per_s"] > 0 and score["pref_vs_plain"] > 0
    assert swap["apply_bytes"] == swap["weights"] * 9 and swap["restore_bytes"] == swap["weights"] * 8  # fp32
    assert min(swap[k] for k in ("apply_s", "swap_s", "restore_s", "apply_bound_s", "restore_bound_s")) > 0
    assert learn["steps_per_s"] > 0 and learn["ratio_vs_plain"] > 0 and learn["ratio_vs_frozen"] > 0
    assert learn["tokens_per_step"] > 0 and set(learn["peak_gib"]) == {"prepare", "learner", "plain", "frozen"}
    assert model["peak_gib"]["learner"] == max(learn["peak_gib"].values())


@pytest.mark.slow
def test_gpu_benchmark_phases_run_in_bf16():
    """The GPU runs every phase in bf16: the same phases on CPU in bf16 (a small shape) give finite figures
    (the statistics reduce bf16 inputs in float32, the learner's float mask meets bf16 activations)."""
    import math

    import torch

    gpu = load("gpu")
    model = gpu.run_model("bf16", gpu.SMALL[1], gpu.Device(torch.device("cpu")), torch.bfloat16, gpu.SMALL_SIZES, 1e10)
    assert model["swap"]["apply_bytes"] == model["swap"]["weights"] * 5  # 2-byte weights
    figures = [model["calibration"]["ratio"], model["scoring"]["pref_vs_plain"], model["learner"]["ratio_vs_plain"],
               model["learner"]["ratio_vs_frozen"], model["swap"]["swap_vs_bound"]]
    assert all(math.isfinite(v) and v > 0 for v in figures), figures


def test_learner_initial_scores_follow_the_models_device():
    """gpu.py's learner phase (and `learn_persona` on a GPU) starts from `initial_scores` of a model on CUDA
    with statistics on CPU: the statistics must move to the weights. The meta device stands in for CUDA here:
    before the fix the weights (meta) met the statistics (cpu) in the method's score ("not on the expected
    device"); now the statistics move and only meta's lack of values (`.item()`) stops it. On CPU the scores
    are unchanged."""
    import torch

    from persona_core.calib.config import CalibConfig
    from persona_core.calib.recorder import calibrate
    from persona_core.learn.config import LearnConfig
    from persona_core.learn.learner import initial_scores
    from persona_core.models.loading import load_model

    loaded = load_model("tiny-random-llama", device="cpu")
    stats = calibrate(loaded, ["a first text, long enough to count", "and a second one"], CalibConfig(max_length=32))
    scores, tiebreak = initial_scores(loaded, [stats], LearnConfig())
    again, tie_again = initial_scores(loaded, [stats], LearnConfig(), device="cpu")
    assert torch.equal(scores, again) and torch.equal(tiebreak, tie_again)
    assert scores.shape == (2, 128) and torch.isfinite(scores).all()
    loaded.model.to("meta")
    with pytest.raises(RuntimeError, match="meta tensors"):
        initial_scores(loaded, [stats], LearnConfig())


# ---------------------------------------------------------------------------- benchmarks/study_learned.py


def _study_rows(pairs, learned_steer: float = 0.3, seed: int = 0):
    """A synthetic issue-26 results table: per pair (a, b, mask shift, few-shot shift, mask test ppl) every
    condition's statement-preference items (shifted normal scores, 60 per pole) and test perplexity."""
    import numpy as np
    import pyarrow as pa

    from persona_core.eval.schema import RESULT_SCHEMA

    rng = np.random.default_rng(seed)
    n = 60
    rows = []
    for a, b, mask, fewshot, ppl in pairs:
        noise = {p: rng.normal(0, 1, n) for p in (a, b)}
        shifts = {"dense": 0.0, "dense+prompt": 0.0, "dense+fewshot": fewshot, "dense+steer": 0.1,
                  "dense+steer-learned": learned_steer, "masked": mask}
        for p, o in ((a, b), (b, a)):
            for cond, shift in shifts.items():
                items = list(noise[p] + shift) + list(noise[o])
                base = dict(model="m-1", persona=p, opposite=o, method="learned-contrastive", sparsity=0.02,
                            granularity="ffn-channels", mask_hash=f"h{p}", condition=cond, n=n * n, stderr=0.01,
                            config_hash="c", eval_hash="e", code_version="v")
                rows.append({**base, "metric": "statement-preference", "value": float(np.mean(
                    np.asarray(items[:n])[:, None] > np.asarray(items[n:])[None, :])), "items": items, "items_own": n})
                rows.append({**base, "metric": "perplexity-ratio:wikitext-2-test",
                             "value": ppl if cond == "masked" else 1.0})
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def test_study_learned_pools_pairs_into_the_issue26_target_figures():
    """Three pairs: the mask beats every baseline on two; on the second few-shot is as good as the mask.
    The third mask is over the budget on the test text. Pooled: 2/3 beat all, W/T/L 2/1/0 against few-shot."""
    from persona_core.report.analysis import analyse

    study = load("study_learned")
    pairs = [("a", "b", 1.5, 0.3, 1.05), ("c", "d", 1.5, 1.5, 1.05), ("e", "f", 1.5, 0.3, 1.2)]
    an = analyse(_study_rows(pairs))
    (row,) = study.pooled(an, budget=1.10)
    assert (row["method"], row["condition"], row["pairs"]) == ("learned-contrastive", "masked", 3)
    assert row["beats_all"] == 2
    assert list(row["baselines"]) == ["prompt", "fewshot", "steer", "steer-learned"]
    assert row["baselines"]["fewshot"]["wtl"] == "2/1/0" and row["baselines"]["prompt"]["wtl"] == "3/0/0"
    assert row["strongest_baseline"] == "fewshot"
    d = row["baselines"]["fewshot"]["difference"]
    assert d["lo"] <= d["mean"] <= d["hi"] and d["mean"] > 0
    # the ratio of the unrounded means; the printed means are rounded to 3 places (hence the tolerance)
    assert row["ratio_vs_strongest"] == pytest.approx(
        row["separation"]["mean"] / row["baselines"]["fewshot"]["separation"]["mean"], abs=5e-3)
    assert row["within_budget_on_test"] == "2/3"
    text = study.markdown({"run": "r1 + r2", "pairs": ["a / b", "c / d", "e / f"], "verdicts": [], "separation": [],
                           "pooled": [row]})
    assert "| learned-contrastive (masked) | 2/3 |" in text and "(fewshot)" in text


def test_study_learned_compares_baselines_with_other_runs_on_the_same_statements():
    """Learned steering shifted 1.2 in this run and 0.3 in the other, on the same statements: a win for
    this run's; every other baseline is the same items in both (difference 0, a tie)."""
    from persona_core.report.analysis import analyse

    study = load("study_learned")
    pairs = [("a", "b", 1.5, 0.3, 1.05), ("c", "d", 1.5, 1.5, 1.05)]
    rows = study.baselines_vs(analyse(_study_rows(pairs, learned_steer=1.2)), analyse(_study_rows(pairs)))
    assert {(r["pair"], r["baseline"]) for r in rows} == {
        (p, b) for p in ("a / b", "c / d") for b in ("prompt", "fewshot", "steer", "steer-learned")}
    for r in rows:
        if r["baseline"] == "steer-learned":
            assert r["verdict"] == "win" and r["lo"] > 0 and r["this"] > r["other"]
        else:
            assert r["verdict"] == "tie" and r["difference"] == 0 and r["this"] == r["other"]
    # the other run read its rows B first, so it names its pairs the other way round: the same comparisons
    other = _study_rows(pairs)
    other = analyse(other.take(list(range(other.num_rows - 1, -1, -1))))
    assert other.pairs == [("d", "c"), ("b", "a")]
    assert study.baselines_vs(analyse(_study_rows(pairs, learned_steer=1.2)), other) == rows


def test_study_learned_scores_masks_against_another_runs_baselines():
    """The masks (shift 1.5) beat this run's four baselines on both pairs. Against another run whose learned
    steering is stronger than the masks (2.5) they lose that comparison and no pair beats every baseline of
    both runs; against a run with the same baselines both pairs still do."""
    from persona_core.report.analysis import analyse

    study = load("study_learned")
    pairs = [("a", "b", 1.5, 0.3, 1.05), ("c", "d", 1.5, 0.3, 1.05)]
    an = analyse(_study_rows(pairs))
    (row,) = study.pooled(an, budget=1.10)
    assert row["beats_all"] == 2
    strong = study.settings_vs(an, analyse(_study_rows(pairs, learned_steer=2.5)))
    assert {(r["pair"], r["baseline"]) for r in strong["pairs"]} == {
        (p, b) for p in ("a / b", "c / d") for b in ("prompt", "fewshot", "steer", "steer-learned")}
    for r in strong["pairs"]:
        assert r["setting"] == "learned-contrastive"
        assert r["verdict"] == ("loss" if r["baseline"] == "steer-learned" else "win"), r
    assert strong["beats_all_both"] == {"learned-contrastive": 0} and strong["compared"] == {"learned-contrastive": 2}
    same = study.settings_vs(an, analyse(_study_rows(pairs)))
    assert same["beats_all_both"] == {"learned-contrastive": 2}
    text = study.markdown({"run": "r", "pairs": ["a / b", "c / d"], "verdicts": [], "separation": [],
                           "settings_vs_other_run": {"other": "o", **strong}})
    assert "beats every baseline of both runs on 0/2 pairs" in text


@pytest.mark.slow
def test_sweep_steer_learned_reports_each_step_size_choice(tmp_path):
    """lr 0 leaves the vector at zero (the dense model at every alpha: ratio 1); lr 0.05 moves it."""
    env = {**os.environ, "PERSONA_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCH / "sweep_steer_learned.py"), "--model", "tiny-random-llama",
                           "--val-text", "builtin:general", "--steps", "2", "--lrs", "0.05", "0", "--threads", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    *rows, summary = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [r["lr"] for r in rows] == [0.05, 0.0] and summary["benchmark"] == "sweep_steer_learned"
    moved, still = rows
    assert all(n > 0 for n in moved["norms"].values()) and all(n == 0 for n in still["norms"].values())
    assert all(t[3] == pytest.approx(1.0, abs=1e-6) for t in still["tried"])
    for r in rows:  # the reported choice is one of the settings tried, with its figures
        (t,) = [t for t in r["tried"] if t[:2] == [r["layer"], r["alpha"]]]
        assert t[2:] == pytest.approx([r["val_separation"], r["val_ppl_ratio"]], abs=1e-3)
    assert summary["mean_val_separation"] == {"0.05": round(moved["val_separation"], 4),
                                              "0.0": round(still["val_separation"], 4)}


def test_learned_budget_rejects_an_unknown_knob_before_loading_a_model(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "learned_budget.py"), "--model", "tiny-random-llama",
                           "--skip-free", "--setting", "steps=1,nope=3", "--store", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "nope" in done.stderr and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_learned_budget_knob_sweep_reports_each_setting_and_its_chosen_point(tmp_path):
    """Two settings (lr 0 is the training-free start): each pair's chosen point is the path's point with
    the largest validation separation within the budget, and the per-setting means are those points'."""
    env = {**os.environ, "PERSONA_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCH / "learned_budget.py"), "--model", "tiny-random-llama",
                           "--skip-free", "--grid-steps", "3", "--val-text", "builtin:general", "--threads", "1",
                           "--reference-reps", "1", "--setting", "steps=1,warmup=1",
                           "--setting", "steps=1,warmup=1,lr=0", "--store", str(tmp_path / "store")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout)
    assert list(out["learned"]) == ["steps=1,warmup=1", "steps=1,warmup=1,lr=0"]
    for name, per in out["learned"].items():
        pair = per["introvert/extrovert"]
        assert [p[0] for p in pair["path"]] == out["grid"][:len(pair["path"])]
        within = [p for p in pair["path"] if p[1] <= out["budget"]]
        best = max(within, key=lambda p: p[2])
        assert pair["sparsity"] == best[0] and pair["val_separation"] == pytest.approx(best[2], abs=1e-4)
        assert out["mean_val_separation"][name] == round(pair["val_separation"], 4)


def test_learned_budget_reference_runs_in_chunks_and_leaves_the_weights_frozen(tiny):
    """Logits bounded to one sequence's worth: every sequence its own chunk; grads gone, flags restored."""
    plain = load("learned_budget").plain_forward_backward
    model = tiny.model
    before = [p.requires_grad for p in model.parameters()]
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    seconds = plain(model, seqs, 0, reps=1, max_logits=4 * model.config.vocab_size)
    assert seconds > 0
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())


def test_study_learned_archives_a_run_whose_tables_it_then_reads_back(tmp_path):
    """--archive copies a run's verified parts and its index: the archive gives the same tables as the store.
    A part whose rows were edited after the run indexed them is refused, and nothing of that run is indexed."""
    import pyarrow as pa

    from persona_core.eval.result_parts import write_result_part
    from persona_core.report.results import write_results_index
    from persona_core.store import layout
    from persona_core.store.store import open_store

    study = load("study_learned")
    rows = _study_rows([("a", "b", 1.5, 0.3, 1.05), ("c", "d", 1.5, 0.3, 1.05)])
    src = open_store(str(tmp_path / "store"))
    parts = {}
    for persona in ("a", "b", "c", "d"):
        mine = rows.filter(pa.compute.equal(rows["persona"], persona))
        key = layout.result_part("m-1", persona, "learned-contrastive-b1.1", f"{ord(persona):016x}")
        parts[key] = write_result_part(src, key, mine)
    write_results_index(src, "run-0000000000000001", parts)

    dest = tmp_path / "archive"
    assert study.archive(str(tmp_path / "store"), ["run-0000000000000001"], str(dest)) == 4
    assert study.archive(str(tmp_path / "store"), ["run-0000000000000001"], str(dest)) == 0  # already there
    (dest / next(iter(parts))).write_bytes(b"truncated")  # a damaged copy is copied again
    assert study.archive(str(tmp_path / "store"), ["run-0000000000000001"], str(dest)) == 1
    before = study.tables(str(tmp_path / "store"), ["run-0000000000000001"], None)
    after = study.tables(str(dest), ["run-0000000000000001"], None)
    assert after == before and after["pooled"][0]["pairs"] == 2

    edited = next(iter(parts))
    table = src.read_parquet(edited)
    src.write_parquet(edited, table.set_column(table.schema.get_field_index("value"), "value",
                                               pa.array([0.5] * table.num_rows)).replace_schema_metadata(
        table.schema.metadata))
    with pytest.raises(Exception, match="digest|rows"):
        study.archive(str(tmp_path / "store"), ["run-0000000000000001"], str(tmp_path / "other"))
    assert not (tmp_path / "other" / layout.results_index("run-0000000000000001")).exists()


# ---------------------------------------------------------------------------- benchmarks/budget_precision.py


def test_budget_precision_remeasures_a_stores_budgeted_masks_and_only_those(tiny, tmp_path, capsys):
    """Each budgeted mask of the store is measured on every text and window count; a fixed-sparsity
    mask is not. The ratio on N windows is what the pipeline's own check gives on them, and a mask
    that changes nothing has ratio 1 with no spread."""
    import math

    import torch

    from persona_core.eval.engine import Evaluator
    from persona_core.eval.validation import text_windows, window_perplexity
    from persona_core.masks.codec import write_mask
    from persona_core.store import layout
    from persona_core.store.store import open_store

    bench = load("budget_precision")
    ev = Evaluator(tiny, device="cpu")
    store = open_store(str(tmp_path / "store"))
    g = torch.Generator().manual_seed(1)
    cut = {n: torch.rand(ev.model.get_submodule(n).weight.shape, generator=g) >= 0.4 for n in ev.prunable}
    whole = {n: torch.ones_like(m) for n, m in cut.items()}
    for owner, masks, budget in (("a", cut, "ppl1.1-0000abcd"), ("b", whole, "ppl1.1-0000abcd"), ("c", cut, None)):
        key = layout.mask(ev.model_key, "learned-contrastive@unstructured", 0.4, owner, budget=budget)
        write_mask(store, key, masks, {"persona": owner, "model_key": ev.model_key})

    bench.main(["--model", "tiny-random-llama", "--store", str(tmp_path / "store"), "--windows", "2", "3",
                "--texts", "builtin:general", "--threads", "1"])
    out = json.loads(capsys.readouterr().out)
    rows = {r["mask"].split()[0]: r for r in out["masks"]}
    assert set(rows) == {"a", "b"}  # the fixed-sparsity mask of c is not a budget's
    windows = text_windows(ev.tokenizer, "builtin:general", 128, 3)
    dense = [window_perplexity(ev, windows), *(window_perplexity(ev, [w]) for w in windows)]
    with bench.apply_mask(ev, cut):
        masked = [window_perplexity(ev, windows), *(window_perplexity(ev, [w]) for w in windows)]
    per = torch.tensor([math.log(m / d) for m, d in zip(masked[1:], dense[1:])])
    assert rows["a"]["builtin:general@3"]["ratio"] == pytest.approx(masked[0] / dense[0], abs=1e-4)
    assert rows["a"]["builtin:general@3"]["se_log"] == pytest.approx(float(per.std()) / math.sqrt(3), abs=1e-4)
    assert rows["a"]["builtin:general@3"]["ratio"] != pytest.approx(1.0, abs=1e-3)
    assert rows["b"]["builtin:general@3"] == {"ratio": 1.0, "se_log": 0.0, "windows": 3}
    assert out["summary"]["builtin:general@3"]["max_gap_log_to_most"] == 0.0

    with pytest.raises(SystemExit, match="no budgeted masks"):
        bench.main(["--model", "tiny-random-llama", "--store", str(tmp_path / "store"), "--method", "wanda",
                    "--texts", "builtin:general", "--windows", "2", "--threads", "1"])
