"""Trust, second pass (issue 24, findings 1, 3, 5 and 6): every file read back is verified against
what its key says it is, and every file deleted is one the system can prove it wrote, inside the
store root. Each test is the finding's reproduction on the tiny model and the built-in
introvert/extrovert pair; none starts Ray (the end-to-end swap is in test_verification.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import tiny_pipeline_config

from persona_core.catalog import load_catalog
from persona_core.eval.config import EvalConfig
from persona_core.eval.dense_cache import DenseRowCache
from persona_core.masks.codec import encode_mask, read_mask, read_mask_metadata, verify_mask, write_mask
from persona_core.masks.spec import MaskSpec, spec_key
from persona_core.models import builtin
from persona_core.run.execution import repair, verify_artifacts
from persona_core.run.plan import make_plan
from persona_core.run.units import MaskUnit, mask_is_current
from persona_core.store import layout
from persona_core.store.store import StoreError, open_store

PART = "part-0123456789abcdef.parquet"  # a name the layout parses as a statistics part


@pytest.fixture
def plan(tmp_path):
    return make_plan(tiny_pipeline_config(str(tmp_path / "store")))


# ---------------------------------------------------------------------------- finding 1: what --repair deletes


def test_repair_never_deletes_through_a_symlink_that_leaves_the_store(plan, tmp_path, capsys):
    """``S/stats/model=<k>/persona=introvert`` and ``S/masks/model=<k>`` replaced by symlinks to outside
    folders: --repair used to print "removing corrupt .../notes.parquet" and delete the outside files."""
    root, k = Path(plan.store.root), plan.inputs.model_key
    outside_stats, outside_masks = tmp_path / "outside-stats", tmp_path / "outside-masks"
    precious = [outside_stats / "notes.parquet", outside_stats / PART, outside_masks / "model.safetensors",
                outside_masks / "method=contrastive-wanda" / "sparsity=0.5" / "introvert.safetensors"]
    for f in precious:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"someone else's file")
    (root / "stats" / f"model={k}").mkdir(parents=True)
    (root / "stats" / f"model={k}" / "persona=introvert").symlink_to(outside_stats, target_is_directory=True)
    (root / "masks").mkdir()
    (root / "masks" / f"model={k}").symlink_to(outside_masks, target_is_directory=True)

    assert verify_artifacts(plan) == []  # nothing outside the root is the store's to judge
    repair(plan)
    assert all(f.read_bytes() == b"someone else's file" for f in precious)
    assert "removing" not in capsys.readouterr().out

    # and the store itself refuses such a delete, whoever asks
    key = f"stats/model={k}/persona=introvert/{PART}"
    with pytest.raises(StoreError, match="outside the store"):
        plan.store.delete(key)
    assert (outside_stats / PART).exists()


def test_repair_deletes_only_the_stores_own_artifacts(plan, capsys):
    """Non-artifacts under the store (``persona=extrovert/README.parquet``, ``backup/old.parquet``, a
    stray ``.safetensors``) are left alone; a corrupt part named as the store names parts is removed."""
    root, k = Path(plan.store.root), plan.inputs.model_key
    stats = root / "stats" / f"model={k}"
    mine = stats / "persona=introvert" / PART
    theirs = [stats / "persona=extrovert" / "README.parquet", stats / "persona=introvert" / "backup" / "old.parquet",
              root / "masks" / f"model={k}" / "notes.safetensors",
              root / "masks" / f"model={k}" / "method=x" / "sparsity=0.5" / "backup" / "introvert.safetensors"]
    for f in [mine, *theirs]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"not an artifact")

    assert verify_artifacts(plan) == [f"stats/model={k}/persona=introvert/{PART}"]
    repair(plan)
    assert not mine.exists()
    assert all(f.read_bytes() == b"not an artifact" for f in theirs)
    assert capsys.readouterr().out.count("removing corrupt") == 1


def test_artifact_key_parser():
    k = "tiny-random-llama-cf1551e6"
    assert layout.parse_artifact(f"stats/model={k}/persona=introvert/{PART}") is not None
    assert layout.parse_artifact(f"masks/model={k}/calib=877b2562fa745c72/method=wanda/sparsity=0.5/"
                                 "introvert.safetensors") is not None
    for key in (f"stats/model={k}/persona=extrovert/README.parquet", f"stats/model={k}/persona=a/backup/old.parquet",
                f"masks/model={k}/model.safetensors", f"stats/model={k}/persona=Not An Id/{PART}",
                f"masks/model={k}/method=wanda/sparsity=0.5/../x.safetensors", "backup/old.parquet"):
        assert layout.parse_artifact(key) is None, key


# ---------------------------------------------------------------------------- finding 3: swapped masks


def _build_like_masks(store, model_key: str, calib: str, header_owner: bool) -> tuple[MaskSpec, dict, str]:
    """An introvert/extrovert pair of contrastive masks as build-masks writes them (`header_owner`
    False: as written before the header named the key's owner, with the owner in the metadata only)."""
    spec = MaskSpec("contrastive-wanda", 0.5)
    g = torch.Generator().manual_seed(0)
    keys, digests = {}, {}
    for pid, opp in (("introvert", "extrovert"), ("extrovert", "introvert")):
        key = spec_key(model_key, spec, pid, calib)
        masks = {"model.layers.0.mlp.up_proj": torch.rand(8, 16, generator=g) < 0.5}
        meta = {"model_key": model_key, **spec.to_dict(), "identity": "ident-1", "persona": pid,
                "roles": {"persona": pid, "opposite": opp},
                "stats_versions": {pid: {"persona_hash": "h", "calib_hash": calib}}}
        if header_owner:
            write_mask(store, key, masks, meta)
        else:
            store.write_bytes(key, encode_mask(masks, meta))
        keys[pid] = key
        digests[pid] = verify_mask(store, key)
    return spec, keys, digests


@pytest.mark.parametrize("header_owner", [True, False], ids=["owner-in-header", "owner-in-metadata"])
def test_swapped_masks_are_refused_everywhere(plan, header_owner):
    """introvert.safetensors and extrovert.safetensors swapped in one folder: build-masks called both
    current, evaluation read extrovert's mask for introvert, --repair said everything read back whole."""
    store, k = plan.store, plan.inputs.model_key
    spec, keys, _ = _build_like_masks(store, k, plan.calib.hash, header_owner)
    unit = MaskUnit(spec, (("persona", "introvert"), ("opposite", "extrovert")),
                    (("introvert", keys["introvert"]), ("extrovert", keys["extrovert"])), "ident-1")
    assert mask_is_current(store, unit)
    a, b = (Path(store.path(keys[p])) for p in ("introvert", "extrovert"))
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)

    with pytest.raises(StoreError, match="extrovert.*introvert|introvert.*extrovert"):
        read_mask(store, keys["introvert"])  # what evaluation, the API and delta bases read through
    with pytest.raises(StoreError, match="owner"):
        read_mask_metadata(store, keys["extrovert"])
    assert not mask_is_current(store, unit)  # build-masks rebuilds them
    assert sorted(verify_artifacts(plan)) == sorted(keys.values())  # --repair removes them


@pytest.mark.parametrize("field", ["model", "method", "calib", "level"])
def test_mask_under_another_models_method_or_calibration_key_is_refused(plan, field):
    """The same file copied under a key of another model, method, calibration config or sparsity."""
    store, k = plan.store, plan.inputs.model_key
    _, keys, _ = _build_like_masks(store, k, plan.calib.hash, True)
    src = keys["introvert"]
    moved = {"model": src.replace(f"model={k}", "model=other-model-12345678"),
             "method": src.replace("method=contrastive-wanda", "method=wanda"),
             "calib": src.replace(f"calib={plan.calib.hash}", "calib=0000000000000000"),
             "level": src.replace("sparsity=0.5", "sparsity=0.7")}[field]
    store.write_bytes(moved, store.read_bytes(src))
    with pytest.raises(StoreError, match="its key"):
        read_mask(store, moved)


# ---------------------------------------------------------------------------- finding 5: dense rows


def _dense_setup(tmp_path):
    store = open_store(str(tmp_path / "store"))
    cat = load_catalog("builtin")
    p, o = cat["introvert"], cat["extrovert"]
    cfg = EvalConfig(conditions=("dense", "dense+prompt", "masked"), metrics=("statement-preference",))
    rows = [{"condition": c, "metric": "statement-preference", "value": v, "n": 4, "stderr": 0.1,
             "items": [v, -v], "items_own": 1, "texts": None} for c, v in (("dense", 0.0), ("dense+prompt", 0.25))]
    cache = DenseRowCache(store, "tiny-random-llama-cf1551e6")
    ident = "0123456789abcdef"
    cache.put(ident, p, o, cfg, rows)
    return store, cache, ident, p, o, cfg, rows


def test_dense_rows_with_a_forged_value_are_recomputed_not_used(tmp_path, caplog):
    """A forged value in ``dense/...parquet`` (footer and every identity column kept) moved the
    prompt baseline's separation in the next run's verdicts, silently."""
    store, cache, ident, p, o, cfg, rows = _dense_setup(tmp_path)
    assert [r["value"] for r in cache.get(ident, p, o, cfg)] == [0.0, 0.25]
    key = cache.key(ident, p)
    table = store.read_parquet(key)
    i = table.schema.get_field_index("value")
    forged = table.set_column(i, table.schema.field(i), pa.array([0.0, 0.375]))
    store.write_parquet(key, forged)  # the same schema and footer metadata, one value changed
    with caplog.at_level(logging.WARNING):
        assert cache.get(ident, p, o, cfg) is None
    assert "recomputing" in caplog.text and "digest" in caplog.text


def test_dense_rows_with_a_flipped_bit_are_recomputed_not_used(tmp_path, caplog):
    store, cache, ident, p, o, cfg, rows = _dense_setup(tmp_path)
    key = cache.key(ident, p)
    plain = store.read_parquet(key)
    store.write_parquet(key, plain, compression="none", write_statistics=False)  # values stored plainly, once
    data = bytearray(store.read_bytes(key))
    at = bytes(data).find(pa.array([0.25]).buffers()[1].to_pybytes())
    assert at > 0
    data[at + 7] ^= 0x01  # the sign/exponent byte of 0.25
    store.write_bytes(key, bytes(data))
    with caplog.at_level(logging.WARNING):
        assert cache.get(ident, p, o, cfg) is None


def test_dense_rows_under_another_ident_are_refused(tmp_path):
    store, cache, ident, p, o, cfg, rows = _dense_setup(tmp_path)
    other = "fedcba9876543210"
    store.write_bytes(cache.key(other, p), store.read_bytes(cache.key(ident, p)))
    assert cache.get(other, p, o, cfg) is None


def test_dense_rows_key_follows_the_id_grammar():
    k = "tiny-random-llama-cf1551e6"
    assert layout.dense_rows(k, "introvert", "0123456789abcdef").endswith("/rows-0123456789abcdef.parquet")
    for pid, ident in (("Not An Id", "0123456789abcdef"), ("-x", "0123456789abcdef"), ("introvert", "xyz"),
                       ("introvert", "0123456789ABCDEF")):
        with pytest.raises(layout.LayoutError):
            layout.dense_rows(k, pid, ident)


# ---------------------------------------------------------------------------- finding 6: the converted model cache


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """The default model's conversion, with the tiny random model's weights in place of the GGUF's
    (the cache logic is what is tested; no real conversion runs). Returns the conversion count."""
    from persona_core.models.tiny import tiny_random_llama

    monkeypatch.setenv("PERSONA_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf, out: Path, chat_template=None) -> None:
        model, tok, _ = tiny_random_llama(None)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        calls.append(out)

    monkeypatch.setattr(builtin, "_convert", convert)
    return calls


def _logits(loaded) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(torch.tensor([[1, 2, 3, 4]])).logits


def test_converted_cache_with_flipped_bits_is_rebuilt(fake_conversion, caplog):
    """Exponent bits flipped in 4,096 floats of one layer of the cached safetensors (size and mtime
    kept): same model key, different logits, no warning."""
    from persona_core.models.loading import load_model

    first = load_model("smollm2-135m", device="cpu")
    assert len(fake_conversion) == 1
    want = _logits(first)
    load_model("smollm2-135m", device="cpu")
    assert len(fake_conversion) == 1  # a whole cache is read, not rebuilt

    folder, _ = builtin.smollm2_folder()
    weights = folder / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    start = len(data) - 4 * 4096 - 64
    for i in range(start, start + 4 * 4096, 4):
        data[i + 3] ^= 0x40  # an exponent bit of a float32
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size

    with caplog.at_level(logging.WARNING):
        again = load_model("smollm2-135m", device="cpu")
    assert len(fake_conversion) == 2 and "rebuild" in caplog.text and str(weights) in caplog.text
    assert again.key == first.key
    torch.testing.assert_close(_logits(again), want)


def test_truncated_converted_cache_is_rebuilt_with_a_message(fake_conversion, caplog):
    """A truncated cache failed with a bare SafetensorError and was never rebuilt."""
    from persona_core.models.loading import load_model

    want = _logits(load_model("smollm2-135m", device="cpu"))
    folder, _ = builtin.smollm2_folder()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        again = load_model("smollm2-135m", device="cpu")
    assert len(fake_conversion) == 2 and "rebuild" in caplog.text
    torch.testing.assert_close(_logits(again), want)


def test_converted_cache_without_a_digest_record_is_rebuilt(fake_conversion, caplog):
    """A cache converted before digests were recorded cannot be proven whole: it is converted again, once."""
    builtin.smollm2_folder()
    folder, _ = builtin.smollm2_folder()
    (folder / builtin.CACHE_RECORD).unlink()
    with caplog.at_level(logging.WARNING):
        builtin.smollm2_folder()
    assert len(fake_conversion) == 2 and "no digest record" in caplog.text
    builtin.smollm2_folder()
    assert len(fake_conversion) == 2


def test_concurrent_loads_convert_once(fake_conversion):
    """Two loaders of a missing or failed cache at once: one converts, the other waits and finds it whole
    (never converting again, never replacing the folder under a reader)."""
    import threading

    def load_at_once(loaders: int = 3) -> None:
        threads = [threading.Thread(target=builtin.smollm2_folder) for _ in range(loaders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    load_at_once()
    assert len(fake_conversion) == 1
    folder, _ = builtin.smollm2_folder()
    (folder / "config.json").write_text("{}")  # fails its record
    load_at_once()
    assert len(fake_conversion) == 2
    assert not builtin.cache_problem(folder)
