"""Mask methods and selection: exact sparsity, N:M, channels, contrast symmetry, ties, determinism."""

from __future__ import annotations

import pytest
import torch

from persona_core.calib.stats import GroupStats
from persona_core.catalog import REFERENCE_PERSONA_ID
from persona_core.masks import allocation as A
from persona_core.masks.build import build_masks, build_pair_masks
from persona_core.masks.inputs import LinearWeights
from persona_core.masks.methods import METHODS, PERSONA, register
from persona_core.masks.select import keep_top, n_pruned
from persona_core.masks.spec import GRANULARITIES, MaskSpec, mask_key, spec_key
from persona_core.store.hashing import content_hash
from persona_core.versions import MASKS_VERSION


def random_stats(groups, seed: int, tokens: int = 40, samples: int = 4) -> dict:
    """GroupStats from random activations (channel scales vary, so methods disagree)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for grp in groups:
        scale = torch.rand(grp.in_features, generator=g, dtype=torch.float64) * 2
        x = torch.randn(samples, tokens // samples, grp.in_features, generator=g, dtype=torch.float64) * scale
        norms = x.pow(2).sum(1).sqrt()  # per sample, per channel
        flat = x.reshape(-1, grp.in_features)
        out[(grp.layer, grp.name)] = GroupStats(tokens, flat.sum(0), flat.pow(2).sum(0), flat.abs().sum(0),
                                                samples, norms.sum(0), norms.pow(2).sum(0))
    return out


@pytest.fixture(scope="module")
def lw(tiny):
    return LinearWeights.from_model(tiny)


@pytest.fixture(scope="module")
def stats(lw):
    return {"persona": random_stats(lw.groups, 1), "opposite": random_stats(lw.groups, 2),
            "general": random_stats(lw.groups, 3)}


def args_for(method: str, stats: dict) -> list:
    return [stats[role] for role in METHODS[method].needs]


def reference_keep(score: torch.Tensor, absw: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: the k best by (score desc, |W| desc, index asc): the definition, in plain Python."""
    keep = torch.zeros_like(score, dtype=torch.bool)
    for r in range(score.shape[0]):
        order = sorted(range(score.shape[1]), key=lambda j: (-float(score[r, j]), -float(absw[r, j]), j))
        keep[r, order[:k]] = True
    return keep


WEIGHT_METHODS = sorted(m for m in METHODS if not METHODS[m].reads and not METHODS[m].learned)  # the rest: MLP channels only, or learned (tests/test_learned_contrastive.py)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_unstructured_exact_sparsity_per_row(lw, stats, method, sparsity):
    out = build_pair_masks(lw, *args_for(method, stats), spec=MaskSpec(method, sparsity))
    assert len(out) == METHODS[method].sides
    for masks in out:
        assert set(masks) == set(lw.tensors)
        for name, mask in masks.items():
            assert mask.dtype == torch.bool and mask.shape == lw.tensors[name].shape
            n = mask.shape[1]
            assert (mask.shape[1] - mask.sum(1) == int(n * sparsity)).all(), name


@pytest.mark.parametrize("granularity", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "contrastive-wanda", "contrastive-penalty"])
def test_nm_exactly_n_zeros_per_group(lw, stats, granularity, method):
    n, m = map(int, granularity.split(":"))
    for masks in build_pair_masks(lw, *args_for(method, stats), spec=MaskSpec(method, n / m, granularity)):
        for name, mask in masks.items():
            zeros = (~mask).reshape(mask.shape[0], -1, m).sum(-1)
            assert (zeros == n).all(), name


@pytest.mark.parametrize("method", ["wanda", "contrastive-mean"])
def test_ffn_channels_same_fraction_every_layer_attention_untouched(lw, stats, method):
    for masks in build_pair_masks(lw, *args_for(method, stats), spec=MaskSpec(method, 0.25, "ffn-channels")):
        for g in lw.groups:
            for name in g.modules:
                mask = masks[name]
                if g.name.startswith("attn"):
                    assert mask.all()
                elif g.name == "mlp_in":
                    rows = mask.all(1)
                    assert torch.equal(rows, mask.any(1)) and int(rows.sum()) == 128 - 32
                else:
                    cols = mask.all(0)
                    assert torch.equal(cols, mask.any(0)) and int(cols.sum()) == 128 - 32
        for layer in range(lw.num_layers):
            p = f"model.layers.{layer}.mlp."
            assert torch.equal(masks[p + "up_proj"].all(1), masks[p + "down_proj"].all(0))
            assert torch.equal(masks[p + "gate_proj"], masks[p + "up_proj"])


def test_wanda_matches_plain_reference(lw, stats):
    masks = build_masks(lw, stats["persona"], spec=MaskSpec("wanda", 0.5))
    for g in lw.groups[:4]:
        rms = stats["persona"][(g.layer, g.name)].rms.float()
        for name in g.modules:
            absw = lw.tensors[name].abs().float()
            expected = reference_keep(absw * rms, absw, absw.shape[1] // 2)
            assert torch.equal(masks[name], expected), name


@pytest.mark.parametrize("method,params", [("contrastive-wanda", {}), ("contrastive-wanda", {"f": "softplus", "tau": 0.5}),
                                           ("contrastive-mean", {}), ("contrastive-penalty", {"lam": 2.0})])
def test_swapping_personas_swaps_contrastive_masks(lw, stats, method, params):
    spec = MaskSpec(method, 0.5, params=params)
    plus, minus = build_pair_masks(lw, stats["persona"], stats["opposite"], spec=spec)
    minus2, plus2 = build_pair_masks(lw, stats["opposite"], stats["persona"], spec=spec)
    for name in plus:
        assert torch.equal(plus[name], plus2[name]) and torch.equal(minus[name], minus2[name])
    differ = sum(int((plus[n] ^ minus[n]).sum()) for n in plus)
    assert differ > 0  # the two sides really are different masks


def test_contrastive_relu_zero_scores_are_filled_by_magnitude(lw, stats):
    """Where relu zeroes a channel's score, the kept set is decided by |W| then index, not arbitrarily."""
    name = lw.groups[0].modules[0]
    key = (lw.groups[0].layer, lw.groups[0].name)
    a, b = stats["persona"][key], stats["opposite"][key]
    z = (a.norm_mean - b.norm_mean) / (a.norm_var + b.norm_var + 1e-8).sqrt()
    assert (z <= 0).sum() > z.numel() // 4  # enough zero scores that ties matter at 50%
    absw = lw.tensors[name].abs().float()
    score = absw * torch.relu(z).float()
    expected = reference_keep(score, absw, absw.shape[1] // 2)
    relu = MaskSpec("contrastive-wanda", 0.5, params={"f": "relu"})
    got = build_masks(lw, stats["persona"], stats["opposite"], spec=relu)[name]
    assert torch.equal(got, expected)


def test_keep_top_ties_by_magnitude_then_index():
    score = torch.zeros(3, 6)
    absw = torch.tensor([[1., 5, 3, 5, 2, 4], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    keep = keep_top(score, 3, absw)
    assert keep[0].tolist() == [False, True, False, True, False, True]  # the 3 largest |W| (5, 5, 4)
    assert keep[1].tolist() == [True, True, True, False, False, False]  # all equal: lowest index first
    assert keep[2].tolist() == [True, True, True, False, False, False]
    score = torch.tensor([[2., 1, 1, 1, 0, 0]])
    absw = torch.tensor([[0., 1, 3, 3, 9, 9]])
    assert keep_top(score, 3, absw)[0].tolist() == [True, False, True, True, False, False]


@pytest.mark.parametrize("seed", range(6))
def test_keep_top_matches_reference_on_heavy_ties(seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 3, (7, 16), generator=g).float()
    absw = torch.randint(0, 3, (7, 16), generator=g).float()
    for k in (0, 1, 5, 8, 15, 16):
        assert torch.equal(keep_top(score, k, absw), reference_keep(score, absw, k))


def test_keep_top_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        keep_top(torch.tensor([[1.0, float("nan"), 0.5]]), 1, torch.ones(1, 3))


def test_deterministic_and_input_order_independent(lw, stats):
    spec = MaskSpec("contrastive-wanda", 0.4, params={"f": "softplus"})
    first = build_pair_masks(lw, stats["persona"], stats["opposite"], spec=spec)
    shuffled = {k: stats["persona"][k] for k in reversed(list(stats["persona"]))}
    second = build_pair_masks(lw, shuffled, stats["opposite"], spec=spec)
    for a, b in zip(first, second):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_persona_vs_general_is_the_contrast_against_general(lw, stats):
    vs = build_masks(lw, stats["persona"], stats["general"],
                     spec=MaskSpec("persona-vs-general", 0.5, params={"contrast": "contrastive-penalty",
                                                                       "options": {"lam": 3.0}}))
    direct = build_masks(lw, stats["persona"], stats["general"], spec=MaskSpec("contrastive-penalty", 0.5,
                                                                                params={"lam": 3.0}))
    assert all(torch.equal(vs[n], direct[n]) for n in vs)


def test_layer_sparsity_per_layer(lw, stats):
    masks = build_masks(lw, stats["persona"], spec=MaskSpec("wanda", 0.5, layer_sparsity=(0.25, 0.75)))
    for g in lw.groups:
        for name in g.modules:
            m = masks[name]
            assert (m.shape[1] - m.sum(1) == int(m.shape[1] * (0.25, 0.75)[g.layer])).all()


def test_spec_validation_and_hash():
    with pytest.raises(ValueError, match="unknown mask method"):
        MaskSpec("nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        MaskSpec("wanda", params={"lam": 1})
    with pytest.raises(ValueError, match="fixes sparsity"):
        MaskSpec("wanda", 0.3, "2:4")
    with pytest.raises(ValueError, match="granularity"):
        MaskSpec("wanda", 0.5, "rows")
    assert MaskSpec("contrastive-penalty", 0.5).hash == MaskSpec("contrastive-penalty", 0.5, params={"lam": 4.0}).hash
    assert MaskSpec("contrastive-penalty", 0.5).hash != MaskSpec("contrastive-penalty", 0.5, params={"lam": 2}).hash


def test_wrong_number_of_stats(lw, stats):
    with pytest.raises(ValueError, match="needs statistics for persona, opposite"):
        build_masks(lw, stats["persona"], spec=MaskSpec("contrastive-wanda", 0.5))


def test_mask_key_layout():
    assert mask_key("m-1", "wanda", 0.5, "introvert") == "masks/model=m-1/method=wanda/sparsity=0.5/introvert.safetensors"
    assert mask_key("m-1", "wanda-general", 0.3, "introvert").endswith("sparsity=0.3/general.safetensors")
    assert mask_key("m-1", "magnitude", 0.3, "x").endswith(f"/{REFERENCE_PERSONA_ID}.safetensors")
    assert "/method=wanda@2of4/" in mask_key("m-1", "wanda", 0.5, "p", "2:4")
    assert "/method=wanda@ffn-channels/" in mask_key("m-1", "wanda", 0.5, "p", "ffn-channels")
    relu = mask_key("m-1", "contrastive-wanda", 0.5, "p", params={"f": "relu"})
    assert relu != mask_key("m-1", "contrastive-wanda", 0.5, "p")
    assert mask_key("m-1", "contrastive-wanda", 0.5, "p", params={"f": "softplus"}) == \
        mask_key("m-1", "contrastive-wanda", 0.5, "p")
    assert set(GRANULARITIES) == {"unstructured", "2:4", "4:8", "ffn-channels"}


def test_register_a_method_in_one_line(lw, stats):
    try:
        @register("test-inverse-rms", needs=(PERSONA,), power=1.0)
        def inverse(absw, st, p):
            return (absw / (st[0].rms.float() ** p["power"] + 1e-6),)

        masks = build_masks(lw, stats["persona"], spec=MaskSpec("test-inverse-rms", 0.5))
        wanda = build_masks(lw, stats["persona"], spec=MaskSpec("wanda", 0.5))
        assert any(not torch.equal(masks[n], wanda[n]) for n in masks)
        with pytest.raises(ValueError, match="registered twice"):
            register("test-inverse-rms")(inverse)
    finally:
        if "test-inverse-rms" in METHODS:
            METHODS.remove("test-inverse-rms")


def test_model_and_weights_inputs_agree(tiny, lw, stats):
    a = build_masks(tiny, stats["persona"], spec=MaskSpec("wanda", 0.5))
    b = build_masks(LinearWeights.from_model(tiny, numpy=True), stats["persona"], spec=MaskSpec("wanda", 0.5))
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------------------- OWL allocation


def test_owl_sparsities_keep_the_mean_and_favour_outlier_layers(lw, stats):
    # give layer 1 a few huge weights: it has more outliers, so it is pruned less
    tensors = {n: w.clone() for n, w in lw.tensors.items()}
    for g in lw.groups:
        if g.layer == 1:
            for name in g.modules:
                tensors[name].view(-1)[::37] *= 50
    skewed = LinearWeights(lw.groups, tensors)
    sp = A.owl_sparsities(skewed, [stats["persona"]], 0.5)
    assert len(sp) == lw.num_layers == 2
    assert sum(sp) / len(sp) == pytest.approx(0.5)
    assert sp[1] == pytest.approx(0.5 - A.OWL_LAMBDA) and sp[0] == pytest.approx(0.5 + A.OWL_LAMBDA)
    # without statistics the scores are |W| alone; equal outlier ratios give the uniform sparsity
    assert A.owl_sparsities(skewed, [], 0.3)[1] < 0.3
    same = LinearWeights([g for g in lw.groups if g.layer == 0], lw.tensors)
    assert A.owl_sparsities(same, [stats["persona"]], 0.3) == (0.3,)


def test_owl_masks_prune_each_layer_at_its_allocated_sparsity(lw, stats):
    spec = MaskSpec("wanda", 0.5, allocation="owl")
    resolved = A.resolve_allocation(lw, [stats["persona"]], spec)
    assert resolved.layer_sparsity == A.owl_sparsities(lw, [stats["persona"]], 0.5)
    assert resolved.hash == spec.hash  # the request, not its resolution, names the mask
    masks = build_masks(lw, stats["persona"], spec=spec)
    for g in lw.groups:
        for name in g.modules:
            m = masks[name]
            assert (m.shape[1] - m.sum(1) == n_pruned(m.shape[1], resolved.layer_sparsity[g.layer])).all()


def test_owl_is_one_allocation_for_both_sides_of_a_pair(lw, stats):
    spec = MaskSpec("contrastive-penalty", 0.5, allocation="owl")
    plus, minus = build_pair_masks(lw, stats["persona"], stats["opposite"], spec=spec)
    minus2, plus2 = build_pair_masks(lw, stats["opposite"], stats["persona"], spec=spec)
    assert all(torch.equal(plus[n], plus2[n]) and torch.equal(minus[n], minus2[n]) for n in plus)
    assert all(plus[n].sum() == minus[n].sum() for n in plus)


def test_owl_spec_validation_key_and_hash():
    with pytest.raises(ValueError, match="unknown allocation"):
        MaskSpec("wanda", 0.5, allocation="tilted")
    with pytest.raises(ValueError, match="N:M"):
        MaskSpec("wanda", 0.5, "2:4", allocation="owl")
    uniform, owl = MaskSpec("wanda", 0.5), MaskSpec("wanda", 0.5, allocation="owl")
    assert uniform.hash != owl.hash
    # adding the allocation field left the uniform masks' hashes (and so the stored masks) as they were
    assert uniform.hash == content_hash(MASKS_VERSION, "wanda", {}, 0.5, "unstructured", None)
    assert spec_key("m-1", owl, "p") == "masks/model=m-1/method=wanda~owl/sparsity=0.5/p.safetensors"
    assert "/method=wanda@ffn-channels~owl/" in mask_key("m-1", "wanda", 0.5, "p", "ffn-channels", None, "owl")
    assert "/method=contrastive-wanda~owl+" in mask_key("m-1", "contrastive-wanda", 0.5, "p", params={"f": "relu"},
                                                         allocation="owl")
    from persona_core.run.config import parse_config  # the config checks against these very tuples

    assert parse_config("masks: {allocations: [owl], granularities: [ffn-channels]}").masks.allocations == ["owl"]


def _differ_in_layer(stats: dict, layer: int) -> dict:
    """The persona's statistics, with one layer's channel scales changed: the sides differ only there."""
    out = {}
    for key, s in stats.items():
        if key[0] == layer:
            w = torch.linspace(0.2, 3.0, s.sumsq.numel(), dtype=s.sumsq.dtype)
            s = GroupStats(s.tokens, s.sum * w.sqrt(), s.sumsq * w, s.sumabs * w.sqrt(), s.samples,
                           s.norm_sum, s.norm_sumsq)
        out[key] = s
    return out


def test_focus_prunes_only_the_layers_where_the_pair_differs(lw, stats):
    persona = stats["persona"]
    opposite = _differ_in_layer(persona, 1)
    d = A.layer_divergence(lw, persona, opposite)
    assert d[0] == 0.0 and d[1] > 0.0
    assert A.focus_sparsities(lw, [persona, opposite], 0.2) == (0.0, 0.4)  # share 0.25 of 2 layers: 1 layer
    assert A.focus_sparsities(lw, [persona, opposite], 0.2, share=1.0) == (0.2, 0.2)
    assert A.focus_sparsities(lw, [persona, opposite], 0.7) == (0.0, 0.99)  # the cap binds
    spec = MaskSpec("contrastive-penalty", 0.2, allocation="focus")
    plus, minus = build_pair_masks(lw, persona, opposite, spec=spec)
    minus2, plus2 = build_pair_masks(lw, opposite, persona, spec=spec)  # one allocation for both sides
    for g in lw.groups:
        for name in g.modules:
            for m in (plus[name], minus[name]):
                assert (m.shape[1] - m.sum(1) == n_pruned(m.shape[1], 0.4 if g.layer == 1 else 0.0)).all()
            assert torch.equal(plus[name], plus2[name]) and torch.equal(minus[name], minus2[name])
    # the two sides' masks differ in the focused layer, where their statistics differ
    assert any(not torch.equal(plus[n], minus[n]) for g in lw.groups if g.layer == 1 for n in g.modules)


def test_focus_follows_the_statistics_and_needs_a_pair(lw, stats):
    persona = stats["persona"]
    assert A.focus_sparsities(lw, [persona, _differ_in_layer(persona, 0)], 0.2) == (0.4, 0.0)
    assert A.focus_sparsities(lw, [persona, persona], 0.2) == (0.4, 0.0)  # a tie: the earlier layer
    with pytest.raises(ValueError, match="contrastive"):
        build_masks(lw, persona, spec=MaskSpec("wanda", 0.2, allocation="focus"))
    assert "/method=contrastive-penalty~focus/" in mask_key("m-1", "contrastive-penalty", 0.2, "p", allocation="focus")
    from persona_core.run.config import parse_config

    assert parse_config("masks: {allocations: [focus]}").masks.allocations == ["focus"]
