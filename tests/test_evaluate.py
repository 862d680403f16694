"""Mask apply/restore is bit-exact and cheap; evaluate_unit's rows, caching and config."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from persona_core.catalog import load_catalog
from persona_core.eval import scoring, unit
from persona_core.eval.conditions import CONDITIONS, DEFAULT_CONDITIONS
from persona_core.eval.config import EvalConfig
from persona_core.eval.engine import Evaluator
from persona_core.eval.masked import MaskedModel, mask_content_hash
from persona_core.eval.unit import evaluate_unit
from persona_core.models.loading import load_model

SMALL = dict(max_statements=4, max_questions=2, max_new_tokens=6, ppl_window=64, ppl_windows=1)


@pytest.fixture
def model():
    return load_model("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(load_model("tiny-random-llama", device="cpu"))


def random_masks(module, names, keep=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(module.get_submodule(n).weight.shape, generator=g) < keep for n in names}


def bits(model):
    return {k: v.detach().clone().view(torch.int32) for k, v in model.state_dict().items()}


def same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def prunable(model):
    from persona_core.models.layers import linear_groups

    return [n for g in linear_groups(model.model) for n in g.modules]


def test_apply_mask_zeroes_pruned_and_restore_is_bit_exact(model):
    before = bits(model.model)
    masks = random_masks(model.model, prunable(model))
    mm = MaskedModel(model.model)
    mm.apply(masks)
    for name, m in masks.items():
        w = model.model.get_submodule(name).weight
        assert torch.all(w[~m] == 0) and torch.equal(w[m], before[f"{name}.weight"][m].view(torch.float32))
    assert not same_bits(before, bits(model.model))
    mm.restore()
    assert same_bits(before, bits(model.model))
    mm.restore()  # restoring twice is harmless
    assert same_bits(before, bits(model.model))


def test_masked_model_swaps_many_masks_bit_exact(model):
    before = bits(model.model)
    names = prunable(model)
    mm = MaskedModel(model.model)
    for seed in range(3):
        masks = random_masks(model.model, names, keep=0.3 + 0.2 * seed, seed=seed)
        mm.apply(masks)  # applying over an active mask restores first
        w = model.model.get_submodule(names[0]).weight
        assert (w == 0).float().mean().item() == pytest.approx(1 - (0.3 + 0.2 * seed), abs=0.05)
    mm.restore()
    assert same_bits(before, bits(model.model))
    with mm.masked(random_masks(model.model, names[:2])):
        assert not same_bits(before, bits(model.model))
    assert same_bits(before, bits(model.model))


def test_bad_masks_are_rejected_before_anything_changes(model):
    before = bits(model.model)
    names = prunable(model)
    good = random_masks(model.model, names[:1])
    bad = {**good, names[1]: torch.ones(3, 3, dtype=torch.bool), "model.nope": torch.ones(1, dtype=torch.bool)}
    with pytest.raises(ValueError) as err:
        MaskedModel(model.model).apply(bad)
    assert "model.nope" in str(err.value) and "shape" in str(err.value)
    with pytest.raises(ValueError, match="dtype"):
        MaskedModel(model.model).apply({names[0]: torch.ones(good[names[0]].shape)})
    assert same_bits(before, bits(model.model))


def test_mask_content_hash_tracks_bits(model):
    names = prunable(model)
    a = random_masks(model.model, names[:2])
    b = {k: v.clone() for k, v in a.items()}
    assert mask_content_hash(a) == mask_content_hash(b)
    b[names[0]][0, 0] = ~b[names[0]][0, 0]
    assert mask_content_hash(a) != mask_content_hash(b)


def test_config_validation_and_hash():
    cfg = EvalConfig()
    assert set(cfg.conditions) == set(DEFAULT_CONDITIONS) == set(CONDITIONS) - {"dense+steer", "dense+steer-learned",
                                                                                "masked+fewshot"}
    assert EvalConfig(batch_size=3).hash == cfg.hash  # speed knobs do not change results
    assert EvalConfig(max_statements=5).hash != cfg.hash
    with pytest.raises(ValueError, match="condition"):
        EvalConfig(conditions=("sometimes",))
    with pytest.raises(ValueError, match="metric"):
        EvalConfig(metrics=("vibes",))
    with pytest.raises(ValueError, match="judge"):
        EvalConfig(metrics=("judge",))
    with pytest.raises(ValueError, match=r"EvalConfig\.conditions: unknown condition 'masked\+promt' \(did you mean "
                                         r"'masked\+prompt'\?\); available: dense, dense\+prompt"):
        EvalConfig(conditions=("dense", "masked+promt"))


def test_condition_registry():
    from persona_core.eval.conditions import DENSE_CONDITIONS, condition

    assert list(CONDITIONS) == ["dense", "dense+prompt", "dense+fewshot", "dense+steer", "dense+steer-learned",
                                "masked", "masked+prompt", "masked+fewshot"]
    assert DENSE_CONDITIONS == ("dense", "dense+prompt", "dense+fewshot", "dense+steer", "dense+steer-learned")
    assert [c for c in CONDITIONS if CONDITIONS[c].steered] == ["dense+steer", "dense+steer-learned"]
    assert CONDITIONS["masked+fewshot"].masked and CONDITIONS["masked+fewshot"].prompt == "fewshot"
    p = load_catalog("builtin")["introvert"]
    assert CONDITIONS["masked+prompt"].system(p) == p.description and CONDITIONS["dense+fewshot"].system(p) is None
    assert CONDITIONS["dense+fewshot"].fewshot(p, None, 2, 0).examples() and CONDITIONS["dense"].fewshot(p, None, 2, 0) is None
    with pytest.raises(ValueError, match="registered twice"):
        condition("dense", masked=False)
    with pytest.raises(ValueError, match="prompt"):
        condition("dense+shout", masked=False, prompt="loud")
    assert "dense+shout" not in CONDITIONS


def test_evaluate_unit_rows_and_dense_once(evaluator, monkeypatch):
    cat = load_catalog("builtin")
    p, o = cat["introvert"], cat["extrovert"]
    cfg = EvalConfig(**SMALL)
    calls = []
    real = scoring.score_condition
    monkeypatch.setattr(unit, "score_condition", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    keep_all = {n: torch.ones(evaluator.model.get_submodule(n).weight.shape, dtype=torch.bool)
                for n in evaluator.prunable}
    t1 = evaluate_unit(evaluator, p, o, keep_all, {"method": "all", "sparsity": 0.0, "content_hash": "h1"}, cfg)
    half = random_masks(evaluator.model, evaluator.prunable)
    t2 = evaluate_unit(evaluator, p, o, half, {"method": "rand", "sparsity": 0.5}, cfg)
    assert calls == ["dense", "dense+prompt", "dense+fewshot", "masked", "masked+prompt", "masked", "masked+prompt"]
    for t in (t1, t2):
        keys = list(zip(t.column("condition").to_pylist(), t.column("metric").to_pylist()))
        assert len(keys) == len(set(keys)) and {c for c, _ in keys} == set(DEFAULT_CONDITIONS)
        assert {"statement-preference", "yes-no-agreement", "perplexity-ratio", "roleplay-fidelity"} <= {m for _, m in keys}
        assert set(t.column("model").to_pylist()) == {evaluator.model_key}
    assert t1.column("mask_hash")[0].as_py() == "h1"
    assert t2.column("mask_hash")[0].as_py() == mask_content_hash(half)
    r1 = {(c, m): v for c, m, v in zip(*(t1.column(k).to_pylist() for k in ("condition", "metric", "value")))}
    for (c, m), v in r1.items():  # a keep-everything mask scores exactly like the dense model
        if c.startswith("masked"):
            assert v == pytest.approx(r1[(c.replace("masked", "dense"), m)], abs=1e-6), (c, m)
    r2 = {(c, m): v for c, m, v in zip(*(t2.column(k).to_pylist() for k in ("condition", "metric", "value")))}
    assert r2[("masked", "perplexity-ratio")] != pytest.approx(1.0)


def test_units_can_swap_mask_to_mask_without_restoring(evaluator):
    cat = load_catalog("builtin")
    cfg = EvalConfig(conditions=("dense", "masked"), metrics=("perplexity",), **SMALL)
    before = bits(evaluator.model)
    ones = {n: torch.ones(evaluator.model.get_submodule(n).weight.shape, dtype=torch.bool) for n in evaluator.prunable}
    a, b = random_masks(evaluator.model, evaluator.prunable, seed=1), random_masks(evaluator.model, evaluator.prunable[:3], seed=2)
    ta = evaluate_unit(evaluator, cat["optimist"], cat["pessimist"], a, {"method": "a"}, cfg, restore=False)
    assert evaluator.masks.active is not None
    tb = evaluate_unit(evaluator, cat["optimist"], cat["pessimist"], b, {"method": "b"}, cfg, restore=False)
    assert set(evaluator.masks.active) == set(b)  # modules only in `a` went back to dense
    tb2 = evaluate_unit(evaluator, cat["optimist"], cat["pessimist"], b, {"method": "b"}, cfg)
    assert tb.column("value").to_pylist() == tb2.column("value").to_pylist()
    assert same_bits(before, bits(evaluator.model))
    t1 = evaluate_unit(evaluator, cat["introvert"], cat["extrovert"], ones, {"method": "1"}, cfg, restore=False)
    t2 = evaluate_unit(evaluator, cat["pessimist"], cat["optimist"], None, None, cfg)  # dense state restores first
    assert evaluator.masks.active is None and same_bits(before, bits(evaluator.model))
    assert ta.num_rows == t1.num_rows == 4 and t2.num_rows == 2


@pytest.mark.slow
def test_default_model_unit_and_swap_cost():
    """The real default model: answer tokens, a unit, and the swap far cheaper than a batch."""
    import time

    ev = Evaluator("smollm2-135m", device="cpu")
    from persona_core.eval.metrics import answer_token_ids

    assert set(answer_token_ids(ev.tokenizer, "Yes")) >= {ev.tokenizer.encode("Yes")[0], ev.tokenizer.encode(" Yes")[0]}
    cat = load_catalog("builtin")
    masks = {n: torch.rand(ev.model.get_submodule(n).weight.shape) > 0.3 for n in ev.prunable}
    cfg = EvalConfig(conditions=("dense", "masked"), metrics=("statement-preference",), max_statements=4)
    t = evaluate_unit(ev, cat["introvert"], cat["extrovert"], masks, {"method": "rand", "sparsity": 0.3}, cfg)
    assert t.num_rows == 4
    ev.masks.apply(masks)
    ev.masks.restore()  # the snapshot exists now: time the steady state
    t0 = time.perf_counter()
    ev.masks.apply(masks)
    ev.masks.restore()
    swap = time.perf_counter() - t0
    ids = ev.encode("One fairly ordinary sentence about bread, yeast and the ovens of a bakery. " * 3)
    t0 = time.perf_counter()
    ev.continuation_logprobs([(ids[:1], ids[1:])] * ev.batch_size)
    batch = time.perf_counter() - t0
    assert swap < 0.5 * batch  # a loose bound on a shared CPU; the benchmark reports the real fraction


def test_dense_rows_are_reused_across_runs_from_the_store(tmp_path, monkeypatch):
    """A second evaluator (a later run) reads the dense rows back instead of recomputing them, with the
    same numbers; a config that differs only in masked conditions shares them, one that changes a dense
    number does not; a tampered or unreadable entry is recomputed and rewritten, never used."""
    from persona_core.store import layout
    from persona_core.eval.dense_cache import DenseRowCache
    from persona_core.store.store import open_store

    store = open_store(str(tmp_path / "store"))
    cat = load_catalog("builtin")
    p, o = cat["introvert"], cat["extrovert"]
    cfg = EvalConfig(conditions=("dense", "dense+prompt", "masked"), metrics=("statement-preference", "perplexity"),
                     **SMALL)

    def run(config, masks=None):
        ev = Evaluator(load_model("tiny-random-llama", device="cpu"))  # a fresh process: no memory cache
        calls = []
        real = scoring.score_condition
        monkeypatch.setattr(unit, "score_condition", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
        meta = {"method": "rand", "sparsity": 0.5} if masks is not None else None
        table = evaluate_unit(ev, p, o, masks, meta, config, rows_cache=DenseRowCache(store, ev.model_key))
        return table, calls

    def dense_values(t):
        return {(c, m): v for c, m, v in zip(*(t.column(k).to_pylist() for k in ("condition", "metric", "value")))
                if c.startswith("dense")}

    first, calls = run(cfg)
    assert calls == ["dense", "dense+prompt"]
    keys = store.list(layout.DENSE)
    assert len(keys) == 1 and f"/persona={p.id}/" in keys[0]

    ev0 = Evaluator(load_model("tiny-random-llama", device="cpu"))
    masks = random_masks(ev0.model, ev0.prunable)
    again, calls = run(cfg, masks)
    assert calls == ["masked"]  # the dense rows came from the store
    assert dense_values(again) == dense_values(first)
    assert set(again.column("config_hash").to_pylist()) == {cfg.hash}  # rows carry this run's config

    wider = EvalConfig(conditions=("dense", "dense+prompt", "masked", "masked+prompt"),
                       metrics=cfg.metrics, **SMALL)
    assert wider.dense_hash == cfg.dense_hash and wider.hash != cfg.hash
    _, calls = run(wider, masks)
    assert calls == ["masked", "masked+prompt"]

    other = EvalConfig(conditions=cfg.conditions, metrics=cfg.metrics, **{**SMALL, "max_statements": 3})
    assert other.dense_hash != cfg.dense_hash
    _, calls = run(other)
    assert calls == ["dense", "dense+prompt"]
    assert len(store.list(layout.DENSE)) == 2

    # tampered: another persona's rows under this key are refused, recomputed and rewritten
    key = keys[0]
    forged = store.read_parquet(key)
    forged = forged.set_column(forged.schema.get_field_index("persona"), "persona",
                               pa.array(["extrovert"] * forged.num_rows))
    store.write_parquet(key, forged)
    redo, calls = run(cfg)
    assert calls == ["dense", "dense+prompt"] and dense_values(redo) == dense_values(first)
    assert set(store.read_parquet(key).column("persona").to_pylist()) == {p.id}
    store.write_bytes(key, b"not parquet")  # unreadable: recomputed too
    _, calls = run(cfg)
    assert calls == ["dense", "dense+prompt"]


def test_dense_ident_follows_what_steering_reads():
    """dense+steer rows depend on the residual-stream statistics only: other groups (another
    calibration option) leave the key alone, other residual numbers change it."""
    from persona_core.eval.dense_cache import dense_ident
    from persona_core.calib.stats import GroupStats, PersonaStats

    cat = load_catalog("builtin")
    p, o = cat["introvert"], cat["extrovert"]

    def stats(residual: float, extra: float) -> dict:
        def g(v):
            t = torch.full((4,), v, dtype=torch.float64)
            return GroupStats(10, t, t * t, t.abs(), 2, t.abs(), t * t)
        groups = {(0, "residual"): g(residual), (0, "mlp_attr"): g(extra)}
        return {x.id: PersonaStats("m", x.id, x.content_hash, groups, f"calib-{extra}") for x in (p, o)}

    cfg = EvalConfig(conditions=("dense+steer", "masked"), **SMALL)
    base = dense_ident("m", p, o, cfg, stats(1.0, 2.0))
    assert dense_ident("m", p, o, cfg, stats(1.0, 3.0)) == base
    assert dense_ident("m", p, o, cfg, stats(1.5, 2.0)) != base
    assert dense_ident("m", p, o, cfg, stats(1.0, 2.0), "cuda-bfloat16") != base
    no_steer = EvalConfig(conditions=("dense+prompt", "masked"), **SMALL)
    assert dense_ident("m", p, o, no_steer, stats(1.0, 2.0)) == dense_ident("m", p, o, no_steer, stats(1.5, 2.0))


def test_eval_modules_import_only_those_listed_before_them():
    """persona_core/eval/__init__.py lists the package's modules lowest first; each imports only earlier ones
    (every import counts, wherever it stands), and every module is listed."""
    import ast
    import re
    from pathlib import Path

    import persona_core.eval as package

    root = Path(package.__file__).parent
    order = [re.match(r"`(\w+)`", line[2:]).group(1) for line in package.__doc__.splitlines() if line.startswith("* `")]
    assert sorted(order) == sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__")
    for i, mod in enumerate(order):
        for node in ast.walk(ast.parse((root / f"{mod}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("persona_core.eval"):
                parts = node.module.split(".")
                targets = parts[2:3] or [a.name for a in node.names]
                assert all(t in order[:i] for t in targets), f"eval/{mod}.py imports {targets}: not listed before it"
