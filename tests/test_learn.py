"""Learned FFN-channel masks (Persona-Pruner): straight-through top-k, frozen model, resume, export."""

from __future__ import annotations

import copy

import pytest
import torch

from persona_core.catalog import Persona, generic_questions
from persona_core.learn.config import DataConfig, LearnConfig
from persona_core.learn.data import training_instructions
from persona_core.learn.distill import Example, prepare_examples, teacher_targets
from persona_core.learn.gate import ChannelGate, channels_kept, hard_topk, straight_through
from persona_core.learn.learner import LearnerState, MaskLearner, initial_scores, learn_persona
from persona_core.masks.build import build_masks
from persona_core.masks.inputs import LinearWeights
from persona_core.masks.spec import MaskSpec
from persona_core.models.loading import LoadedModel
from tests.test_masks import random_stats

PERSONA = Persona("pirate", "You are a pirate who speaks in nautical slang.")
SAMPLES = [{"question": f"Question number {i}?", "answer": f"Arr, answer {i} be on the sea."} for i in range(6)]


@pytest.fixture(scope="module")
def stats(tiny):
    return random_stats(LinearWeights.from_model(tiny).groups, 3)


def _learner(tiny, stats, **changes) -> MaskLearner:
    cfg = LearnConfig(**({"steps": 4, "batch_size": 3, "general_windows": 0, "general_weight": 0.0,
                          "max_length": 96, "lr": 0.2} | changes))
    examples = prepare_examples(tiny, PERSONA, SAMPLES, cfg)
    scores, tiebreak = initial_scores(tiny, [stats], cfg)
    return MaskLearner(tiny, examples, [], scores, tiebreak, cfg)


def test_straight_through_keeps_exactly_k_and_passes_gradients():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 20, generator=g, dtype=torch.float64, requires_grad=True)
    mask = straight_through(scores, 7, torch.zeros(3, 20), temperature=0.5)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert mask.detach().sum(1).tolist() == [7.0, 7.0, 7.0]
    assert torch.equal(mask.detach().bool(), hard_topk(scores, 7, torch.zeros(3, 20)))
    w = torch.randn(3, 20, generator=g, dtype=torch.float64)
    (mask * w).sum().backward()
    assert scores.grad is not None and bool((scores.grad != 0).all())
    # the gradient is the surrogate's: sigmoid'((s - t) / T) / T * w
    top = scores.detach().topk(8, dim=-1).values
    t = (top[:, 6:7] + top[:, 7:8]) / 2
    sig = torch.sigmoid((scores.detach() - t) / 0.5)
    torch.testing.assert_close(scores.grad, sig * (1 - sig) / 0.5 * w)


def test_hard_topk_ties_follow_the_tiebreak():
    scores = torch.zeros(1, 6, dtype=torch.float64)
    keep = hard_topk(scores, 2, torch.tensor([[0.0, 5.0, 1.0, 5.0, 0.0, 0.0]]))
    assert keep.tolist() == [[False, True, False, True, False, False]]


def test_channel_and_unit_gates_are_one_mechanism(tiny):
    """ChannelGate ([L, C] rows) and learned-contrastive's UnitGate (flat [N] slices) are the same
    InputGate: the same channel mask gives bit-identical logits, and both leave no hook behind."""
    from persona_core.learn.contrastive import UnitGate, segments
    from persona_core.learn.gate import InputGate

    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    channel = ChannelGate(tiny.model)
    unit = UnitGate(tiny.model, segments(LinearWeights.from_model(tiny), "ffn-channels"))
    assert isinstance(channel, InputGate) and isinstance(unit, InputGate)
    mask = torch.rand(channel.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    with torch.no_grad():
        dense = tiny.model(ids).logits
        with channel:
            channel.values = mask.float()
            by_channel = tiny.model(ids).logits
        with unit:
            unit.values = mask.flatten().float()
            by_unit = tiny.model(ids).logits
        after = tiny.model(ids).logits
    assert torch.equal(by_channel, by_unit) and not torch.equal(by_channel, dense)
    assert torch.equal(after, dense) and channel.values is None and unit.values is None
    assert not any(m._forward_pre_hooks for m in tiny.model.modules())


def test_gradients_reach_the_scores_and_nothing_else(tiny, stats):
    learner = _learner(tiny, stats)
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    scores0 = learner.state.scores.clone()
    learner.run()
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
    assert not torch.equal(learner.state.scores, scores0)  # the scores did learn
    assert all(int(c.sum()) == learner.k for c in learner.channels().values())
    # a loss built the learner's way has a gradient path to the scores only
    scores = learner.state.scores.detach().requires_grad_(True)
    with learner.gate:
        loss, _ = learner.loss(straight_through(scores, learner.k, learner.tiebreak, 0.5).float(), 0)
        loss.backward()
    assert scores.grad is not None and float(scores.grad.abs().sum()) > 0
    assert all(p.grad is None for p in tiny.model.parameters())


def test_an_unfrozen_model_is_refused(tiny, stats):
    model = copy.deepcopy(tiny.model)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    learner = _learner(LoadedModel(tiny.spec, tiny.key, model, tiny.tokenizer), stats)
    with pytest.raises(ValueError, match="frozen"):
        learner.run()


def test_zero_learning_rate_keeps_the_training_free_mask(tiny, stats):
    learner = _learner(tiny, stats, lr=0.0, sparsity=0.25)
    learner.run()
    expected = build_masks(tiny, stats, spec=MaskSpec("wanda", 0.25, "ffn-channels"))
    got = learner.masks()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def _toy_model(tiny) -> LoadedModel:
    """The tiny model with its MLPs and head scaled up, so that channels matter to the output."""
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.mul_(12.0)
        model.lm_head.weight.mul_(30.0)
    return LoadedModel(tiny.spec, tiny.key, model, tiny.tokenizer)


def test_learning_recovers_the_channels_the_teacher_needs(tiny):
    """Teacher: the model with a hidden half of each layer's channels; the learner, from random
    scores, finds that half (chance overlap is ~50%)."""
    toy = _toy_model(tiny)
    gate = ChannelGate(toy.model)
    layers, width = gate.shape
    k = width // 2
    g = torch.Generator().manual_seed(1)
    target = torch.zeros(layers, width, dtype=torch.bool)
    for layer in range(layers):
        target[layer, torch.randperm(width, generator=g)[:k]] = True
    texts = [torch.randint(0, 256, (24,), generator=g).tolist() for _ in range(8)]
    with gate:
        gate.values = target.float()
        examples = teacher_targets(toy.model, 0, [(t, 0, t[1:]) for t in texts], topk=260, batch=8)
    cfg = LearnConfig(sparsity=0.5, steps=20, lr=0.3, batch_size=8, temperature=0.5, general_weight=0.0,
                      general_windows=0, teacher_topk=260)
    scores = torch.randn(layers, width, generator=g, dtype=torch.float64) * 0.1
    start = hard_topk(scores, k, torch.zeros(layers, width))
    learner = MaskLearner(toy, examples, [], scores, torch.zeros(layers, width), cfg)
    learner.run()
    learned = torch.stack([learner.channels()[i] for i in range(layers)])
    overlap = float((learned & target).sum()) / (layers * k)
    chance = float((start & target).sum()) / (layers * k)
    assert chance < 0.65
    assert overlap >= 0.9, (overlap, chance, learner.history[-1])


def test_killed_learner_resumes_bit_identical(tiny, stats):
    through = _learner(tiny, stats, steps=6, checkpoint_every=2, general_weight=0.0)
    through.run()

    saved: list[bytes] = []

    class Killed(Exception):
        pass

    def checkpoint_then_die(state: LearnerState) -> None:
        saved.append(state.to_bytes({"identity": "x"}))
        if state.step == 4:
            raise Killed

    first = _learner(tiny, stats, steps=6, checkpoint_every=2, general_weight=0.0)
    with pytest.raises(Killed):
        first.run(checkpoint_then_die)
    state, meta = LearnerState.from_bytes(saved[-1])
    assert state.step == 4 and meta["identity"] == "x"
    resumed = _learner(tiny, stats, steps=6, checkpoint_every=2, general_weight=0.0)
    resumed = MaskLearner(tiny, resumed.examples, [], resumed.state.scores, resumed.tiebreak, resumed.config, state)
    resumed.run()
    for name in ("scores", "m", "v"):
        assert torch.equal(getattr(resumed.state, name), getattr(through.state, name)), name
    assert resumed.state.step == through.state.step == 6


def test_checkpoint_bytes_are_checked():
    with pytest.raises(ValueError, match="not a learner checkpoint"):
        LearnerState.from_bytes(b"garbage")


def test_learned_mask_round_trips_and_exports(tiny, stats, tmp_path):
    from transformers import AutoModelForCausalLM

    from persona_core.eval.masked import MaskedModel
    from persona_core.masks.codec import read_mask, write_mask
    from persona_core.store.store import open_store
    from persona_core.masks.export import export_pruned

    learner = _learner(tiny, stats, steps=3, lr=0.5)
    learner.run()
    masks = learner.masks()
    store = open_store(str(tmp_path / "store"))
    write_mask(store, "masks/x.safetensors", masks, {"method": "learned-with-prompt"})
    back, meta = read_mask(store, "masks/x.safetensors")
    assert back.keys() == masks.keys() and all(torch.equal(back[n], masks[n]) for n in masks)
    assert meta["method"] == "learned-with-prompt"

    out = export_pruned(tiny, back, tmp_path / "pruned")
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    assert pruned.config.intermediate_size == channels_kept(tiny.model.config.intermediate_size, 0.25)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    dense = copy.deepcopy(tiny.model)
    masked = MaskedModel(dense)
    with torch.no_grad(), masked.masked(back):
        expected = dense(ids).logits
    with torch.no_grad():
        got = pruned(ids).logits
        gate = ChannelGate(tiny.model)
        with gate:
            gate.values = torch.stack([learner.channels()[i] for i in range(gate.shape[0])]).float()
            gated = tiny.model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated, expected, rtol=1e-5, atol=1e-5)  # the learner computes what it exports


def test_training_and_evaluation_questions_never_overlap(tmp_path):
    held = ["Tell me about your favourite book.", "What is  your NAME?"]
    extra = tmp_path / "extra.txt"
    extra.write_text("what is your name?\nDescribe a storm at sea.\n" + generic_questions("evaluation")[0] + "\n")
    qs = training_instructions(DataConfig(examples=1000, instructions=(str(extra),)), held)
    norm = lambda q: " ".join(q.split()).casefold()  # noqa: E731
    banned = {norm(q) for q in held + generic_questions("evaluation")}
    assert "Describe a storm at sea." in qs
    assert not {norm(q) for q in qs} & banned
    assert set(generic_questions("calibration")) - {q for q in qs} == set()
    assert len(training_instructions(DataConfig(examples=5), held)) == 5


def test_learn_persona_refuses_leaked_training_data(tiny, stats):
    leaked = SAMPLES + [{"question": "Held out?", "answer": "no"}]
    with pytest.raises(ValueError, match="evaluation questions"):
        learn_persona(tiny, PERSONA, [stats], LearnConfig(steps=1), held_out=["held  out?"], samples=leaked)


def test_learn_persona_end_to_end(tiny, stats):
    cfg = LearnConfig(steps=2, batch_size=2, general_windows=2, general_batch=1, max_length=96)
    result = learn_persona(tiny, PERSONA, [stats], cfg, DataConfig(examples=3, max_new_tokens=6))
    assert len(result.samples) == 3
    assert result.metadata["method"] == "learned-with-prompt" and result.state.step == 2
    assert result.metadata["general_text"] in ("wikitext-2-valid", "builtin-heldout")
    assert {"persona", "general"} <= set(result.history[-1])
    kept = {int(m.all(1).sum()) for n, m in result.masks.items() if n.endswith("up_proj")}
    assert kept == {96}


def test_prompt_free_students_see_no_prompt(tiny):
    with_prompt = prepare_examples(tiny, PERSONA, SAMPLES[:1], LearnConfig())[0]
    free = prepare_examples(tiny, PERSONA, SAMPLES[:1], LearnConfig(objective="prompt-free"))[0]
    assert isinstance(free, Example) and free.targets == with_prompt.targets
    assert torch.equal(free.teacher_lp, with_prompt.teacher_lp)  # the same dense+prompt teacher
    assert len(free.ids) < len(with_prompt.ids)
    text = tiny.tokenizer.decode(free.ids)
    assert PERSONA.description not in text and PERSONA.description in tiny.tokenizer.decode(with_prompt.ids)
    assert free.ids[free.start + 1:] == free.targets


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="objective"):
        LearnConfig(objective="sideways")
    with pytest.raises(ValueError, match="unknown mask method"):
        LearnConfig(init="nope")
    with pytest.raises(ValueError, match="examples"):
        DataConfig(examples=0)


def test_a_shared_prompt_prefix_runs_once_with_the_same_loss_and_gradient(tiny, stats):
    from persona_core.learn.distill import shared_prefix

    learner = _learner(tiny, stats, batch_size=4)
    persona, _ = learner.batch(0)
    assert shared_prefix([e.ids for e in persona], [e.positions for e in persona]) >= 16
    results = []
    for share in (True, False):
        learner.share_prefix = share
        scores = learner.state.scores.detach().requires_grad_(True)
        with learner.gate:
            loss, _ = learner.loss(straight_through(scores, learner.k, learner.tiebreak, 0.5).float(), 0)
        (grad,) = torch.autograd.grad(loss, scores)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-6)
    assert float(results[0][1].abs().sum()) > 0


# ---------------------------------------------------------------------------- checkpoints are verified (issue 24.4)


def test_checkpoint_digest_owner_shape_and_step_are_checked(tiny, stats):
    from tests.test_learned_contrastive import _forge

    learner = _learner(tiny, stats, steps=2, general_weight=0.0)
    learner.run()
    good = learner.state.to_bytes({"identity": "x"})
    shape = tuple(learner.state.scores.shape)
    state, _ = LearnerState.from_bytes(good, {"identity": "x"}, shape, 2)
    assert torch.equal(state.scores, learner.state.scores.cpu())
    for how, why in (("negate", "digest"), ("flip-bit", "digest|unreadable"), ("step", "digest"),
                     ("owner", "identity"), ("shape", "shape"), ("nan", "non-finite")):
        with pytest.raises(ValueError, match=why):
            LearnerState.from_bytes(_forge(good, how), {"identity": "x"}, shape, 2)
    with pytest.raises(ValueError, match="step 2 outside"):
        LearnerState.from_bytes(good, {"identity": "x"}, shape, 1)


def test_nan_during_learning_names_the_learner(tiny, stats, monkeypatch):
    learner = _learner(tiny, stats, steps=2, general_weight=0.0)
    real = MaskLearner.loss
    monkeypatch.setattr(MaskLearner, "loss", lambda self, mask, step: (real(self, mask, step)[0] * float("nan"), {}))
    with pytest.raises(FloatingPointError, match="mask learner") as err:
        learner.run()
    assert "statistic" not in str(err.value)


@pytest.mark.parametrize("how", ["negate", "step", "nan"])
def test_learn_masks_deletes_a_bad_checkpoint_and_learns_again(tmp_path, tiny, how, caplog):
    """learn-masks' checkpoint forged (negated scores, step 1000000, NaN): refused, deleted, learned from step 0,
    the same mask as an uninterrupted run; never resumed, never a task that fails on every rerun."""
    from persona_core.catalog import load_catalog
    from persona_core.learn.task import checkpoint_key, run_task
    from persona_core.masks.codec import read_mask
    from tests.test_learn_masks_job import _store, _task
    from tests.test_learned_contrastive import _forge

    persona = load_catalog("builtin")["introvert"]
    store = _store(tmp_path, tiny, persona)
    task = _task(store, tiny, persona)
    ckey = checkpoint_key(tiny.key, persona.id, task.identity)

    class Killed(Exception):
        pass

    def die(state):
        raise Killed

    with pytest.raises(Killed):
        run_task(tiny, store, task, on_step=die)
    store.write_bytes(ckey, _forge(store.read_bytes(ckey), how))
    out = run_task(tiny, store, task)
    assert out["status"] == "done" and out["resumed_from"] == 0 and "refused" in caplog.text
    assert not store.exists(ckey)
    learned, _ = read_mask(store, task.mask_key)
    other = _store(tmp_path / "clean", tiny, persona)
    run_task(tiny, other, _task(other, tiny, persona))
    clean, _ = read_mask(other, task.mask_key)
    assert all(torch.equal(learned[n], clean[n]) for n in clean)
