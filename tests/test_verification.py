"""Verified artifacts end to end (issue 12, items 3 and 5): what `--repair` finds and rebuilds,
and the digests result rows carry. Unit-level checks live in test_maskcodec.py / test_stats.py."""

from __future__ import annotations


import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import tiny_pipeline_config

from persona_core.run import runs
from persona_core.masks.codec import MaskFile, verify_mask
from persona_core.calib.parts import StatsError, verify_part
from persona_core.calib.stored import list_parts
from persona_jobs import evaluate, pipeline
from persona_jobs.cli import UserError
from persona_core.run.plan import make_plan
from persona_core.run.execution import verify_artifacts


def _flip_body_bit(store, key: str) -> None:
    data = bytearray(store.read_bytes(key))
    data[-3] ^= 0x04  # in the last module's bytes; the header stays intact and parses
    store.write_bytes(key, bytes(data))


def test_result_rows_carry_the_digest_of_the_mask_read(stored):
    root, rid = stored
    store = make_plan(tiny_pipeline_config(str(root))).store
    table = evaluate.load_results(store, rid)
    hashes = set(table.column("mask_hash").to_pylist()) - {None, ""}
    keys = [k for k in store.list("masks/", suffix=".safetensors")]
    read = {verify_mask(store, k) for k in keys}
    assert hashes and hashes <= read  # every masked row names a digest recomputed from stored bytes


def test_mask_with_flipped_bits_fails_evaluation_and_repair_rebuilds_it(stored, capsys):
    root, rid = stored
    p = make_plan(tiny_pipeline_config(str(root), evaluate__options__max_statements=3))  # a new run id
    victim = next(k for k in p.store.list("masks/", suffix=".safetensors") if "contrastive" in k)
    good = verify_mask(p.store, victim)
    _flip_body_bit(p.store, victim)
    MaskFile(p.store, victim)  # the header alone still reads
    assert verify_artifacts(p) == [victim]  # the same check every read applies

    out = pipeline.execute(p)
    assert not out.ok  # evaluated as if whole before; now its unit fails, naming the file
    assert "payload digest" in out.manifest.error and f"corrupt artifact: {p.store.uri(victim)}" in out.manifest.error
    from persona_core.report.results import read_results_index

    assert all(  # the parts this run's results index names (result parts are keyed by content, shared by runs)
        good not in pq.read_table(pa.BufferReader(p.store.read_bytes(k))).column("mask_hash").to_pylist()
        for k in read_results_index(p.store, p.run_id) or {} if victim.rsplit("/", 1)[-1][:-12] in k)

    out = pipeline.execute(p, do_repair=True)
    assert out.ok, out.manifest.error
    assert "removing corrupt" in capsys.readouterr().out
    assert verify_mask(p.store, victim) == good  # rebuilt bit for bit


def test_stats_part_with_the_wrong_schema_is_regenerated_by_repair(stored, capsys):
    root, rid = stored
    p = make_plan(tiny_pipeline_config(str(root), masks__sparsities=[0.3], evaluate__enabled=False))
    victim = next(k for k in list_parts(p.store, p.inputs.model_key) if "persona=introvert" in k)
    table = pq.read_table(pa.BufferReader(p.store.read_bytes(victim)))
    i = table.schema.get_field_index("layer")
    wrong = table.set_column(i, pa.field("layer", pa.int64()), pc.cast(table.column("layer"), pa.int64()))
    p.store.write_parquet(victim, wrong)  # valid Parquet, wrong schema (and its old digests)
    with pytest.raises(StatsError, match="column layer is int64"):
        verify_part(p.store, victim)

    out = pipeline.execute(p)
    assert not out.ok and f"corrupt artifact: {p.store.uri(victim)}" in out.manifest.error

    out = pipeline.execute(p, do_repair=True)
    assert out.ok, out.manifest.error
    assert next(s for s in out.summaries if s["stage"] == "calibrate")["done"] == 1  # only that part
    verify_part(p.store, victim)
    assert f"removing corrupt {p.store.uri(victim)}" in capsys.readouterr().out


@pytest.mark.parametrize("flag, garbage", [("do_repair", b"{not json"), ("force", b"[1, 2]"),
                                           ("do_repair", b'{"run_id": "other", "status": "succeeded"}')])
def test_corrupt_run_manifest_is_rebuilt_by_repair_or_force(stored, flag, garbage, capsys):
    root, rid = stored
    p = make_plan(tiny_pipeline_config(str(root)))
    assert p.run_id == rid
    p.store.write_bytes(runs.manifest_key(rid), garbage)
    with pytest.raises(UserError, match=r"manifest.json: not .*--repair"):
        pipeline.execute(p)
    out = pipeline.execute(p, **{flag: True})
    assert out.ok, out.manifest.error
    assert runs.read_manifest(p.store, rid).ok
    assert "it will be rebuilt" in capsys.readouterr().out


def test_swapped_masks_are_rebuilt_by_the_next_run_not_scored(stored):
    """Issue 24 item 3, end to end: introvert's and extrovert's mask files swapped in one folder. The
    next run's build-masks finds neither current (each header names the other owner) and rebuilds
    both; evaluation scores each persona with its own mask (its rows carry its own digest)."""
    root, rid = stored
    p = make_plan(tiny_pipeline_config(str(root), evaluate__options__max_statements=3))  # a new run id
    keys = {pid: next(k for k in p.store.list("masks/", suffix=".safetensors")
                      if "contrastive" in k and k.endswith(f"/{pid}.safetensors")) for pid in ("introvert", "extrovert")}
    digests = {pid: verify_mask(p.store, k) for pid, k in keys.items()}
    a, b = (p.store.read_bytes(keys[pid]) for pid in ("introvert", "extrovert"))
    p.store.write_bytes(keys["introvert"], b)
    p.store.write_bytes(keys["extrovert"], a)
    assert sorted(verify_artifacts(p)) == sorted(keys.values())  # what --repair would remove

    out = pipeline.execute(p)
    assert out.ok, out.manifest.error
    assert next(s for s in out.summaries if s["stage"] == "build-masks")["done"] >= 2
    assert {pid: verify_mask(p.store, k) for pid, k in keys.items()} == digests
    table = evaluate.load_results(p.store, p.run_id)
    for pid in ("introvert", "extrovert"):
        rows = [h for who, m, h in zip(*(table.column(c).to_pylist() for c in ("persona", "method", "mask_hash")))
                if who == pid and m == "contrastive-wanda"]
        assert rows and set(rows) == {digests[pid]}
