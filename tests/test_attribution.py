"""MLP-channel attribution statistics (calibrate with attribution: true) and contrastive-attribution masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from persona_core.calib.attribution import ATTRIBUTION, attribution
from persona_core.calib.config import CalibConfig
from persona_core.calib.recorder import calibrate
from persona_core.store.hashing import content_hash
from persona_core.versions import CALIB_VERSION
from persona_core.masks.build import build_pair_masks
from persona_core.masks.inputs import LinearWeights
from persona_core.masks.methods import METHODS
from persona_core.masks.select import n_pruned
from persona_core.masks.spec import MaskSpec
from persona_core.models.layers import linear_groups
from persona_core.calib.stats import GroupStats

TEXTS = ["I love long evenings alone with a good book.", "Parties drain me.",
         "Quiet mornings are the best part of my day, and I guard them.", "No."]
CFG = CalibConfig(chat_template=False, attribution=True, batch_size=4)


def log_likelihood(tiny, texts, config, scale: dict[int, tuple[int, float]] | None = None) -> float:
    """sum log p of every real token after the first, each text run alone (no padding), optionally
    with MLP channel c of layer l scaled by f (scale: {layer: (c, f)})."""
    from persona_core.calib.texts import batches

    handles = []
    for g in linear_groups(tiny.model):
        if g.name == "mlp_out" and scale and g.layer in scale:
            c, f = scale[g.layer]

            def pre(module, args, c=c, f=f):
                x = args[0].clone()
                x[..., c] *= f
                return (x,)
            handles.append(tiny.model.get_submodule(g.modules[0]).register_forward_pre_hook(pre))
    total = 0.0
    try:
        with torch.no_grad():
            for text in texts:
                for ids, att in batches(tiny, [text], dataclasses.replace(config, batch_size=1)):
                    logits = tiny.model(input_ids=ids, attention_mask=att).logits[:, :-1].double()
                    total += float(torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).sum())
    finally:
        for h in handles:
            h.remove()
    return total


def test_attribution_is_the_derivative_of_the_log_likelihood_in_each_channel(tiny):
    """sum_t x*dL/dx of channel c equals d/de L(channel c scaled by 1+e) at e=0 (central difference)."""
    groups = attribution(tiny, TEXTS, CFG)
    assert {k[1] for k in groups} == {ATTRIBUTION}
    layers = sorted(k[0] for k in groups)
    assert layers == list(range(len(layers))) and len(layers) >= 2
    eps = 1e-3
    for layer in (0, layers[-1]):
        g = groups[(layer, ATTRIBUTION)]
        for c in torch.argsort(g.sum.abs(), descending=True)[:3].tolist():
            up = log_likelihood(tiny, TEXTS, CFG, {layer: (c, 1 + eps)})
            down = log_likelihood(tiny, TEXTS, CFG, {layer: (c, 1 - eps)})
            assert (up - down) / (2 * eps) == pytest.approx(float(g.sum[c]), rel=0.02, abs=1e-4), (layer, c)
    g0 = groups[(0, ATTRIBUTION)]
    assert g0.tokens == sum(len(tiny.tokenizer(t)["input_ids"]) - 1 for t in TEXTS) and g0.samples == len(TEXTS)
    assert torch.all(g0.sumabs >= g0.sum.abs() - 1e-9) and torch.all(g0.sumsq >= 0)


def test_attribution_does_not_depend_on_batching_or_padding(tiny):
    one = attribution(tiny, TEXTS, dataclasses.replace(CFG, batch_size=1))
    four = attribution(tiny, TEXTS, CFG)
    for k in one:
        assert torch.allclose(one[k].sum, four[k].sum, rtol=1e-4, atol=1e-6), k
        assert one[k].tokens == four[k].tokens


def test_calibrate_records_attribution_only_when_asked_and_keeps_old_hashes(tiny):
    plain = calibrate(tiny, TEXTS, dataclasses.replace(CFG, attribution=False))
    assert not any(k[1] == ATTRIBUTION for k in plain)
    with torch.inference_mode():  # the budget search calibrates held-out texts under inference mode
        both = calibrate(tiny, TEXTS, CFG)
    assert set(both) - set(plain) == {k for k in both if k[1] == ATTRIBUTION} != set()
    # configs without the option hash as they did before it existed (stored statistics stay current)
    old = {k: v for k, v in dataclasses.asdict(CalibConfig()).items() if k != "attribution"}
    assert CalibConfig().hash == content_hash(CALIB_VERSION, old)
    assert CalibConfig(attribution=True).hash != CalibConfig().hash


# ---------------------------------------------------------------------------- the method


def attr_stats(lw: LinearWeights, seed: int, tokens: int = 50) -> dict:
    """Random per-channel attribution statistics for every layer (plus nothing else)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in lw.groups:
        if g.name == "mlp_out":
            s = torch.randn(g.in_features, generator=gen, dtype=torch.float64) * tokens
            z = torch.zeros_like(s)
            out[(g.layer, ATTRIBUTION)] = GroupStats(tokens, s, s * s, s.abs(), 5, z, z)
    return out


@pytest.fixture(scope="module")
def lw(tiny):
    return LinearWeights.from_model(tiny)


def pruned_channels(masks: dict, layer: int) -> set[int]:
    return set((~masks[f"model.layers.{layer}.mlp.down_proj"].all(0)).nonzero().flatten().tolist())


@pytest.mark.parametrize("sparsity", [0.01, 0.05, 0.25])
def test_exact_channel_count_per_layer_and_attention_untouched(lw, sparsity):
    stats = [attr_stats(lw, s) for s in (1, 2, 3)]
    for masks in build_pair_masks(lw, *stats, spec=MaskSpec("contrastive-attribution", sparsity, "ffn-channels")):
        for layer in range(lw.num_layers):
            width = lw.tensors[f"model.layers.{layer}.mlp.down_proj"].shape[1]
            assert len(pruned_channels(masks, layer)) == n_pruned(width, sparsity)
        assert all(m.all() for n, m in masks.items() if ".self_attn." in n)


def test_prunes_what_helps_the_opposite_and_spares_what_general_text_needs(lw):
    a, b, g = (attr_stats(lw, s) for s in (1, 2, 3))
    key = (0, ATTRIBUTION)
    width = a[key].width
    for s in (a, b, g):  # a neutral start: every channel the same for everyone
        s[key] = GroupStats(50, torch.zeros(width, dtype=torch.float64), *(torch.zeros(width, dtype=torch.float64),) * 2,
                            5, torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))
    a[key].sum[3] = -100.0  # channel 3 supports the opposite's texts, not the persona's
    b[key].sum[3] = 100.0
    a[key].sum[7] = 100.0  # channel 7 the reverse
    b[key].sum[7] = -100.0
    b[key].sum[9] = 250.0  # channel 9 helps the opposite even more (250 > 200), but general text needs it
    g[key].sumabs[9] = 400.0  # general text's per-token need (its mean could cancel out)
    spec = MaskSpec("contrastive-attribution", 1 / width, "ffn-channels", params={"lam": 1.0})
    plus, minus = build_pair_masks(lw, a, b, g, spec=spec)
    assert pruned_channels(plus, 0) == {3} and pruned_channels(minus, 0) == {7}
    spec0 = MaskSpec("contrastive-attribution", 1 / width, "ffn-channels", params={"lam": 0.0})
    assert pruned_channels(build_pair_masks(lw, a, b, g, spec=spec0)[0], 0) == {9}  # unprotected: 9 goes
    # swapping the personas swaps the masks
    minus2, plus2 = build_pair_masks(lw, b, a, g, spec=spec)
    assert all(torch.equal(plus[n], plus2[n]) and torch.equal(minus[n], minus2[n]) for n in plus)


def test_ties_are_broken_by_weight_then_index_and_builds_are_deterministic(lw):
    zero = [attr_stats(lw, 1) for _ in range(3)]
    for s in zero:  # every channel scores the same: |W| column sums decide, then the index
        for k, g in s.items():
            s[k] = GroupStats(g.tokens, torch.zeros_like(g.sum), g.sumsq, torch.zeros_like(g.sumabs), g.samples,
                              g.norm_sum, g.norm_sumsq)
    spec = MaskSpec("contrastive-attribution", 0.25, "ffn-channels")
    first = build_pair_masks(lw, *zero, spec=spec)
    again = build_pair_masks(lw, *zero, spec=spec)
    assert all(torch.equal(x[n], y[n]) for x, y in zip(first, again) for n in x)
    down = lw.tensors["model.layers.0.mlp.down_proj"].abs().float().sum(0)
    k = n_pruned(down.numel(), 0.25)
    assert pruned_channels(first[0], 0) == set(torch.argsort(down)[:k].tolist())


def test_refuses_weight_granularities_and_missing_statistics(lw):
    with pytest.raises(ValueError, match="ffn-channels"):
        MaskSpec("contrastive-attribution", 0.1)
    from persona_core.run.units import mask_specs

    with pytest.raises(ValueError, match="add ffn-channels"):
        mask_specs(["contrastive-attribution"], [0.1], ["unstructured"])
    mixed = mask_specs(["contrastive-penalty", "contrastive-attribution"], [0.1], ["unstructured", "ffn-channels"])
    assert sorted((s.method, s.granularity) for s in mixed) == [
        ("contrastive-attribution", "ffn-channels"), ("contrastive-penalty", "ffn-channels"),
        ("contrastive-penalty", "unstructured")]
    from test_masks import random_stats

    plain = [random_stats(lw.groups, s) for s in (1, 2, 3)]
    with pytest.raises(KeyError, match="mlp_attr"):
        build_pair_masks(lw, *plain, spec=MaskSpec("contrastive-attribution", 0.1, "ffn-channels"))
    assert METHODS["contrastive-attribution"].reads == ATTRIBUTION


def test_attribution_statistics_round_trip_through_the_store(tiny, tmp_path):
    from persona_core.calib.recorder import calibrate_persona
    from persona_core.catalog import load_catalog
    from persona_core.calib.parts import write_stats
    from persona_core.calib.stored import read_persona_stats
    from persona_core.store.store import open_store

    store = open_store(str(tmp_path))
    p = load_catalog("builtin")["introvert"]
    config = CalibConfig(max_length=48, attribution=True)
    stats = calibrate_persona(tiny, p, config)[0]
    write_stats(store, stats, calib_config=config.to_dict())
    back = read_persona_stats(store, tiny.key, p.id, p.content_hash, config.hash)
    key = (1, ATTRIBUTION)
    assert back.groups[key].tokens == stats.groups[key].tokens
    assert torch.equal(back.groups[key].sum, stats.groups[key].sum)
