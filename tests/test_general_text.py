"""One resolver for general text (issue 27 item 4): every spec kind, no silent fallback, load-time errors,
and the record (spec, source, SHA-256) a run keeps of the text it measured on."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from persona_core.calib import general_text as gt
from persona_core.calib.general_text import (BUILTIN_GENERAL, BUILTIN_HELDOUT, GeneralTextError, check_general_text,
                                             general_text_record, is_dataset_file, load_general_text, parse_hf,
                                             resolve_general_text)
from persona_core.catalog.shipped import DATA, REFERENCE_TEXTS

ROOT = Path(__file__).resolve().parents[1]
WORDS = " ".join(f"the {w} of a river is long and the sea is wide" for w in range(300))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture
def no_wikitext(tmp_path, monkeypatch):
    """A process that can find no WikiText-2 anywhere: no $PERSONA_WIKITEXT2, a working directory and an
    install root without ../shared/data/wikitext-2."""
    monkeypatch.delenv(gt.WIKITEXT_ENV, raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(gt, "_INSTALL_ROOT", tmp_path / "install" / "main")
    return tmp_path


def test_builtin_specs_and_none_read_the_shipped_files():
    assert load_general_text(BUILTIN_GENERAL).text == REFERENCE_TEXTS.read_text(encoding="utf-8")
    assert load_general_text(BUILTIN_HELDOUT).text == (DATA / "heldout.txt").read_text(encoding="utf-8")
    none = load_general_text(None)  # an unset ppl_text: the documented default, named as such
    assert none.spec == BUILTIN_HELDOUT and none.sha256 == load_general_text(BUILTIN_HELDOUT).sha256
    with pytest.raises(GeneralTextError, match="unknown built-in text"):
        load_general_text("builtin:wikipedia")


def test_a_file_is_read_and_recorded_by_its_content(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text(WORDS, encoding="utf-8")
    text = load_general_text(str(path))
    assert text.text == WORDS and text.source == str(path.resolve())
    assert text.record() == {"spec": str(path), "source": str(path.resolve()), "sha256": sha(WORDS),
                             "chars": len(WORDS)}
    assert text.id == f"{path}@sha256:{sha(WORDS)[:12]}"
    path.write_text(WORDS + " and a new ending", encoding="utf-8")  # same spec, other text: another digest
    assert general_text_record(str(path))["sha256"] == sha(WORDS + " and a new ending")


def test_a_missing_file_or_a_folder_is_an_error_naming_the_spec(tmp_path):
    with pytest.raises(GeneralTextError, match=r"'.*nowhere\.txt': no such file .*PERSONA_WIKITEXT2"):
        load_general_text(str(tmp_path / "nowhere.txt"))
    with pytest.raises(GeneralTextError, match="a folder; name a text file"):
        load_general_text(str(tmp_path))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(GeneralTextError, match="is empty"):
        load_general_text(str(tmp_path / "empty.txt"))


def test_wikitext_aliases_follow_the_env_folder_and_never_fall_back(no_wikitext, monkeypatch):
    with pytest.raises(GeneralTextError, match=r"'wikitext-2-valid': WikiText-2 valid.txt not found .*PERSONA_WIKITEXT2"):
        load_general_text("wikitext-2-valid")
    folder = no_wikitext / "wt2"
    folder.mkdir()
    (folder / "valid.txt").write_text(WORDS)
    (folder / "test.txt").write_text("test " * 100)
    monkeypatch.setenv(gt.WIKITEXT_ENV, str(folder))
    assert resolve_general_text("wikitext-2-valid") == str((folder / "valid.txt").resolve())
    assert load_general_text("wikitext-2-test").text == "test " * 100
    # the layout next to a checkout (../shared/data/wikitext-2) is found too
    monkeypatch.delenv(gt.WIKITEXT_ENV)
    shared = no_wikitext / "shared" / "data" / "wikitext-2"
    shared.mkdir(parents=True)
    (shared / "valid.txt").write_text("shared " * 50)
    assert load_general_text("wikitext-2-valid").text == "shared " * 50


def test_learner_general_text_has_no_silent_stand_in(no_wikitext):
    """Before: learn/data.py logged a warning and trained on the built-in held-out text instead."""
    from persona_core.learn.data import general_text

    with pytest.raises(GeneralTextError, match="wikitext-2-valid"):
        general_text()


def test_budget_validation_text_goes_through_the_resolver(no_wikitext):
    from persona_core.masks.budgeted_build import resolve_validation_text

    with pytest.raises(GeneralTextError, match="budget ppl_text: general text 'wikitext-2-valid'"):
        resolve_validation_text("wikitext-2-valid")
    assert resolve_validation_text(BUILTIN_GENERAL) == BUILTIN_GENERAL


def test_an_fsspec_url_is_read(tmp_path):
    import fsspec

    with fsspec.open("memory://general/valid.txt", "wt", encoding="utf-8") as f:
        f.write(WORDS)
    assert load_general_text("memory://general/valid.txt").sha256 == sha(WORDS)
    with pytest.raises(GeneralTextError, match="cannot read the URL"):
        load_general_text("memory://general/absent.txt")


def test_hf_specs_parse():
    assert parse_hf("hf:wikitext/wikitext-2-raw-v1:validation") == ("wikitext", "wikitext-2-raw-v1", "validation",
                                                                      "text")
    assert parse_hf("hf:Salesforce/wikitext/wikitext-2-raw-v1:test::line") == (
        "Salesforce/wikitext", "wikitext-2-raw-v1", "test", "line")
    assert parse_hf("hf:plain/:train") == ("plain", None, "train", "text")
    with pytest.raises(GeneralTextError, match="expected hf:DATASET/CONFIG:SPLIT"):
        parse_hf("hf:wikitext")


def test_hf_dataset_saved_to_disk_is_loaded_through_datasets(tmp_path):
    import datasets

    rows = [" = Heading = \n", "a first line of text\n", "", "a second line without newline"]
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": rows}),
                          "test": datasets.Dataset.from_dict({"text": ["held back\n"]})}).save_to_disk(tmp_path / "dd")
    text = load_general_text(f"hf:{tmp_path / 'dd'}:validation")
    assert text.text == " = Heading = \na first line of text\n\na second line without newline\n"
    assert text.source == f"hf:{tmp_path / 'dd'}:validation"
    with pytest.raises(GeneralTextError, match="has no split 'train'"):
        load_general_text(f"hf:{tmp_path / 'dd'}:train")
    with pytest.raises(GeneralTextError, match="no field 'body'"):
        load_general_text(f"hf:{tmp_path / 'dd'}:validation::body")


def test_hf_dataset_offline_and_not_cached_fails_at_load_with_how_to_provide(tmp_path):
    """Offline (HF_DATASETS_OFFLINE=1, empty cache): a clear error naming the spec and the ways out; set
    in a fresh process because `datasets` reads its offline switch when imported."""
    code = textwrap.dedent("""
        from persona_core.calib.general_text import GeneralTextError, load_general_text
        try:
            load_general_text("hf:wikitext/wikitext-2-raw-v1:validation")
        except GeneralTextError as err:
            print("ERROR", err)
    """)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("ERROR general text 'hf:wikitext/wikitext-2-raw-v1:validation': cannot load dataset "
                           "'wikitext' config 'wikitext-2-raw-v1' split 'validation' (offline"), line
    assert "local datasets cache" in line and "PERSONA_WIKITEXT2" in line and "save_to_disk" in line


def test_dataset_files_are_told_apart_from_general_texts():
    assert is_dataset_file("s3://b/texts.jsonl") and is_dataset_file("x.parquet") and is_dataset_file("a.txt::body")
    for spec in (BUILTIN_GENERAL, "wikitext-2-test", "hf:wikitext/wikitext-2-raw-v1:test", "hf:x/y:train::text",
                 "../shared/data/wikitext-2/test.txt", "s3://b/wiki.txt"):
        assert not is_dataset_file(spec), spec


def test_text_windows_read_every_spec_through_the_resolver(tmp_path, tiny):
    from persona_core.eval.validation import text_windows
    tok = tiny.tokenizer
    (tmp_path / "g.txt").write_text(REFERENCE_TEXTS.read_text(encoding="utf-8"), encoding="utf-8")
    assert text_windows(tok, BUILTIN_GENERAL, 16, 3) == text_windows(tok, str(tmp_path / "g.txt"), 16, 3)


def test_perplexity_metric_reads_named_texts_as_general_text(tmp_path, monkeypatch, tiny):
    """Before: a ppl_text not ending in .txt (wikitext-2-test, builtin:general, hf:...) was read as a dataset
    file by `load_texts` and failed."""
    from persona_core.eval import metrics
    from persona_core.eval.validation import text_windows

    folder = tmp_path / "wt2"
    folder.mkdir()
    (folder / "test.txt").write_text(WORDS)
    monkeypatch.setenv(gt.WIKITEXT_ENV, str(folder))
    tok = tiny.tokenizer
    ctx = SimpleNamespace(ev=SimpleNamespace(tokenizer=tok), config=SimpleNamespace(ppl_window=16, ppl_windows=4))
    assert metrics._windows(ctx, "wikitext-2-test") == text_windows(tok, str(folder / "test.txt"), 16, 4)
    assert metrics._windows(ctx, BUILTIN_GENERAL) == text_windows(tok, BUILTIN_GENERAL, 16, 4)


def test_a_missing_text_is_a_config_load_error(tmp_path, no_wikitext):
    from persona_core.eval.config import EvalConfig
    from persona_core.run.config import ConfigError, parse_config

    with pytest.raises(GeneralTextError, match=r"EvalConfig.ppl_text: general text 'gone/test.txt': no such file"):
        EvalConfig(ppl_text="gone/test.txt")
    with pytest.raises(GeneralTextError, match="EvalConfig.val_text: general text 'wikitext-2-valid'"):
        EvalConfig(val_text="wikitext-2-valid")
    EvalConfig(ppl_text="x.jsonl::text")  # a dataset file is read by load_texts when scored, not here
    with pytest.raises(GeneralTextError, match=r"^where: general text 'gone/valid.txt': no such file"):
        check_general_text("gone/valid.txt", "where")
    check_general_text(BUILTIN_GENERAL, "where")
    with pytest.raises(ConfigError, match=r"x.yaml:4: evaluate.options.ppl_text: EvalConfig.ppl_text: general text 'gone/test.txt': no such file"):
        parse_config("model: tiny-random-llama\nevaluate:\n  options:\n    ppl_text: gone/test.txt\n", "x.yaml")
    with pytest.raises(ConfigError, match=r"masks.budget: .*ppl_text: general text 'wikitext-2-valid'"):
        parse_config("model: tiny-random-llama\nmasks:\n  budget: {perplexity_ratio: 1.1}\n", "x.yaml")
    valid = no_wikitext / "valid.txt"
    valid.write_text(WORDS)
    cfg = parse_config(f"model: tiny-random-llama\nmasks:\n  budget: {{ppl_text: {valid}}}\n"
                       f"evaluate:\n  options:\n    val_text: {valid}\n    ppl_text: {BUILTIN_GENERAL}\n", "x.yaml")
    assert cfg.evaluate.options.eval_fields()["val_text"] == str(valid)


@pytest.mark.slow
def test_budget_search_records_the_validation_text_it_chose_on(tmp_path, tiny):
    """A budgeted mask's metadata says which validation text (spec, source, SHA-256) its setting was chosen on."""
    from persona_core.calib.config import CalibConfig
    from persona_core.calib.recorder import calibrate_persona
    from persona_core.catalog import load_catalog
    from persona_core.eval.engine import Evaluator
    from persona_core.masks.budget import Budget
    from persona_core.masks.budgeted_build import PairSearch
    from persona_core.masks.inputs import LinearWeights
    from persona_core.masks.spec import MaskSpec
    loaded = tiny
    lw = LinearWeights.from_model(loaded)
    lw = LinearWeights(lw.groups, {k: v.clone() for k, v in lw.tensors.items()})
    cat = load_catalog("builtin")
    a, b = cat["introvert"], cat["extrovert"]
    cc = CalibConfig(max_length=64)
    roles = [("persona", a), ("opposite", b)]  # what contrastive-penalty needs
    stats = [calibrate_persona(loaded, p, cc)[0] for _, p in roles]
    valid = tmp_path / "valid.txt"
    valid.write_text(WORDS)
    budget = Budget(steps=2, ppl_windows=2, ppl_window=32, max_sparsity=0.2, perplexity_ratio=1.5, ppl_text=str(valid))
    out = PairSearch(Evaluator(loaded), lw, MaskSpec("contrastive-penalty", 0.1), budget, roles, stats,
                     calib_config=cc).run()
    assert out.metadata()["val_text"] == {"spec": str(valid), "source": str(valid.resolve()),
                                          "sha256": sha(WORDS), "chars": len(WORDS)}
