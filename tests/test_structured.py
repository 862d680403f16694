"""FFN-channel export: a physically smaller model computing what the masked dense model computes."""

from __future__ import annotations

import copy

import pytest
import torch

from persona_core.masks.build import build_masks

from persona_core.masks.inputs import LinearWeights

from persona_core.masks.spec import MaskSpec
from persona_core.masks.export import export_pruned, kept_channels
from tests.test_masks import random_stats


def test_export_equals_masked_dense_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    stats = random_stats(LinearWeights.from_model(tiny).groups, 11)
    masks = build_masks(tiny, stats, spec=MaskSpec("wanda", 0.25, "ffn-channels"))
    out = export_pruned(tiny, masks, tmp_path / "pruned")
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    assert pruned.config.intermediate_size == 96
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (64, 96)

    dense = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for name, mask in masks.items():
            dense.get_submodule(name).weight.mul_(mask)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(ids).logits
        got = pruned(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, tiny.model(ids).logits)  # the mask really changed the model
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in tiny.model.parameters())


def test_export_refuses_unstructured_masks(tiny, tmp_path):
    masks = build_masks(tiny, spec=MaskSpec("magnitude", 0.5))
    with pytest.raises(ValueError, match="partly pruned|attention untouched"):
        export_pruned(tiny, masks, tmp_path / "x")


def test_kept_channels_needs_one_width(tiny):
    masks = build_masks(tiny, spec=MaskSpec("magnitude", 0.5, "ffn-channels", layer_sparsity=(0.25, 0.5)))
    with pytest.raises(ValueError, match="different numbers"):
        kept_channels(tiny.model, masks)


def test_kept_channels_names_a_partly_pruned_row_or_column(tiny):
    """An ffn-channels mask with one weight of a kept channel dropped: a gate/up row or the down column."""
    base = build_masks(tiny, spec=MaskSpec("magnitude", 0.5, "ffn-channels"))
    assert kept_channels(tiny.model, base)
    up, down = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
    channel = int(base[down].all(0).nonzero()[0])
    for name, index, what in ((up, (channel, 0), "rows"), (down, (0, channel), "columns")):
        masks = {k: v.clone() for k, v in base.items()}
        masks[name][index] = False
        with pytest.raises(ValueError, match=f"^{name}: {what} are partly pruned"):
            kept_channels(tiny.model, masks)
