"""`persona-jobs export`: a stored mask as a model folder plain transformers loads, computing what the
evaluator's masked model computes; smaller where structured; a card with measurements; published whole
(local folder or S3) and verified against its manifest (a truncated export is not current)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from persona_core.api import read_mask
from persona_core.catalog import load_catalog
from persona_core.eval.config import EvalConfig
from persona_core.eval.engine import Evaluator
from persona_core.eval.unit import evaluate_unit
from persona_core.masks.build import build_masks
from persona_core.masks.codec import write_mask
from persona_core.masks.export import ExportError, export_is_current, verify_export
from persona_core.masks.spec import MaskSpec
from persona_core.models.loading import load_model
from persona_core.run import runs
from persona_core.store import layout
from persona_core.store.store import open_store
from persona_jobs.cli import main

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[12, 99, 3, 42, 7, 200, 31]])
WHERE = ["--store", None, "--model", "tiny-random-llama", "--catalog", "builtin"]


@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, loaded):
    """A store with an unstructured and an ffn-channels mask of introvert, and extrovert's unstructured one."""
    root = tmp_path_factory.mktemp("export") / "store"
    store = open_store(str(root))
    for owner, spec in (("introvert", MaskSpec("magnitude", 0.5)), ("extrovert", MaskSpec("magnitude", 0.4)),
                        ("introvert", MaskSpec("magnitude", 0.25, "ffn-channels"))):
        seg = layout.method_segment("wanda", spec.granularity)
        key = layout.mask(loaded.key, seg, 0.5, owner)
        masks = build_masks(loaded, spec=spec)
        write_mask(store, key, masks, {"method": "wanda", "params": {"demo": 1}, **{k: v for k, v in spec.to_dict().items()
                                                                                      if k != "params"}})
    return root


def where(store_dir) -> list[str]:
    return [str(store_dir) if w is None else w for w in WHERE]


def masked_logits(loaded, key: str, store_dir) -> torch.Tensor:
    """What the evaluator's masked model computes under this stored mask."""
    ev = Evaluator(loaded, device="cpu")
    mask = read_mask(open_store(str(store_dir)), key)
    with ev.masked(mask.masks), torch.no_grad():
        return ev.model(IDS).logits


def mask_key(store_dir, gran: str = "unstructured", owner: str = "introvert") -> str:
    store = open_store(str(store_dir))
    refs = [layout.parse_mask(k) for k in store.list("masks/", suffix=".safetensors")]
    return next(r.key for r in refs if r.owner == owner and r.granularity == gran)


def test_export_loads_in_plain_transformers_and_equals_the_masked_model(loaded, store_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "introvert-model"
    assert main(["export", *where(store_dir), "--persona", "introvert", "--mask-key", mask_key(store_dir),
                 str(out)]) == 0
    assert "exported introvert" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, masked_logits(loaded, mask_key(store_dir), store_dir), rtol=0, atol=1e-6)
    manifest = verify_export(str(out))
    assert manifest["mask_digest"] == read_mask(open_store(str(store_dir)), mask_key(store_dir)).digest
    assert not manifest["smaller"] and {"model.safetensors", "README.md", "config.json"} <= set(manifest["files"])
    card = (out / "README.md").read_text()
    for words in ("tiny-random-llama", loaded.key, "`wanda`", "`demo=1`", manifest["mask_digest"], "not evaluated",
                  "| weights | float32 |"):
        assert words in card, words
    assert not list(tmp_path.glob(".introvert-model.tmp-*"))  # nothing left behind


def test_ffn_channel_mask_exports_smaller_with_the_same_logits(loaded, store_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    key = mask_key(store_dir, "ffn-channels")
    out = tmp_path / "small"
    assert main(["export", *where(store_dir), "--persona", "introvert", "--mask-key", key, str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.intermediate_size == 96 < loaded.model.config.intermediate_size
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, masked_logits(loaded, key, store_dir), rtol=1e-5, atol=1e-5)
    assert "smaller: intermediate_size 128 -> 96" in (out / "README.md").read_text()


def test_several_masks_fit_until_one_is_named(store_dir, tmp_path, capsys):
    assert main(["export", *where(store_dir), "--persona", "introvert", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "2 masks fit persona 'introvert'" in err and "--mask-key masks/model=" in err
    assert not (tmp_path / "x").exists()


def test_existing_folder_needs_force_and_the_same_export_is_current(store_dir, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["export", *where(store_dir), "--persona", "extrovert", str(out)]
    assert main(args) == 0
    first = json.loads((out / "export.json").read_text())
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().out  # verified, left alone
    assert json.loads((out / "export.json").read_text()) == first
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", *where(store_dir), "--persona", "extrovert", str(other)]) == 2
    assert (other / "keep.txt").read_text() == "mine"
    assert main(["export", *where(store_dir), "--persona", "extrovert", "--force", str(other)]) == 0
    assert not (other / "keep.txt").exists() and verify_export(str(other))


def test_truncated_or_edited_export_fails_verification(store_dir, tmp_path):
    out = tmp_path / "m"
    assert main(["export", *where(store_dir), "--persona", "extrovert", str(out)]) == 0
    assert export_is_current(str(out))
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ExportError, match="truncated"):
        verify_export(str(out))
    assert not export_is_current(str(out))
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(ExportError, match="sha256"):
        verify_export(str(out))
    (out / "export.json").unlink()  # an unfinished export: no manifest
    with pytest.raises(ExportError, match="no export there"):
        verify_export(str(out))


def test_export_to_s3(store_dir, s3_url):
    from transformers import AutoModelForCausalLM

    dest = s3_url + "/exports/extrovert"
    assert main(["export", *where(store_dir), "--persona", "extrovert", dest]) == 0
    manifest = verify_export(dest)
    s3 = open_store(dest)
    assert set(manifest["files"]) | {"export.json"} == set(s3.list())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # what a colleague does with it: download, load
        for name in s3.list():
            (Path(tmp) / name).write_bytes(s3.read_bytes(name))
        assert AutoModelForCausalLM.from_pretrained(tmp) is not None


def test_model_card_reports_the_measured_separation_and_perplexity(loaded, store_dir, tmp_path):
    """Results of a run that scored these very masks (matched by digest) end up on the card."""
    store = open_store(str(store_dir))
    catalog = load_catalog("builtin")
    config = EvalConfig(conditions=("dense", "masked"), metrics=("statement-preference", "perplexity"),
                        max_statements=4, ppl_windows=1)
    ev = Evaluator(loaded, device="cpu")
    for pid in ("introvert", "extrovert"):
        p, o = catalog[pid], catalog[catalog[pid].opposite]
        ref = layout.parse_mask(mask_key(store_dir, owner=pid))
        f = read_mask(store, ref)
        meta = {**f.metadata, "content_hash": f.digest, "method": ref.method, "sparsity": ref.sparsity}
        table = evaluate_unit(ev, p, o, f.masks, meta, config)
        # a run's own parts folder: read by load_results in every store layout (no index needed)
        store.write_parquet(f"{layout.results_prefix('run-card')}/part-{pid}-wanda-0123456789.parquet", table)
    runs.mark_stage(store, "run-card", "evaluate", {"done": 2})  # the run that wrote them (no manifest yet)
    out = tmp_path / "card"
    assert main(["export", *where(store_dir), "--persona", "introvert", "--mask-key", mask_key(store_dir),
                 str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "run `run-card`" in card and ("introvert / extrovert" in card or "extrovert / introvert" in card)
    assert re.search(r"\| separation of \S+ / \S+ \| -?\d\.\d{3} \(95% CI -?\d\.\d{3} to -?\d\.\d{3}\) \|", card), card
    assert re.search(r"\| perplexity ratio \(general text\) \| \d+\.\d{3}", card), card
    assert json.loads((out / "export.json").read_text())["measured_in"] == "run-card"


def test_readme_export_example_runs(store_dir, tmp_path, monkeypatch, capsys):
    """README.md's export -> load in transformers -> generate, on tiny-random-llama."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", *where(store_dir), "--persona", "extrovert", "./introvert-model"]) == 0
    for doc in ("README.md", "docs/using-masks.md"):
        body = re.findall(r"^```python exported\n(.*?)^```$", (ROOT / doc).read_text(), re.M | re.S)
        assert len(body) == 1, doc
        scope: dict = {"__name__": "__doc__"}
        exec(compile(body[0], doc, "exec"), scope)
        assert isinstance(scope["answer"], str)


def test_a_truncated_learned_export_is_not_current_and_is_exported_again(tmp_path, tiny):
    """Issue 24 item 9: `learn-masks --export` counted a truncated exported model as current."""
    from dataclasses import replace

    from persona_core.learn.task import is_current, run_task
    from persona_core.masks.export import verify_export
    from test_learn_masks_job import _store, _task

    persona = load_catalog("builtin")["introvert"]
    store = _store(tmp_path, tiny, persona)
    task = replace(_task(store, tiny, persona), export=True)
    assert run_task(tiny, store, task)["status"] == "done"
    prefix = layout.export_prefix(task.mask_key)
    assert verify_export(store, prefix)["identity"] == task.identity and is_current(store, task)
    assert run_task(tiny, store, task)["status"] == "current"
    key = f"{prefix}/model.safetensors"
    data = store.read_bytes(key)
    store.write_bytes(key, data[: len(data) - 100])  # truncated
    assert not is_current(store, task)
    out = run_task(tiny, store, task)  # the mask is current: only the export is written again
    assert out["status"] == "done" and out.get("exported_only")
    assert store.read_bytes(key) == data and is_current(store, task)


@pytest.mark.parametrize("granularity", ["2:4", "unstructured"])
def test_budgeted_and_semi_structured_masks_export_too(loaded, tmp_path, granularity):
    from transformers import AutoModelForCausalLM

    store_root = tmp_path / "store"
    store = open_store(str(store_root))
    key = layout.mask(loaded.key, layout.method_segment("contrastive-penalty", granularity), float("nan"), "formal",
                      budget="ppl1.1")
    masks = build_masks(loaded, spec=MaskSpec("magnitude", 0.5, granularity))
    write_mask(store, key, masks, {"method": "contrastive-penalty", "budget": {"perplexity_ratio": 1.1},
                                   "budget_search": {"search": {"chosen": {"sparsity": 0.5, "strength": 4.0}}}})
    out = tmp_path / "formal"
    assert main(["export", *where(store_root), "--persona", "formal", "--budget", "1.1", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, masked_logits(loaded, key, store_root), rtol=0, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "budget ppl1.1; the budget search chose sparsity 0.5" in card and f"granularity `{granularity}`" in card


def test_export_in_bfloat16_is_half_the_size(store_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    full, half = tmp_path / "f32", tmp_path / "bf16"
    for out, dtype in ((full, "float32"), (half, "bfloat16")):
        assert main(["export", *where(store_dir), "--persona", "extrovert", "--dtype", dtype, str(out)]) == 0
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.55 * size(full)
    assert AutoModelForCausalLM.from_pretrained(half).dtype == torch.bfloat16
    assert "| weights | bfloat16 |" in (half / "README.md").read_text()
    assert main(["export", *where(store_dir), "--persona", "extrovert", "--dtype", "bfloat16", str(full)]) == 2
    # another dtype is another export: not "current", and the float32 one is replaced only with --force
