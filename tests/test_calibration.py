"""Calibration hooks: exact statistics, invariances, one reduction per shared input, texts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persona_core.calib.config import CalibConfig
from persona_core.calib.recorder import RESIDUAL, StatsRecorder, calibrate, calibrate_persona
from persona_core.calib.texts import batches, persona_texts, render_reply, shard_count, shard_texts
from persona_core.catalog import Persona, generic_questions
from persona_core.models.layers import decoder_layers, linear_groups
from persona_core.calib.stats import GroupStats, Shard

TEXTS = [
    "I would rather spend the evening alone with a good book.",
    "Parties drain me.",
    "x",
    "Quiet mornings are the best part of my week, and I guard them carefully from meetings.",
    "I think before I speak, sometimes for a long time.",
    "Small talk? No thanks.",
    "A long walk by myself clears my head better than any conversation could.",
]
FIELDS = ("sum", "sumsq", "sumabs", "norm_sum", "norm_sumsq")


def assert_stats_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].tokens, a[k].samples) == (b[k].tokens, b[k].samples), k
        scale = float(b[k].sumabs.max())  # float32 per-batch sums: errors relative to the magnitude
        for f in FIELDS:
            torch.testing.assert_close(getattr(a[k], f), getattr(b[k], f), rtol=1e-5, atol=1e-6 * scale,
                                       msg=lambda m: f"{k} {f}: {m}")


def direct_stats(loaded, texts: list[str], config: CalibConfig) -> dict:
    """Each text alone (no padding), every group's input captured and reduced in float64."""
    captured: dict = {}
    handles = []
    for g in linear_groups(loaded.model):
        mod = loaded.model.get_submodule(g.modules[0])
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, k=(g.layer, g.name): captured.setdefault(k, []).append(args[0][0].double())))
    for i, layer in enumerate(decoder_layers(loaded.model)[1]):  # the residual stream entering each layer
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, k=(i, RESIDUAL): captured.setdefault(k, []).append(
                (args[0] if args else kwargs["hidden_states"])[0].double()), with_kwargs=True))
    try:
        with torch.no_grad():
            for t in texts:
                ids = loaded.tokenizer(t, add_special_tokens=not config.chat_template, truncation=True,
                                       max_length=config.max_length, return_tensors="pt")["input_ids"]
                loaded.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, xs in captured.items():
        x = torch.cat(xs)
        norms = torch.stack([s.norm(dim=0) for s in xs])
        out[k] = GroupStats(x.shape[0], x.sum(0), (x * x).sum(0), x.abs().sum(0), len(xs),
                            norms.sum(0), (norms * norms).sum(0))
    return out


def test_statistics_equal_direct_computation(tiny):
    config = CalibConfig(batch_size=3, max_length=48)
    texts = [render_reply(tiny.tokenizer, t, config) for t in TEXTS]
    got = calibrate(tiny, texts, config)
    want = direct_stats(tiny, texts, config)
    assert_stats_close(got, want)
    layers = len(decoder_layers(tiny.model)[1])
    assert {k for k in got if k[1] == RESIDUAL} == {(i, RESIDUAL) for i in range(layers)}
    assert got[(0, RESIDUAL)].width == tiny.model.config.hidden_size
    first = next(iter(got.values()))
    assert first.sum.dtype == torch.float64
    lengths = [len(tiny.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert first.tokens == sum(min(n, 48) for n in lengths)  # real tokens only, truncated at max_length
    assert first.samples == len(texts)


def test_truncation_and_raw_text(tiny):
    config = CalibConfig(batch_size=4, max_length=16, chat_template=False)
    texts = [render_reply(tiny.tokenizer, t, config) for t in TEXTS]
    assert texts == TEXTS
    assert_stats_close(calibrate(tiny, texts, config), direct_stats(tiny, texts, config))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_invariant_to_padding_side_batch_size_and_sharding(tiny, data):
    texts = [render_reply(tiny.tokenizer, t, CalibConfig()) for t in TEXTS]
    reference = calibrate(tiny, texts, CalibConfig(batch_size=len(texts), sort_by_length=False))
    order = data.draw(st.permutations(range(len(texts))))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(texts) - 1), max_size=3)))
    side = data.draw(st.sampled_from(["left", "right"]))
    batch_size = data.draw(st.integers(1, 4))
    config = CalibConfig(batch_size=batch_size, sort_by_length=data.draw(st.booleans()))
    saved = tiny.tokenizer.padding_side
    tiny.tokenizer.padding_side = side
    try:
        merged = None
        for lo, hi in zip([0, *cuts], [*cuts, len(texts)]):
            part = calibrate(tiny, [texts[i] for i in order[lo:hi]], config)
            merged = part if merged is None else {k: merged[k].merge(part[k]) for k in merged}
    finally:
        tiny.tokenizer.padding_side = saved
    assert_stats_close(merged, reference)


def test_shared_inputs_are_reduced_once_per_batch(tiny):
    config = CalibConfig(batch_size=3)
    groups = linear_groups(tiny.model)
    n_linear = sum(1 for m in tiny.model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert len(groups) < n_linear  # q/k/v and gate/up share inputs
    n_batches = len(list(batches(tiny, TEXTS, config)))
    layers = len(decoder_layers(tiny.model)[1])
    with StatsRecorder(tiny) as rec:
        assert sum(len(m._forward_pre_hooks) for m in tiny.model.modules()) == len(groups) + layers
        for ids, mask in batches(tiny, TEXTS, config):
            rec.run_batch(ids, mask)
    assert rec.calls == {**{(g.layer, g.name): n_batches for g in groups},
                         **{(i, RESIDUAL): n_batches for i in range(layers)}}
    assert sum(len(m._forward_pre_hooks) for m in tiny.model.modules()) == 0  # removed on exit


def test_persona_texts_render_statements_as_replies(tiny):
    p = Persona("introvert", "You are an introvert.", ("I like quiet.", "Crowds tire me."))
    texts = persona_texts(tiny, p, CalibConfig())
    assert len(texts) == 2
    assert "<|im_start|>assistant\nI like quiet.<|im_end|>" in texts[0]
    assert "introvert" not in texts[0]  # prompt-free by default
    with_system = persona_texts(tiny, p, CalibConfig(system_prompt=True, user_prompt="Tell me about you."))
    assert "<|im_start|>system\nYou are an introvert." in with_system[0]
    assert "<|im_start|>user\nTell me about you." in with_system[0]


def test_generated_persona_answers_generic_questions(tiny):
    assert len(generic_questions()) >= 40
    p = Persona("pirate", "You are a pirate captain.", generate=True)
    config = CalibConfig(gen_questions=5, gen_max_new_tokens=3, gen_batch_size=2)
    texts = persona_texts(tiny, p, config)
    assert len(texts) == 5
    assert all("<|im_start|>assistant\n" in t for t in texts)
    assert shard_count(p, config, 2) == 3
    texts2, samples = shard_texts(tiny, p, config, Shard(1, 3, 2))
    assert [s["question"] for s in samples] == generic_questions()[2:4]
    assert texts2 == texts[2:4]  # greedy generation is reproducible
    stats, generated = calibrate_persona(tiny, p, config, Shard(2, 3, 2))
    assert generated == [{"question": generic_questions()[4], "answer": generated[0]["answer"]}]
    assert stats.persona_hash == p.content_hash and stats.calib_hash == config.hash


def test_calib_config_hash_and_validation():
    base = CalibConfig()
    assert base.hash == CalibConfig().hash
    assert dataclasses.replace(base, system_prompt=True).hash != base.hash
    assert dataclasses.replace(base, max_length=128).hash != base.hash
    with pytest.raises(ValueError, match="batch_size"):
        CalibConfig(batch_size=0)


def test_empty_texts_are_an_error(tiny):
    with pytest.raises(ValueError, match="no calibration texts"):
        calibrate(tiny, [], CalibConfig())
