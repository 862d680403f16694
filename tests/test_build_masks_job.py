"""The Ray reducer: one task per persona/pair, each mask written once, reruns write nothing."""

from __future__ import annotations

import pytest
import torch

from persona_core.run.plan import Selection, make_plan
from persona_jobs import build_masks as job
from persona_jobs.cli import UserError, build_parser
from persona_jobs.flags import load
from persona_core.store.layout import parse_mask
from persona_core.run.units import list_masks, mask_specs
from persona_core.catalog import REFERENCE_PERSONA_ID, reference_persona
from persona_core.masks.codec import read_mask
from persona_core.masks.build import build_pair_masks
from persona_core.masks.inputs import LinearWeights
from persona_core.masks.spec import MaskSpec, spec_key
from persona_core.calib.parts import write_stats
from persona_core.calib.stats import PersonaStats, Shard
from persona_core.calib.stored import list_parts, read_persona_stats
from persona_core.store.store import open_store
from tests.test_masks import random_stats

PAIR = ("introvert", "extrovert")


def plan_of(store, *flags: str):
    """The plan `persona-jobs build-masks` makes of these flags."""
    url = store.url if hasattr(store, "url") else str(store)
    return job.plan_from_args(build_parser().parse_args(["build-masks", "--model", "tiny-random-llama",
                                                         "--store", url, *flags]))


def put_stats(store, tiny, persona, seed: int, calib_hash: str = "c1", shard: Shard = Shard()) -> None:
    groups = random_stats(LinearWeights.from_model(tiny).groups, seed)
    write_stats(store, PersonaStats(tiny.key, persona.id, persona.content_hash, groups, calib_hash), shard)


@pytest.fixture
def store(tmp_path, tiny, builtin_catalog):
    store = open_store(str(tmp_path / "store"))
    for seed, pid in enumerate(PAIR):
        put_stats(store, tiny, builtin_catalog[pid], seed)
    put_stats(store, tiny, reference_persona(), 99)
    return store


def mask_files(store) -> dict[str, int]:
    import os

    return {k: os.stat(store.path(k)).st_mtime_ns for k in store.list("masks", suffix=".safetensors")}


def test_reducer_writes_each_mask_once_and_rerun_writes_nothing(ray_cluster, store, tiny, builtin_catalog):
    methods = ["wanda", "contrastive-wanda", "wanda-general", "persona-vs-general"]
    flags = ["--methods", *methods, "--sparsity", "0.5", "--personas", *PAIR, "--catalog", "builtin"]
    summary = job.run(plan_of(store, *flags, "--granularities", "unstructured,2:4", "--delta"))
    # per granularity: wanda 2 + contrastive pair 2 + wanda-general 1 (shared) + persona-vs-general 2
    assert summary.ok, summary.errors
    assert summary.done == 14 and summary.skipped == 0
    files = mask_files(store)
    assert len(files) == 14

    # what the tasks wrote equals what the library builds in-process
    stats = {pid: read_persona_stats(store, tiny.key, pid) for pid in (*PAIR, REFERENCE_PERSONA_ID)}
    spec = MaskSpec("contrastive-wanda", 0.5)
    plus, minus = build_pair_masks(tiny, stats["introvert"], stats["extrovert"], spec=spec)
    for pid, expected in (("introvert", plus), ("extrovert", minus)):
        got, meta = read_mask(store, spec_key(tiny.key, spec, pid, "c1"))  # the key names the calib config
        assert meta["persona"] == pid and meta["roles"] == {"persona": "introvert", "opposite": "extrovert"}
        assert set(meta["stats"]) == set(PAIR) and meta["model_key"] == tiny.key
        assert all(torch.equal(got[n], expected[n]) for n in expected)

    again = job.run(plan_of(store, *flags, "--granularities", "unstructured,2:4", "--delta"))
    assert (again.done, again.skipped, again.failed) == (0, 14, 0)
    assert mask_files(store) == files

    # new statistics for one persona (here: resharded) rebuild exactly the masks that use them
    for key in list_parts(store, tiny.key, "extrovert"):
        store.delete(key)
    put_stats(store, tiny, builtin_catalog["extrovert"], 7, shard=Shard(0, 1, 5))
    third = job.run(plan_of(store, *flags))
    assert (third.done, third.skipped) == (4, 3)  # wanda(extrovert), both contrastive sides, pvg(extrovert)


def test_clear_errors_before_work(store, builtin_catalog):
    with pytest.raises(UserError, match="unknown method 'nope'"):
        plan_of(store, "--method", "nope")
    with pytest.raises(UserError, match=r"sparsities in \(0, 1\)"):
        plan_of(store, "--sparsity", "1.5")
    with pytest.raises(UserError, match="calibrate"):
        job.run(plan_of(store, "--personas", "optimist", "--catalog", "builtin"))
    with pytest.raises(UserError, match="need --catalog"):
        job.run(plan_of(store, "--method", "contrastive-wanda"))
    with pytest.raises(UserError, match="unknown persona"):
        job.run(plan_of(store, "--personas", "nobody", "--catalog", "builtin"))
    assert job.plan_units(plan_of(store))[0], "without --catalog: every persona with statistics"


def test_cli_parses_and_params():
    args = build_parser().parse_args(["build-masks", "--store", "s", "--method", "contrastive-wanda",
                                      "--sparsity", "0.3", "--granularity", "2:4", "--personas", "a", "b",
                                      "--param", "contrastive-wanda.f=softplus", "--param", "contrastive-wanda.tau=0.5"])
    assert args.methods == ["contrastive-wanda"] and args.sparsities == [0.3] and args.personas == ["a", "b"]
    assert job.parse_params(args.param) == {"contrastive-wanda": {"f": "softplus", "tau": 0.5}}
    with pytest.raises(UserError):
        job.parse_params(["bad"])


def test_make_specs_nm_fixes_sparsity():
    specs = mask_specs(["wanda"], [0.3, 0.5], ["unstructured", "2:4", "4:8"])
    assert sorted((s.granularity, s.sparsity) for s in specs) == [
        ("2:4", 0.5), ("4:8", 0.5), ("unstructured", 0.3), ("unstructured", 0.5)]


def test_allocations_make_specs_cli_and_keys(tmp_path):
    specs = mask_specs(["wanda"], [0.5], ["unstructured", "2:4"], allocations=["uniform", "owl"])
    assert sorted((s.granularity, s.allocation) for s in specs) == [
        ("2:4", "uniform"), ("unstructured", "owl"), ("unstructured", "uniform")]
    args = build_parser().parse_args(["build-masks", "--method", "wanda", "--allocation", "owl"])
    assert args.allocations == ["owl"]
    with pytest.raises(UserError, match="allocations among"):
        load(None, {"masks.allocations": ["tilted"]})
    ref = parse_mask("masks/model=m/method=wanda@ffn-channels~owl+1a2b3c4d/sparsity=0.5/p.safetensors")
    assert (ref.method, ref.base, ref.sparsity, ref.owner) == ("wanda@ffn-channels~owl+1a2b3c4d", "wanda", 0.5, "p")
    assert (ref.granularity, ref.allocation) == ("ffn-channels", "owl")
    plain = parse_mask("masks/model=m/method=wanda~owl/sparsity=0.5/p.safetensors")
    assert (plain.granularity, plain.allocation) == ("unstructured", "owl")


def test_owl_masks_through_the_reducer(ray_cluster, store, tiny, builtin_catalog):
    summary = job.run(plan_of(store, "--methods", "wanda,contrastive-penalty", "--sparsity", "0.5", "--personas",
                              *PAIR, "--catalog", "builtin", "--allocation", "owl"))
    assert summary.ok and summary.done == 4, summary.errors
    assert {r.method for r in list_masks(store, tiny.key)} == {"wanda~owl", "contrastive-penalty~owl"}
    spec = MaskSpec("contrastive-penalty", 0.5, allocation="owl")
    got, meta = read_mask(store, spec_key(tiny.key, spec, "introvert", "c1"))
    assert meta["allocation"] == "owl" and len(meta["layer_sparsity"]) == 2
    assert sum(meta["layer_sparsity"]) / 2 == pytest.approx(0.5)


def test_budgeted_masks_through_the_reducer(ray_cluster, tmp_path, tiny, builtin_catalog):
    """A budget searches each pair's setting on a loaded model; the key names the budget, the metadata the choice."""
    from persona_core.masks.budget import Budget
    from persona_core.calib.config import CalibConfig
    from persona_core.calib.recorder import calibrate_persona

    store = open_store(str(tmp_path / "store"))
    cc = CalibConfig(max_length=64)
    for p in (builtin_catalog["introvert"], builtin_catalog["extrovert"], reference_persona()):
        write_stats(store, calibrate_persona(tiny, p, cc)[0], calib_config=cc.to_dict())
    text = tmp_path / "valid.txt"
    text.write_text(" ".join(f"the {w} of a river is long and the sea" for w in range(300)))
    budget = {"perplexity_ratio": 1.3, "steps": 4, "ppl_windows": 2, "ppl_window": 32, "ppl_text": str(text),
              "strengths": {"lam": [4.0]}}
    overrides = {"model": "tiny-random-llama", "store": store.url, "masks.methods": ["contrastive-penalty"],
                 "masks.baselines": [], "masks.budget": budget, "evaluate.enabled": False}
    plan = make_plan(load(None, overrides), Selection(personas=PAIR))  # a budget mapping: what a config file gives
    summary = job.run(plan)
    assert summary.ok, summary.errors
    assert summary.done == 2
    spec = MaskSpec("contrastive-penalty", 0.0, budget=Budget(**budget))
    key = spec_key(tiny.key, spec, "introvert", cc.hash)
    assert "/budget=ppl1.3-" in key and "sparsity=" not in key
    masks, meta = read_mask(store, key)
    search = meta["budget_search"]["search"]
    assert meta["spec_hash"] == spec.hash and meta["budget"]["perplexity_ratio"] == 1.3
    assert meta["sparsity"] == search["chosen"]["sparsity"] and meta["params"]["lam"] == 4.0
    assert search["within_budget"] is (search["chosen"]["perplexity_ratio"] <= 1.3)
    assert search["points"] and all(p["perplexity_ratio"] is not None for p in search["points"])
    pruned = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(pruned - meta["sparsity"]) < 0.02
    # incremental: a rerun finds both masks current
    again = job.run(plan)
    assert again.done == 0 and again.skipped == 2
