"""learn-masks: learned masks in the store (resume from a checkpoint, skip what is current) and the Ray job."""

from __future__ import annotations

import pytest
import torch

from persona_core.calib.config import CalibConfig
from persona_core.calib.recorder import calibrate_persona
from persona_core.catalog import load_catalog
from persona_core.learn.config import DataConfig, LearnConfig
from persona_core.learn.learner import LearnerState
from persona_core.learn.task import LearnTask, checkpoint_key, is_current, run_task
from persona_core.masks.codec import read_mask
from persona_core.calib.parts import write_stats
from persona_core.store.store import open_store
from persona_core.run.units import list_masks, of_calibration, stats_fingerprints

CFG = LearnConfig(steps=4, batch_size=2, general_windows=2, general_batch=1, max_length=96, checkpoint_every=2)
DATA = DataConfig(examples=3, max_new_tokens=6)
FLAGS = ["--steps", "4", "--batch-size", "2", "--general-windows", "2", "--general-batch", "1", "--max-length", "96",
         "--checkpoint-every", "2", "--examples", "3", "--answer-tokens", "6"]  # CFG and DATA, as flags


def learn_plan(store_url: str, *flags: str):
    """The plan `persona-jobs learn-masks` makes of these flags (introvert, the tiny model, CFG and DATA)."""
    from persona_jobs.cli import build_parser
    from persona_jobs.learn_masks import plan_from_args

    argv = ["learn-masks", "--store", store_url, "--model", "tiny-random-llama", "--personas", "introvert", *FLAGS]
    plan = plan_from_args(build_parser().parse_args([*argv, *flags]))
    assert plan.learn == CFG and plan.learn_data == DATA
    return plan


@pytest.fixture(scope="module")
def persona():
    return load_catalog("builtin")["introvert"]


def _store(tmp_path, tiny, persona):
    store = open_store(str(tmp_path / "store"))
    stats, generated = calibrate_persona(tiny, persona, CalibConfig(max_length=64))
    write_stats(store, stats, generated=generated, calib_config=CalibConfig(max_length=64).to_dict())
    return store


def _task(store, tiny, persona, **changes):
    prints = stats_fingerprints(store, tiny.key)
    return LearnTask(persona, CFG if not changes else LearnConfig(**{**CFG.__dict__, **changes}), DATA,
                     ("Held-out question?",), tiny.key, ((persona.id, prints[persona.id]),),
                     calib_hash=CalibConfig(max_length=64).hash)


def test_a_killed_task_resumes_from_its_stored_checkpoint(tmp_path, tiny, persona):
    store = _store(tmp_path, tiny, persona)
    task = _task(store, tiny, persona)

    class Killed(Exception):
        pass

    def die_at_2(state: LearnerState) -> None:
        if state.step == 2:
            raise Killed

    with pytest.raises(Killed):
        run_task(tiny, store, task, on_step=die_at_2)
    assert store.exists(checkpoint_key(tiny.key, persona.id, task.identity))
    assert not is_current(store, task)
    out = run_task(tiny, store, task)
    assert out["status"] == "done" and out["resumed_from"] == 2
    assert not store.exists(checkpoint_key(tiny.key, persona.id, task.identity))
    resumed, meta = read_mask(store, task.mask_key)
    assert meta["identity"] == task.identity and meta["granularity"] == "ffn-channels"
    assert meta["data_key"].startswith(f"learned/model={tiny.key}/persona=introvert/data-")

    other = _store(tmp_path / "b", tiny, persona)  # one uninterrupted run: the same mask, bit for bit
    run_task(tiny, other, _task(other, tiny, persona))
    straight, _ = read_mask(other, task.mask_key)
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)

    assert run_task(tiny, store, task)["status"] == "current"  # a rerun skips it


def test_training_data_is_stored_once_and_shared(tmp_path, tiny, persona):
    store = _store(tmp_path, tiny, persona)
    a = _task(store, tiny, persona)
    b = _task(store, tiny, persona, objective="prompt-free", sparsity=0.5)
    run_task(tiny, store, a)
    run_task(tiny, store, b)
    data = store.list(f"learned/model={tiny.key}/persona=introvert/", suffix=".json")
    assert len(data) == 1
    doc = store.read_json(data[0])
    assert len(doc["samples"]) == 3 and all(s["question"] != "Held-out question?" for s in doc["samples"])
    assert a.mask_key != b.mask_key and "method=learned-prompt-free@ffn-channels" in b.mask_key
    assert f"/calib={CalibConfig(max_length=64).hash}/" in a.mask_key


def test_learn_masks_job(ray_cluster, tmp_path, tiny, persona):
    from persona_jobs import learn_masks

    store = _store(tmp_path, tiny, persona)
    plan = learn_plan(store.url, "--objectives", "with-prompt,prompt-free", "--sparsities", "0.25")
    first = learn_masks.run(plan)
    assert first.ok and first.done == 2, first.errors
    again = learn_masks.run(plan)
    assert again.done == 0 and again.skipped == 2
    refs = of_calibration(list_masks(store, tiny.key), CalibConfig(max_length=64).hash)
    assert {(r.base, r.granularity, r.owner) for r in refs} == {
        ("learned-with-prompt", "ffn-channels", "introvert"), ("learned-prompt-free", "ffn-channels", "introvert")}


def test_a_dead_actor_task_resumes_on_a_fresh_actor(ray_cluster, tmp_path, tiny, persona, monkeypatch):
    from persona_core.masks.codec import read_mask_metadata
    from persona_jobs import learn_masks

    store = _store(tmp_path, tiny, persona)
    monkeypatch.setenv(learn_masks.DIE_AT_ENV, f"introvert:2:{tmp_path / 'markers'}")
    plan = learn_plan(store.url)
    out = learn_masks.run(plan)
    assert out.ok and out.done == 1, out.errors
    assert list((tmp_path / "markers").iterdir())  # the actor really died once
    (task,), problems = learn_masks.learn_tasks(plan, plan.catalog.select(["introvert"]),
                                                CalibConfig(max_length=64).hash)
    meta = read_mask_metadata(store, task.mask_key)
    assert not problems and meta["identity"] == task.identity and meta["resumed_from"] == 2 and meta["steps_run"] == 2


def test_learn_masks_needs_statistics(ray_cluster, tmp_path):
    from persona_jobs.cli import UserError
    from persona_jobs import learn_masks

    with pytest.raises(UserError, match="calibrate"):
        learn_masks.run(learn_plan(str(tmp_path / "empty")))


def test_masks_learned_config_section():
    from persona_core.run.config import ConfigError, PipelineConfig, parse_config

    cfg = parse_config("masks:\n  learned:\n    enabled: true\n    objectives: [with-prompt, prompt-free]\n"
                       "    knobs: {steps: 3, lr: 0.2}\n    data: {examples: 2}\n")
    assert cfg.masks.learned.methods() == ["learned-with-prompt", "learned-prompt-free"]
    assert "learned" in cfg.work_dict()["masks"]
    assert "learned" not in PipelineConfig().work_dict()["masks"]  # off: older run ids stay
    for bad, why in (("objectives: [sideways]", "unknown objective 'sideways'"),
                     ("knobs: {stepz: 3}", "did you mean 'steps'"),
                     ("knobs: {sparsity: 0.5}", "sparsities instead"),
                     ("knobs: {temperature: 0}", "temperature"),
                     ("data: {examples: 0}", "examples")):
        with pytest.raises(ConfigError, match=why):
            parse_config(f"masks:\n  learned:\n    {bad}\n")


def test_the_pipeline_masks_stage_learns(ray_cluster, tmp_path, tiny):
    from persona_core.run.plan import make_plan
    from persona_jobs import learn_masks
    from tests.conftest import tiny_pipeline_config

    store_url = str(tmp_path / "store")
    cfg = tiny_pipeline_config(store_url, masks__learned={
        "enabled": True, "sparsities": [0.25], "knobs": {"steps": 2, "batch_size": 2, "general_windows": 2,
                                                           "general_batch": 1, "max_length": 96},
        "data": {"examples": 2, "max_new_tokens": 4}})
    p = make_plan(cfg)
    store = open_store(store_url)
    for pid in p.persona_ids:
        stats, generated = calibrate_persona(tiny, p.catalog[pid], p.calib)
        write_stats(store, stats, generated=generated, calib_config=p.calib.to_dict())
    out = learn_masks.run(p)
    assert out.ok and out.done == len(p.persona_ids), out.errors
    keys = [k for k in store.list(f"masks/model={tiny.key}/calib={p.calib.hash}/", suffix=".safetensors")
            if "/method=learned-with-prompt@ffn-channels+" in k]  # non-default knobs: a +<hash> suffix
    assert len(keys) == len(p.persona_ids)
