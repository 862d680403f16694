"""Mask codec: bit-exact round trips (plain and delta), lazy reads, no unpickling, clear errors."""

from __future__ import annotations

import pytest
import torch

from persona_core.masks.codec import (MaskFile, bits_per_weight, encode_mask, read_mask, read_mask_metadata,
                                    write_mask)
from persona_core.store.store import StoreError, open_store


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
    write_mask(store, "masks/b.safetensors", base, {})
    write_mask(store, "masks/d.safetensors", flipped(base, 0.05, 7), {}, base_key="masks/b.safetensors")
    write_mask(store, "masks/b.safetensors", flipped(base, 0.05, 8), {})
    with pytest.raises(StoreError, match="has changed"):
        read_mask(store, "masks/d.safetensors")


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


# ---------------------------------------------------------------------------- verification (issue 12, item 3)


def _rewrite(data: bytes, edit) -> bytes:
    """A mask file with its JSON header changed by `edit(header_dict)` (the data bytes kept)."""
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def _forged(tensors: dict, shapes: dict, **extra) -> bytes:
    """A self-consistent v2 file (valid payload and header digests) with whatever shapes it claims:
    what a buggy writer or a careful forger could produce."""
    import json

    import numpy as np
    from safetensors.numpy import save

    from persona_core.masks import codec as mc

    header = {"format": mc.FORMAT, "encoding": "bits", "shapes": json.dumps(shapes), "digest": "0" * 32,
              "meta": "{}", **extra}
    header["payload"] = json.dumps({k: mc._bytes_digest(np.ascontiguousarray(v).tobytes())
                                    for k, v in tensors.items()}, sort_keys=True)
    header["header_digest"] = mc._header_digest(header)
    return save(tensors, metadata=header)


def test_truncated_mask_is_refused(store):
    write_mask(store, "masks/a.safetensors", random_masks(11), {})
    data = store.read_bytes("masks/a.safetensors")
    store.write_bytes("masks/a.safetensors", data[: 2 * len(data) // 3])
    with pytest.raises(StoreError, match="truncated|outside"):
        read_mask(store, "masks/a.safetensors")


def test_flipped_body_bits_are_refused(store):
    write_mask(store, "masks/a.safetensors", random_masks(12), {})
    data = bytearray(store.read_bytes("masks/a.safetensors"))
    data[-5] ^= 0x10
    store.write_bytes("masks/a.safetensors", bytes(data))
    f = MaskFile(store, "masks/a.safetensors")  # the header is intact
    with pytest.raises(StoreError, match="payload digest"):
        f.read()


def test_edited_shapes_are_refused(store):
    import json

    masks = random_masks(13)
    write_mask(store, "masks/a.safetensors", masks, {"x": 1})

    def swap(header):  # (37, 13) -> (13, 37): same byte count, different mask
        meta = header["__metadata__"]
        shapes = json.loads(meta["shapes"])
        shapes["model.layers.0.self_attn.q_proj"] = [13, 37]
        meta["shapes"] = json.dumps(shapes)

    store.write_bytes("masks/a.safetensors", _rewrite(store.read_bytes("masks/a.safetensors"), swap))
    with pytest.raises(StoreError, match="header digest"):
        read_mask(store, "masks/a.safetensors")
    with pytest.raises(StoreError, match="header digest"):
        read_mask_metadata(store, "masks/a.safetensors")


def test_zero_length_module_data_is_refused(store):
    import numpy as np

    store.write_bytes("masks/z.safetensors", _forged({"w": np.zeros(0, np.uint8)}, {"w": [64, 64]}))
    with pytest.raises(StoreError, match="zero-length"):
        read_mask(store, "masks/z.safetensors")
    store.write_bytes("masks/e.safetensors", _forged({"w": np.zeros(0, np.uint8)}, {"w": [0, 64]}))
    with pytest.raises(StoreError, match="zero-length"):
        read_mask(store, "masks/e.safetensors")


def test_huge_claimed_shape_is_refused_before_allocating(store):
    import tracemalloc

    import numpy as np

    store.write_bytes("masks/h.safetensors", _forged({"w": np.zeros(16, np.uint8)}, {"w": [2**36]}))
    store.write_bytes("masks/o.safetensors", _forged({"w": np.zeros(16, np.uint8)}, {"w": [2**40, 2**40]}))
    tracemalloc.start()
    try:
        for key in ("masks/h.safetensors", "masks/o.safetensors"):
            with pytest.raises(StoreError, match="cannot hold"):
                read_mask(store, key)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # never tried to allocate the 8 GiB the header claims
    # a header length beyond the file's size is refused before reading it
    store.write_bytes("masks/l.safetensors", (1 << 26).to_bytes(8, "little") + b"{}")
    with pytest.raises(StoreError, match="does not fit"):
        read_mask(store, "masks/l.safetensors")


@pytest.mark.parametrize("base_key", ["../../outside.safetensors", "masks/../../x.safetensors",
                                      "/etc/passwd", "s3://other-bucket/masks/b.safetensors",
                                      "masks/b.parquet", "results/b.safetensors"])
def test_delta_base_must_be_a_mask_key_of_the_same_store(store, base_key):
    base = random_masks(14)
    masks = flipped(base, 0.02, 15)
    with pytest.raises(StoreError, match="not a mask key"):
        write_mask(store, "masks/d.safetensors", masks, {}, base=base, base_key=base_key)
    write_mask(store, "masks/b.safetensors", base, {})
    write_mask(store, "masks/d.safetensors", masks, {}, base_key="masks/b.safetensors")

    def retarget(header):
        header["__metadata__"]["base"] = base_key
        from persona_core.masks.codec import _header_digest
        header["__metadata__"]["header_digest"] = _header_digest(header["__metadata__"])

    store.write_bytes("masks/d.safetensors", _rewrite(store.read_bytes("masks/d.safetensors"), retarget))
    with pytest.raises(StoreError, match="not a mask key"):
        read_mask(store, "masks/d.safetensors")


def test_delta_base_of_another_model_or_itself_is_refused(store):
    base = random_masks(16)
    with pytest.raises(StoreError, match="another model"):
        write_mask(store, "masks/model=a/d.safetensors", base, {}, base=base, base_key="masks/model=b/b.safetensors")
    with pytest.raises(StoreError, match="its own base"):
        write_mask(store, "masks/model=a/d.safetensors", base, {}, base=base, base_key="masks/model=a/d.safetensors")


def test_old_unverifiable_format_is_refused_with_advice(store):
    from safetensors.numpy import save

    from persona_core.masks import codec as mc

    store.write_bytes("masks/v1.safetensors", save(
        {"w": mc.pack(torch.ones(8, dtype=torch.bool))},
        metadata={"format": mc.OLD_FORMAT, "encoding": "bits", "shapes": '{"w": [8]}', "digest": "x", "meta": "{}"}))
    with pytest.raises(StoreError, match="--repair"):
        read_mask(store, "masks/v1.safetensors")


def test_read_digest_is_that_of_the_bytes_read(store):
    from persona_core.masks.codec import digest, pack, verify_mask

    masks = random_masks(17)
    write_mask(store, "masks/a.safetensors", masks, {})
    f = MaskFile(store, "masks/a.safetensors")
    assert f.read_digest is None
    f.read()
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    assert f.read_digest == digest({n: pack(m) for n, m in masks.items()}, shapes) == verify_mask(
        store, "masks/a.safetensors")
