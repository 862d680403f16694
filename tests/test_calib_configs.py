"""Two calibration configs of one persona in one store (issue 12 item 4): their statistics and masks
coexist under keys that name the config, two pipelines running them at once on the session's Ray
cluster each get exactly what a clean single run gets, and masks keyed before the config was part
of the key are never used in its place."""

from __future__ import annotations

import threading

import pytest

from conftest import tiny_pipeline_config
from persona_jobs import evaluate, pipeline
from persona_jobs.cli import build_parser
from persona_core.run import units
from persona_core.masks.spec import mask_key
from persona_core.calib.stored import list_parts, part_versions
from persona_core.store.store import open_store
from persona_core.run.plan import make_plan
from persona_core.run.execution import Outcome

FIELDS = ("persona", "method", "sparsity", "condition", "metric")


def configs(store: str):
    # Both evaluate with one CPU each so the two runs fit the 2-CPU session cluster side by side.
    opts = {"metrics": ["statement-preference"], "max_statements": 4, "actors": 1, "cpus_per_actor": 1}
    a = tiny_pipeline_config(store, calibrate__options={"max_length": 64}, evaluate__options=opts,
                             resources__calibrate_actors=1)
    b = tiny_pipeline_config(store, calibrate__options={"max_length": 24}, evaluate__options=opts,
                             resources__calibrate_actors=1)
    return a, b


def rows(store, run_id) -> dict:
    t = evaluate.load_results(store, run_id)
    cols = {c: t.column(c).to_pylist() for c in (*FIELDS, "value", "mask_hash")}
    return {tuple(cols[c][i] for c in FIELDS): (cols["value"][i], cols["mask_hash"][i]) for i in range(t.num_rows)}


@pytest.fixture
def one_actor_calibration(monkeypatch):
    """One calibration actor per run: two runs' pools that each wait for the other's CPUs would
    deadlock on 2 CPUs (issue 12 item 6, fixed separately); this test is about keys, not pools."""
    assert all(c.resources.calibrate_actors == 1 for c in configs("s"))  # asked for in configs()


def test_two_calibration_configs_run_concurrently_match_clean_single_runs(ray_cluster, tmp_path, tiny,
                                                                           one_actor_calibration):
    # `tiny`: the model is loaded once here first, as transformers' lazy imports are not safe to
    # race from two threads of one driver (two real runs are two processes).
    shared = str(tmp_path / "shared")
    plan_a, plan_b = (make_plan(c) for c in configs(shared))
    assert plan_a.calib.hash != plan_b.calib.hash and plan_a.run_id != plan_b.run_id

    outcomes: dict[str, Outcome] = {}
    errors: list[BaseException] = []

    def go(name, p):
        try:
            outcomes[name] = pipeline.execute(p)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=go, args=(n, p)) for n, p in (("a", plan_a), ("b", plan_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1500)
    assert not errors, errors
    assert outcomes["a"].ok and outcomes["b"].ok, (outcomes["a"].manifest.error, outcomes["b"].manifest.error)

    store = open_store(shared)
    key = plan_a.inputs.model_key
    # Both configs' statistics are still there: neither run pruned the other's.
    for pid in ("introvert", "extrovert", "general"):
        calibs = {c for k, (_, c) in part_versions(store, key).items() if f"/persona={pid}/" in k}
        assert calibs == {plan_a.calib.hash, plan_b.calib.hash}, pid
    # ... and so are both configs' masks, each under its config.
    for p in (plan_a, plan_b):
        assert store.exists(mask_key(key, "contrastive-wanda", 0.5, "introvert", calib=p.calib.hash))

    # Each run's results equal a clean run of its config alone in an empty store.
    concurrent = {n: rows(store, p.run_id) for n, p in (("a", plan_a), ("b", plan_b))}
    for i, name in enumerate(("a", "b")):
        clean_store = str(tmp_path / f"clean-{name}")
        p = make_plan(configs(clean_store)[i])
        assert p.run_id == (plan_a, plan_b)[i].run_id
        assert pipeline.execute(p).ok
        clean = rows(open_store(clean_store), p.run_id)
        assert clean.keys() == concurrent[name].keys() and clean
        for k, (value, mask_hash) in clean.items():
            got_value, got_hash = concurrent[name][k]
            assert got_hash == mask_hash, k  # the very masks of this config
            assert got_value == pytest.approx(value, rel=1e-6, abs=1e-9), k
    masked = lambda r: {k[:2]: v[1] for k, v in r.items() if k[2] > 0}  # noqa: E731
    assert masked(concurrent["a"]) != masked(concurrent["b"])  # the configs do give different masks


def test_masks_keyed_without_a_config_are_not_used_for_one(tmp_path, builtin_catalog):
    """An old store's masks (keys without calib=) are not evaluated for a config: they are rebuilt."""
    from persona_jobs.cli import UserError

    store = open_store(str(tmp_path / "st"))
    key = "tiny-random-llama-x"
    old = mask_key(key, "contrastive-wanda", 0.5, "introvert")
    new = mask_key(key, "contrastive-wanda", 0.5, "introvert", calib="c1")
    other = mask_key(key, "contrastive-wanda", 0.5, "introvert", calib="c2")
    shared = mask_key(key, "magnitude", 0.5, "introvert", calib="c1")  # reads no statistics: no config
    assert "/calib=" not in old and "/calib=c1/" in new and "/calib=" not in shared
    for k in (old, new, other, shared):
        store.write_bytes(k, b"x")
    refs = units.list_masks(store, key)
    assert {r.key for r in units.of_calibration(refs, "c1")} == {new, shared}
    with pytest.raises(UserError, match="2 calibration configs"):
        units.of_calibration(refs, None)
    assert list_parts(store, key) == []


def test_a_pinned_revision_reaches_every_stage(monkeypatch, tmp_path):
    """`revision:` was in the run id only; every stage keyed and loaded the default revision."""
    from persona_core.models import loading as models
    from persona_core.run.config import PipelineConfig, from_dict

    asked = []

    def fake_resolve(spec, revision):
        asked.append((spec, revision))
        return str(tmp_path), f"hub:{spec}@{revision or 'main'}"

    monkeypatch.setattr(models, "_resolve_hf", fake_resolve)
    assert models.model_key("org/m@r1") == models.model_key("org/m", revision="r1") != models.model_key("org/m")
    assert asked[:2] == [("org/m", "r1"), ("org/m", "r1")]
    with pytest.raises(ValueError, match="hub models only"):
        models.model_key("tiny-random-llama@r1")
    with pytest.raises(ValueError, match="'r1' in the spec and 'r2' given"):
        models.split_revision("org/m@r1", "r2")

    cfg = from_dict(PipelineConfig, {"model": "org/m", "revision": "r1", "store": str(tmp_path / "st"),
                                     "masks": {"methods": ["wanda"], "sparsities": [0.5]}})
    p = make_plan(cfg)
    assert p.model == "org/m@r1" and models.model_key(p.model) == p.inputs.model_key
    # every stage takes only the plan (persona_jobs.stages): each keys and loads the plan's model, revision included
    assert p.model_key == models.model_key("org/m", revision="r1")


def test_a_mask_of_another_persona_version_or_config_is_refused(ray_cluster, tmp_path, tiny, builtin_catalog):
    """Keys cannot hold every persona version at once; the mask's provenance is checked when read."""
    import torch

    from persona_core.masks.codec import write_mask
    from persona_core.models.layers import linear_groups

    store = open_store(str(tmp_path / "st"))
    intro, extro = builtin_catalog["introvert"], builtin_catalog["extrovert"]
    masks = {n: torch.ones(tiny.model.get_submodule(n).weight.shape, dtype=torch.bool)
             for grp in linear_groups(tiny.model) for n in grp.modules}
    good = {"introvert": {"persona_hash": intro.content_hash, "calib_hash": "c1"},
            "extrovert": {"persona_hash": extro.content_hash, "calib_hash": "c1"}}
    edited = {**good, "extrovert": {"persona_hash": "an-older-version", "calib_hash": "c1"}}
    write_mask(store, mask_key(tiny.key, "contrastive-wanda", 0.5, "introvert", calib="c1"), masks,
               {"stats_versions": good})
    write_mask(store, mask_key(tiny.key, "contrastive-wanda", 0.5, "extrovert", calib="c1"), masks,
               {"stats_versions": edited})
    s = evaluate.run(evaluate.plan_from_args(build_parser().parse_args([
        "evaluate", "--store", store.url, "--model", "tiny-random-llama", "--personas", "introvert,extrovert",
        "--conditions", "masked", "--metrics", "statement-preference", "--run-id", "r", "--actors", "1",
        "--cpus-per-actor", "1", "--calib-hash", "c1"])))
    assert (s.done, s.failed) == (1, 1), s.errors
    assert "another version of persona 'extrovert'" in s.errors[0]
    task = evaluate.EvaluationTask(intro, extro)
    with pytest.raises(evaluate.StaleMask, match="calibration config c1, not c2"):
        evaluate.check_provenance("k", {"stats_versions": good}, task, "c2")
