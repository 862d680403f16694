import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from persona_core.store.store import Store, StoreError, open_store


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    if request.param == "memory":
        return Store(f"memory://test-{uuid.uuid4().hex}")
    return Store(request.getfixturevalue("s3_url"))


def table(persona: str, n: int = 4) -> pa.Table:
    return pa.table({"layer": pa.array(range(n), pa.int16()), "value": pa.array([float(i) for i in range(n)])})


def test_bytes_json_round_trip(store):
    store.write_bytes("a/b/c.bin", b"\x00\x01")
    assert store.read_bytes("a/b/c.bin") == b"\x00\x01" and store.exists("a/b/c.bin")
    store.write_json("runs/r1/manifest.json", {"ok": True, "n": 3})
    assert store.read_json("runs/r1/manifest.json") == {"ok": True, "n": 3}
    assert store.list("runs") == ["runs/r1/manifest.json"]
    assert store.list("a", suffix=".bin") == ["a/b/c.bin"]
    store.delete("a/b/c.bin")
    assert not store.exists("a/b/c.bin")
    with pytest.raises(FileNotFoundError, match="c.bin: not in the store"):
        store.read_bytes("a/b/c.bin")


def test_parquet_dataset_with_hive_partitions(store):
    for persona in ("introvert", "extrovert"):
        store.write_parquet(f"stats/model=m1/persona={persona}/part-0.parquet", table(persona))
    ds = store.dataset("stats")
    assert ds.count_rows() == 8
    got = ds.to_table(filter=(pc.field("persona") == "introvert") & (pc.field("layer") >= 2))
    assert got.num_rows == 2 and set(got.column("model").to_pylist()) == {"m1"}
    assert store.read_parquet("stats/model=m1/persona=introvert/part-0.parquet").equals(table("introvert"))


def test_safetensors_round_trip_without_pickle(store):
    tensors = {"w": torch.arange(6, dtype=torch.uint8).reshape(2, 3)}
    store.write_safetensors("masks/x.safetensors", tensors, {"method": "wanda"})
    got, meta = store.read_safetensors("masks/x.safetensors")
    assert torch.equal(got["w"], tensors["w"]) and meta == {"method": "wanda"}


def test_corrupt_files_name_the_key(store):
    store.write_bytes("stats/bad.parquet", b"not parquet at all")
    with pytest.raises(StoreError, match="stats/bad.parquet: corrupt Parquet"):
        store.read_parquet("stats/bad.parquet")
    store.write_bytes("masks/bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(StoreError, match="masks/bad.safetensors: corrupt safetensors"):
        store.read_safetensors("masks/bad.safetensors")


def test_failed_serialisation_publishes_nothing(store):
    class Boom(dict):
        def items(self):
            raise RuntimeError("boom")

    with pytest.raises(Exception):
        store.write_parquet("stats/p.parquet", "not a table")
    with pytest.raises(RuntimeError):
        store.write_safetensors("masks/m.safetensors", Boom(w=torch.zeros(1)))
    assert store.list() == []


def test_local_failure_mid_write_leaves_nothing_visible(tmp_path, monkeypatch):
    import os

    store = Store(str(tmp_path))
    store.write_bytes("k.bin", b"old")

    def crash(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="cannot write .*k.bin: disk went away"):
        store.write_bytes("k.bin", b"new")
    with pytest.raises(StoreError):
        store.write_bytes("fresh.bin", b"new")
    monkeypatch.undo()
    assert store.read_bytes("k.bin") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.bin"]


def test_unwritable_store_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot write"):
        Store(str(blocker / "store")).check_writable()


def test_s3_endpoint_from_environment_and_no_listing_cache(s3_url):
    store = open_store(s3_url)
    assert store.fs.dircache.use_listings_cache is False
    assert store.fs.endpoint_url.startswith("http://127.0.0.1:")
    store.check_writable()
    assert store.uri("x").startswith("s3://")
    import pickle

    again = pickle.loads(pickle.dumps(store))
    store.write_bytes("p.bin", b"1")
    assert again.read_bytes("p.bin") == b"1"
