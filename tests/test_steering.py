"""Residual-stream statistics and the steering baseline: vectors, the hook, choosing L and alpha."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
import torch

from persona_core.calib.config import CalibConfig
from persona_core.calib.recorder import RESIDUAL, calibrate, calibrate_persona
from persona_core.catalog.personas import Persona
from persona_core.models.layers import decoder_layers
from persona_core.calib.parts import write_stats
from persona_core.calib.stats import PersonaStats
from persona_core.calib.stored import open_stats, read_persona_stats
from persona_core.eval.steering import (MissingResidualStats, SteerSettings, choose, residual_means, steer,
                                   steering_vectors)
from persona_core.store.store import open_store

A = Persona("calm", "You are calm.", ("I stay calm.", "Nothing rattles me.", "I breathe slowly."),
            ("Storms pass.",), "tense")
B = Persona("tense", "You are tense.", ("Everything worries me!", "I cannot relax.", "My heart races."),
            ("Deadlines haunt me.",), "calm")


def test_residual_group_round_trips_through_parquet_and_is_queryable(tiny, tmp_path):
    store = open_store(str(tmp_path / "store"))
    stats, _ = calibrate_persona(tiny, A, CalibConfig(batch_size=2))
    write_stats(store, stats)
    back = read_persona_stats(store, tiny.key, A.id)
    layers = len(decoder_layers(tiny.model)[1])
    for i in range(layers):
        torch.testing.assert_close(back[(i, RESIDUAL)].sum, stats[(i, RESIDUAL)].sum)
        assert back[(i, RESIDUAL)].tokens == stats[(i, RESIDUAL)].tokens
    table = open_stats(store).to_table(filter=pc.field("group") == RESIDUAL)
    assert table.num_rows == layers * tiny.model.config.hidden_size
    means = residual_means(back)
    assert sorted(means) == list(range(layers))


def test_old_stores_without_the_group_load_and_steering_names_what_to_recompute(tiny, tmp_path):
    store = open_store(str(tmp_path / "store"))
    groups = calibrate(tiny, list(A.calibration), CalibConfig(), residual=False)  # as calib-v1 stores were written
    old = PersonaStats(tiny.key, A.id, A.content_hash, {k: g.to("cpu") for k, g in groups.items()}, "c1")
    write_stats(store, old)
    back = read_persona_stats(store, tiny.key, A.id)  # loads: the group is simply absent
    assert back.groups and not any(name == RESIDUAL for _, name in back.groups)
    with pytest.raises(MissingResidualStats, match=rf"persona 'calm'.*stats/model={tiny.key}/persona=calm"):
        residual_means(back)


def test_steering_vector_is_the_difference_of_token_means(tiny):
    a = PersonaStats(tiny.key, A.id, "h", calibrate(tiny, list(A.calibration)), "c")
    b = PersonaStats(tiny.key, B.id, "h", calibrate(tiny, list(B.calibration)), "c")
    v = steering_vectors(a, b)
    g_a, g_b = a[(1, RESIDUAL)], b[(1, RESIDUAL)]
    torch.testing.assert_close(v[1], (g_a.sum / g_a.tokens - g_b.sum / g_b.tokens).cpu())


def test_steer_adds_alpha_v_at_the_layer_and_is_removed(tiny):
    layers = decoder_layers(tiny.model)[1]
    seen = {}
    # what the layer's first sub-module reads: the residual stream after any steering hook
    h = layers[1].input_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    ids = torch.tensor([[1, 2, 3, 4]])
    try:
        tiny.model(input_ids=ids)
        plain = seen["x"]
        v = torch.randn(tiny.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with steer(tiny.model, 1, v, 2.5):
            tiny.model(input_ids=ids)
        torch.testing.assert_close(seen["x"], plain + 2.5 * v.float())
    finally:
        h.remove()
    assert not layers[1]._forward_pre_hooks  # removed on exit
    with pytest.raises(ValueError, match="outside"):
        with steer(tiny.model, 99, v, 1.0):
            pass


def test_choose_keeps_the_best_setting_within_budget_and_stops_past_it():
    calls = []

    def evaluate(layer, alpha):  # separation grows with alpha and layer; perplexity with alpha
        calls.append((layer, alpha))
        return layer / 10 + alpha, 1.0 + 0.03 * alpha

    choice = choose(10, SteerSettings(layers=(2, 5), alphas=(1, 2, 4, 8), budget=1.10), evaluate)
    assert (choice.layer, choice.alpha) == (5, 2.0) and choice.within_budget
    assert calls == [(2, 1.0), (2, 2.0), (2, 4.0), (5, 1.0), (5, 2.0), (5, 4.0)]  # 4 is over budget: 8 skipped
    assert len(choice.tried) == 6
    none = choose(10, SteerSettings(layers=(2,), alphas=(1, 2), budget=1.01, halvings=0), evaluate)
    assert not none.within_budget and none.alpha == 1.0


def test_choose_halves_alpha_until_within_budget_when_no_grid_setting_is():
    calls = []

    def evaluate(layer, alpha):  # layer 5 costs twice the perplexity of layer 2 at the same alpha
        calls.append((layer, alpha))
        return layer / 10 + alpha, 1.0 + 0.05 * alpha * (2 if layer == 5 else 1)

    choice = choose(10, SteerSettings(layers=(2, 5), alphas=(4, 8), budget=1.10, halvings=3), evaluate)
    # grid: 4 is over budget at both layers; halved: layer 2 fits at 2, layer 5 at 1
    assert calls == [(2, 4.0), (5, 4.0), (2, 2.0), (5, 2.0), (5, 1.0)]
    assert (choice.layer, choice.alpha) == (2, 2.0) and choice.within_budget
    assert choice.ppl_ratio <= 1.10 and len(choice.tried) == 5
    never = choose(10, SteerSettings(layers=(2,), alphas=(4,), budget=1.001, halvings=2), evaluate)
    assert not never.within_budget and never.alpha == 4.0  # 2 and 1 still over: the grid's smallest, flagged
    with pytest.raises(ValueError, match="halvings"):
        SteerSettings(halvings=-1)


def test_choose_refines_alpha_at_the_budget_edge():
    calls = []

    def evaluate(layer, alpha):  # separation grows with alpha; perplexity x1.10 at alpha 1.0 exactly
        calls.append((layer, alpha))
        return alpha, 1.0 + 0.1 * alpha

    coarse = choose(10, SteerSettings(layers=(2,), alphas=(0.5, 2), budget=1.10), evaluate)
    assert coarse.alpha == 0.5 and len(calls) == 2  # refine 0: the grid as before
    calls.clear()
    fine = choose(10, SteerSettings(layers=(2,), alphas=(0.5, 2), budget=1.10, refine=3), evaluate)
    # the gap (0.5, 2) bisected: 1.25 over, 0.875 within, 1.0625 over
    assert calls == [(2, 0.5), (2, 2.0), (2, 1.25), (2, 0.875), (2, 1.0625)]
    assert fine.alpha == 0.875 and fine.within_budget and fine.ppl_ratio <= 1.10
    calls.clear()
    halved = choose(10, SteerSettings(layers=(2,), alphas=(4,), budget=1.10, halvings=3, refine=1), evaluate)
    # 4 over, halved to 2 over, 1 within (x1.10); the gap (1, 2) bisected once: 1.5 over
    assert calls == [(2, 4.0), (2, 2.0), (2, 1.0), (2, 1.5)] and halved.alpha == 1.0
    with pytest.raises(ValueError, match="refine"):
        SteerSettings(refine=-1)
