"""Mask codec: bit-exact round trips (plain and delta), lazy reads, no unpickling, clear errors."""

from __future__ import annotations

import pytest
import torch

from persona_core.maskcodec import (MaskFile, bits_per_weight, encode_mask, read_mask, read_mask_metadata,
                                    write_mask)
from persona_core.store import StoreError, open_store


def random_masks(seed: int, density: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.self_attn.q_proj": (37, 13), "model.layers.0.mlp.down_proj": (64, 200),
              "model.layers.1.mlp.up_proj": (3,)}
    return {n: torch.rand(s, generator=g) < density for n, s in shapes.items()}


def flipped(masks: dict, fraction: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: m ^ (torch.rand(m.shape, generator=g) < fraction) for n, m in masks.items()}


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def test_plain_round_trip_bit_exact_with_metadata(store):
    masks = random_masks(0)
    meta = {"model_key": "m", "method": "wanda", "params": {"f": "relu", "tau": 1.0}, "sparsity": 0.5,
            "stats": {"introvert": "abc"}}
    write_mask(store, "masks/a.safetensors", masks, meta)
    got, got_meta = read_mask(store, "masks/a.safetensors")
    assert got_meta == meta
    assert set(got) == set(masks)
    for n in masks:
        assert got[n].dtype == torch.bool and torch.equal(got[n], masks[n])


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3])
def test_delta_round_trip_bit_exact(store, fraction):
    base = random_masks(1)
    masks = flipped(base, fraction, 2)
    write_mask(store, "masks/base.safetensors", base, {"side": "base"})
    write_mask(store, "masks/d.safetensors", masks, {"side": "delta"}, base_key="masks/base.safetensors")
    got, meta = read_mask(store, "masks/d.safetensors")
    assert meta == {"side": "delta"}
    assert all(torch.equal(got[n], masks[n]) for n in masks)
    assert MaskFile(store, "masks/d.safetensors").encoding == "delta"


def test_delta_is_small_when_few_positions_flip():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.rand(512, 512, generator=g) < 0.5}
    near = {"w": base["w"] ^ (torch.rand(512, 512, generator=g) < 0.01)}
    plain = encode_mask(near, {})
    delta = encode_mask(near, {}, base=base, base_key="b")
    assert bits_per_weight(len(plain), near) < 1.02
    assert bits_per_weight(len(delta), near) < 0.15


def test_lazy_per_module_reads(store):
    masks = random_masks(4)
    write_mask(store, "m.safetensors", masks, {"x": 1})
    f = MaskFile(store, "m.safetensors")
    assert f.names == list(masks) and f.shapes["model.layers.1.mlp.up_proj"] == (3,)
    assert torch.equal(f["model.layers.0.mlp.down_proj"], masks["model.layers.0.mlp.down_proj"])
    only, _ = read_mask(store, "m.safetensors", names=["model.layers.1.mlp.up_proj"])
    assert list(only) == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(KeyError):
        f["nope"]


def test_file_is_plain_safetensors_of_bytes(store):
    from safetensors.numpy import load

    write_mask(store, "m.safetensors", random_masks(5), {})
    arrays = load(store.read_bytes("m.safetensors"))
    assert all(a.dtype.name == "uint8" for a in arrays.values())
    assert arrays["model.layers.0.mlp.down_proj"].size == 64 * 200 // 8


def test_changed_base_is_refused(store):
    base = random_masks(6)
    write_mask(store, "b.safetensors", base, {})
    write_mask(store, "d.safetensors", flipped(base, 0.05, 7), {}, base_key="b.safetensors")
    write_mask(store, "b.safetensors", flipped(base, 0.05, 8), {})
    with pytest.raises(StoreError, match="has changed"):
        read_mask(store, "d.safetensors")


def test_missing_and_corrupt_files(store):
    assert read_mask_metadata(store, "none.safetensors") is None
    with pytest.raises(FileNotFoundError):
        read_mask(store, "none.safetensors")
    store.write_bytes("bad.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(StoreError, match="not a mask file"):
        read_mask(store, "bad.safetensors")
    store.write_safetensors("other.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(StoreError, match="not a persona-mask"):
        read_mask(store, "other.safetensors")


def test_non_bool_masks_rejected():
    with pytest.raises(TypeError, match="bool"):
        encode_mask({"w": torch.ones(2, 2)}, {})


def test_round_trip_on_s3(s3_url):
    store = open_store(s3_url)
    base = random_masks(9)
    masks = flipped(base, 0.02, 10)
    write_mask(store, "masks/b.safetensors", base, {"k": "b"})
    write_mask(store, "masks/d.safetensors", masks, {"k": "d"}, base_key="masks/b.safetensors")
    got, meta = read_mask(store, "masks/d.safetensors")
    assert meta == {"k": "d"} and all(torch.equal(got[n], masks[n]) for n in masks)
    assert read_mask_metadata(store, "masks/b.safetensors") == {"k": "b"}
