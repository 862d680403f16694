"""learned-contrastive (issue 26): the objective, the pair learner along a k path, its checkpoints, the
learned steering vector, and the method in the registry and the build-masks job (tiny model)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from persona_core.masks.budget import Budget, Setting, search_path
from persona_core.masks.spec import MaskSpec

PAIR = ("introvert", "extrovert")
ROOT = Path(__file__).resolve().parents[1]
FAST = {"steps": 1, "warmup": 1, "batch": 2, "general_batch": 1}  # the learner's knobs in these tests


@pytest.fixture(scope="module")
def setup(pair_setup):
    return pair_setup  # tests/conftest.py: the tiny model, the introvert/extrovert pair, a WikiText-2 stand-in


def spec_of(sparsity=0.5, budget=None, **params):
    return MaskSpec("learned-contrastive", sparsity, params={**FAST, **params}, budget=budget)


SMALL_BUDGET = Budget(perplexity_ratio=5.0, steps=3, min_sparsity=0.1, max_sparsity=0.5, ppl_windows=2, ppl_window=32)


def learn(setup, monkeypatch, spec, a=None, b=None, **kw):
    from persona_core.learn.contrastive import learn_pair

    ev, lw, a0, b0, stats, cc, folder = setup
    monkeypatch.setenv("PERSONA_WIKITEXT2", str(folder))
    a, b = a or a0, b or b0
    return learn_pair(ev, lw, spec, [("persona", a), ("opposite", b)], [stats[a0.id], stats[b0.id]], cc, **kw)


# ---------------------------------------------------------------------------- the objective


def test_margin_and_its_gradient_match_a_hand_computation(setup):
    from persona_core.eval.objective import StatementBatch, margin, pad_id
    from persona_core.eval.validation import statement_scores
    from persona_core.learn.contrastive import UnitGate, gate_values, segments
    from persona_core.masks.inputs import LinearWeights

    ev, lw, a, b, *_ = setup
    own, other = list(a.calibration[:3]), list(b.calibration[:2])
    sa, sb = StatementBatch.of(ev, own), StatementBatch.of(ev, other)
    pad = pad_id(ev.tokenizer)
    # the margin is the evaluator's own statement score (mean token log-prob), own minus opposite
    hand = (sum(statement_scores(ev, own)) / len(own)) - (sum(statement_scores(ev, other)) / len(other))
    assert float(margin(ev.model, sa, sb, [0, 1, 2], [0, 1], pad)) == pytest.approx(hand, abs=1e-5)

    segs = segments(LinearWeights.from_model(ev.loaded), "ffn-channels")
    n = segs[-1].offset + segs[-1].width
    scores = torch.linspace(-1, 1, n, dtype=torch.float64)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    tie = torch.zeros(n)
    T = 0.5
    with UnitGate(ev.model, segs) as gate:
        s = scores.clone().requires_grad_(True)
        gate.values = gate_values(s, tie, segs, 0.5, T).float()
        (g,) = torch.autograd.grad(-margin(ev.model, sa, sb, [0, 1, 2], [0, 1], pad), s)
        # by hand: dL/dmask at the hard mask, times the surrogate's derivative sigmoid'((s - t) / T) / T
        hard = gate.values.detach().clone().requires_grad_(True)
        gate.values = hard
        loss = -margin(ev.model, sa, sb, [0, 1, 2], [0, 1], pad)
        (dmask,) = torch.autograd.grad(loss, hard)
        expected = torch.empty(n, dtype=torch.float64)
        for seg in segs:
            x = scores[seg.offset: seg.offset + seg.width]
            k = seg.k(0.5)
            top = x.topk(k + 1).values
            t = (top[k - 1] + top[k]) / 2
            sig = torch.sigmoid((x - t) / T)
            expected[seg.offset: seg.offset + seg.width] = dmask[seg.offset: seg.offset + seg.width].double() * sig * (
                1 - sig) / T
        assert torch.allclose(g, expected, rtol=1e-4, atol=1e-9)
        # and dL/dmask is the loss's slope: a central difference on two channels
        for c in (0, n - 1):
            eps = 1e-2
            vals = hard.detach().clone()
            vals[c] += eps
            gate.values = vals
            up = float(-margin(ev.model, sa, sb, [0, 1, 2], [0, 1], pad))
            vals[c] -= 2 * eps
            gate.values = vals
            down = float(-margin(ev.model, sa, sb, [0, 1, 2], [0, 1], pad))
            assert (up - down) / (2 * eps) == pytest.approx(float(dmask[c]), rel=0.05, abs=2e-4)


def test_budget_path_search_stops_at_the_first_point_over_and_picks_the_best_separation():
    seen = []

    def ppl(s: Setting) -> float:
        seen.append(s.sparsity)
        return {0.1: 1.0, 0.2: 1.05, 0.3: 1.09, 0.4: 1.2, 0.5: 1.01}[s.sparsity]

    sep = {0.1: 0.2, 0.2: 0.5, 0.3: 0.4}
    res = search_path([0.1, 0.2, 0.3, 0.4, 0.5], 1.1, ppl, lambda s: sep[s.sparsity])
    assert res.chosen == Setting(0.2) and res.within_budget  # separation is not assumed to grow along the path
    assert seen == [0.1, 0.2, 0.3, 0.4]  # the walk stops at the first point over the budget
    none = search_path([0.1, 0.2], 1.0, lambda s: 1.5, lambda s: 1.0)
    assert not none.within_budget and none.chosen == Setting(0.1) and "unreachable" in none.message


# ---------------------------------------------------------------------------- the learner


def test_learning_reaches_the_scores_only(setup, monkeypatch):
    from persona_core.learn.contrastive import initial_scores, segments

    ev = setup[0]
    before = {k: v.clone() for k, v in ev.model.state_dict().items()}
    out = learn(setup, monkeypatch, spec_of(0.5, lr=0.5))
    after = ev.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights bit-identical
    assert all(not p.requires_grad and p.grad is None for p in ev.model.parameters())
    assert out.learner.state.step == 2
    start, _ = initial_scores(setup[1], [setup[4]["introvert"], setup[4]["extrovert"]], "contrastive-wanda",
                              "ffn-channels")
    assert segments(setup[1], "ffn-channels") and not torch.equal(out.learner.state.scores.cpu(), start)


def test_bf16_steps_run_on_a_bf16_copy_and_leave_the_model_in_fp32(setup, monkeypatch):
    from persona_core.learn.contrastive import Knobs

    ev = setup[0]
    before = {k: v.clone() for k, v in ev.model.state_dict().items()}
    start = learn(setup, monkeypatch, spec_of(0.5, lr=0.0)).learner.state.scores
    fp32 = learn(setup, monkeypatch, spec_of(0.5, lr=0.5))
    bf16 = learn(setup, monkeypatch, spec_of(0.5, lr=0.5, precision="bf16"))
    moved = [(out.learner.state.scores - start).flatten() for out in (fp32, bf16)]
    assert moved[1].abs().sum() > 0  # the gate sits on the copy the steps run on: the scores learn
    assert torch.nn.functional.cosine_similarity(*moved, dim=0) > 0.9  # and learn what fp32 learns
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in ev.model.state_dict().items())
    assert fp32.learner.model is ev.model and bf16.learner.model is not ev.model
    assert {p.dtype for p in bf16.learner.model.parameters()} == {torch.bfloat16}
    for a, b in zip(fp32.learner.history, bf16.learner.history):
        for key in ("loss_0", "loss_1", "margin_0", "margin_1"):
            assert a[key] != b[key]  # bf16 arithmetic did run
            assert b[key] == pytest.approx(a[key], abs=0.05 * max(1.0, abs(a[key])))  # the same objective
    with pytest.raises(ValueError, match="precision 'fp16'"):
        Knobs.of({"precision": "fp16"})


@pytest.mark.parametrize("unit", ["ffn-channels", "input-channels"])
def test_exact_k_per_layer_and_group_for_each_unit(setup, monkeypatch, unit):
    from persona_core.learn.contrastive import segments

    lw = setup[1]
    out = learn(setup, monkeypatch, spec_of(budget=SMALL_BUDGET, unit=unit, lr=0.5))
    assert out.spec.granularity == ("ffn-channels" if unit == "ffn-channels" else "unstructured")
    segs = segments(lw, unit)
    for side in out.masks:
        assert set(side) == set(lw.tensors)
        for seg in segs:
            for name in seg.group.modules:
                cols = side[name].all(0)  # kept input columns
                assert int(cols.sum()) == seg.k(out.spec.sparsity)
                assert torch.equal(side[name], cols.expand_as(side[name]))
    for i, s in enumerate(out.points[: len(out.learner.state.figures)]):  # every snapshot of the path: exact k
        for pole in range(2):
            snap = out.learner.state.snapshots[i, pole].bool()
            assert all(int(snap[g.offset: g.offset + g.width].sum()) == g.k(s) for g in segs)


def test_zero_learning_rate_gives_the_training_free_contrastive_mask(setup, monkeypatch):
    from persona_core.masks.budgeted_build import PairSearch
    from persona_core.masks.build import build_pair_masks

    ev, lw, a, b, stats, cc, folder = setup
    for init in ("contrastive-importance", "contrastive-wanda"):  # the default init, and another
        out = learn(setup, monkeypatch, spec_of(0.5, lr=0.0, init=init))
        search = PairSearch(ev, lw, spec_of(0.5), Budget(), [("persona", a), ("opposite", b)],
                            [stats[a.id], stats[b.id]], calib_config=cc)
        free = build_pair_masks(lw, *search.fit_stats, spec=MaskSpec(init, 0.5, "ffn-channels"))
        for learned, plain in zip(out.masks, free):
            assert set(learned) == set(plain) and all(torch.equal(learned[n], plain[n]) for n in plain)
        assert out.learner.state.step == 2


def test_zero_steps_per_point_snapshots_every_point_as_the_training_free_mask(setup, monkeypatch):
    """steps = warmup = 0: every point of the path ends at step 0 and gets its own snapshot (it used to
    keep none: an all-removed mask), each exactly the init's training-free mask at that sparsity."""
    from persona_core.masks.budgeted_build import PairSearch
    from persona_core.masks.build import build_pair_masks

    ev, lw, a, b, stats, cc, folder = setup
    budget = replace(SMALL_BUDGET, perplexity_ratio=1e6)
    out = learn(setup, monkeypatch, spec_of(budget=budget, steps=0, warmup=0, init="contrastive-importance"))
    search = PairSearch(ev, lw, spec_of(0.5), Budget(), [("persona", a), ("opposite", b)], [stats[a.id], stats[b.id]],
                        calib_config=cc)
    assert out.learner.state.step == 0 and len(out.result.points) == len(budget.grid())
    for i, s in enumerate(budget.grid()):
        free = build_pair_masks(lw, *search.fit_stats, spec=MaskSpec("contrastive-importance", s, "ffn-channels"))
        for learned, plain in zip(out.learner.masks_at(i), free):
            assert all(torch.equal(learned[n], plain[n]) for n in plain)


def test_the_budgeted_mask_records_its_validation_text(setup, monkeypatch):
    out = learn(setup, monkeypatch, spec_of(budget=SMALL_BUDGET))
    meta = out.metadata()
    assert meta["budget_search"]["val_text"]["spec"] == SMALL_BUDGET.ppl_text
    assert meta["learn"]["general_text"] == meta["budget_search"]["val_text"]


def test_contrastive_importance_is_pooled_wanda_tilted_by_the_contrast(setup):
    """beta 0: both poles score |W| x the pooled RMS (Wanda on the pair's text); beta > 0 tilts each weight
    toward the pole its input leans to, by at most e^beta."""
    from persona_core.masks.methods import METHODS

    ev, lw, a, b, stats, cc, folder = setup
    from persona_core.masks.inputs import group_stats

    g = lw.groups[0]
    absw = lw.weight(g.modules[0]).abs()
    gs = group_stats([stats[a.id], stats[b.id]], (g.layer, g.name), "cpu")
    m = METHODS["contrastive-importance"]
    flat = m.fn(absw, gs, m.resolve({"beta": 0.0}))
    pooled = ((gs[0].sumsq + gs[1].sumsq) / (gs[0].tokens + gs[1].tokens)).sqrt()
    assert torch.allclose(flat[0], absw * pooled.float()) and torch.equal(flat[0], flat[1])
    plus, minus = m.fn(absw, gs, m.resolve({"beta": 2.0}))
    z = gs[0].norm_mean - gs[1].norm_mean
    lean_a = (z > 0) & (absw[0] > 0)
    assert bool((plus[0][lean_a] > minus[0][lean_a]).all())
    assert bool((plus / flat[0].clamp_min(1e-30) <= torch.e ** 2 + 1e-4)[absw > 0].all())


def test_the_k_path_is_documented_as_not_nested(setup, monkeypatch):
    out = learn(setup, monkeypatch, spec_of(budget=SMALL_BUDGET, lr=0.5))
    meta = out.metadata()
    assert meta["learn"]["nested"] is False and meta["learn"]["path"] == list(SMALL_BUDGET.grid())
    assert "not nested" in (ROOT / "docs" / "learned-masks.md").read_text()
    search = meta["budget_search"]["search"]
    assert search["chosen"]["sparsity"] == out.spec.sparsity and search["points"]
    assert all(p["separation"] is not None for p in search["points"] if p["perplexity_ratio"] <= 5.0)


def test_a_planted_evaluation_statement_in_training_data_is_dropped_and_logged(setup, monkeypatch, caplog):
    """Issue 26 (conscientiousness): a calibration statement that repeats a held-out one (here the
    opposite's evaluation statement, which the validation split never takes) is dropped from
    training with a logged count, not a failed run; the learner never sees it."""
    from persona_core.eval.objective import training_statements

    ev, lw, a, b, stats, cc, folder = setup
    leak = b.evaluation[0]
    planted = replace(a, calibration=(*a.calibration, leak.upper(), a.evaluation[1]))
    held = [*b.evaluation, *a.evaluation]
    with caplog.at_level("WARNING"):
        train = training_statements(planted, [], held, "learned-contrastive")
    assert "dropped 2 training statement(s)" in caplog.text
    assert train == list(a.calibration)  # exactly the planted ones gone, order kept
    budget = replace(SMALL_BUDGET, val_statements=1)
    out = learn(setup, monkeypatch, spec_of(budget=budget), a=planted)  # learns instead of raising LeakError
    assert out.learner.state.step == out.learner.total_steps or out.result.points


def broken_split(persona, n, seed=0, exclude=()):
    """A validation split gone wrong: it hands out evaluation statements."""
    return list(persona.evaluation[:n])


def test_a_validation_statement_that_is_an_evaluation_statement_fails_the_run(setup, monkeypatch):
    """A broken split (validation statements that the evaluation scores) stays a LeakError."""
    from persona_core.eval.objective import LeakError

    monkeypatch.setattr("persona_core.masks.budgeted_build.validation_statements", broken_split)
    with pytest.raises(LeakError, match="validation statements"):
        learn(setup, monkeypatch, spec_of(budget=replace(SMALL_BUDGET, val_statements=2)))


class Killed(Exception):
    pass


def test_resume_after_a_kill_is_bit_identical(setup, monkeypatch):
    saved: dict[str, bytes] = {}
    io = dict(owner={"identity": "u1"}, read_checkpoint=lambda: saved.get("c"),
              write_checkpoint=lambda data: saved.__setitem__("c", data), drop_checkpoint=lambda: saved.pop("c", None))

    def die_after_first_point(state):
        if state.step == 3 and not saved.get("died"):
            saved["died"] = b"1"
            raise Killed

    spec = spec_of(budget=SMALL_BUDGET, lr=0.5)
    with pytest.raises(Killed):
        learn(setup, monkeypatch, spec, on_point=die_after_first_point, **io)
    resumed = learn(setup, monkeypatch, spec, on_point=die_after_first_point, **io)
    assert resumed.resumed_from == 3
    straight = learn(setup, monkeypatch, spec)
    assert torch.equal(resumed.learner.state.scores, straight.learner.state.scores)
    assert resumed.spec == straight.spec and resumed.result.to_dict() == straight.result.to_dict()
    for x, y in zip(resumed.masks, straight.masks):
        assert all(torch.equal(x[n], y[n]) for n in y)


# ---------------------------------------------------------------------------- checkpoints (issue 24, finding 4)


def _forge(data: bytes, how: str) -> bytes:
    import json

    from safetensors.torch import load, save

    n = int.from_bytes(data[:8], "little")
    meta = dict(json.loads(data[8: 8 + n])["__metadata__"])
    tensors = load(data)
    if how == "flip-bit":
        raw = bytearray(data)
        raw[-5] ^= 0x10
        return bytes(raw)
    if how == "negate":
        tensors["scores"] = -tensors["scores"]
    elif how == "step":
        meta["step"] = "1000000"
    elif how == "shape":
        tensors = {k: v[..., :-1].contiguous() for k, v in tensors.items()}
    elif how == "nan":
        tensors["scores"][..., 0] = float("nan")
    elif how == "owner":
        meta["identity"] = "someone-else"
    if how in ("shape", "nan", "owner"):  # a digest recomputed to match: the other checks must catch it
        from persona_core.learn.checkpoint import _digest

        meta["digest"] = _digest(tensors, meta)
    return save(tensors, metadata=meta)


@pytest.mark.parametrize("how", ["negate", "flip-bit", "step", "shape", "nan", "owner"])
def test_a_bad_pair_checkpoint_is_deleted_and_learning_restarts(setup, monkeypatch, caplog, how):
    saved: dict[str, bytes] = {}
    dropped = []
    io = dict(owner={"identity": "u1"}, read_checkpoint=lambda: saved.get("c"),
              write_checkpoint=lambda data: saved.__setitem__("c", data),
              drop_checkpoint=lambda: dropped.append(saved.pop("c", None)))
    spec = spec_of(0.5, lr=0.5)

    def die(state):
        raise Killed

    with pytest.raises(Killed):
        learn(setup, monkeypatch, spec, on_point=die, **io)
    saved["c"] = _forge(saved["c"], how)
    out = learn(setup, monkeypatch, spec, **io)
    assert dropped and out.resumed_from == 0 and "refused" in caplog.text
    clean = learn(setup, monkeypatch, spec)
    for x, y in zip(out.masks, clean.masks):
        assert all(torch.equal(x[n], y[n]) for n in y)


def test_nan_during_learning_names_the_learner_not_the_statistics(setup, monkeypatch):
    from persona_core.eval.objective import Objective
    from persona_core.learn.contrastive import LearnerNaN

    real = Objective.__call__

    def nan_loss(self, model, step, side=0):
        loss, info = real(self, model, step, side)
        return loss * float("nan"), info

    monkeypatch.setattr(Objective, "__call__", nan_loss)
    with pytest.raises(LearnerNaN, match="learned-contrastive introvert/extrovert") as err:
        learn(setup, monkeypatch, spec_of(0.5))
    assert "statistic" not in str(err.value)


# ---------------------------------------------------------------------------- the learned steering vector


def test_learned_steering_vector_at_alpha_zero_equals_dense(setup):
    from persona_core.eval.objective import Objective, StatementBatch, pad_id
    from persona_core.eval.steering import LearnedSteer, learn_vector, steer
    from persona_core.eval.validation import statement_scores

    ev, lw, a, b, *_ = setup
    sa, sb = StatementBatch.of(ev, a.calibration[:4]), StatementBatch.of(ev, b.calibration[:4])
    pad = pad_id(ev.tokenizer)
    objectives = (Objective(sa, sb, [], batch=2, pad=pad), Objective(sb, sa, [], batch=2, pad=pad))
    v, history = learn_vector(ev.model, 1, objectives, LearnedSteer(steps=2, lr=0.5), 1.0)
    assert v.abs().sum() > 0 and len(history) == 2
    texts = list(a.evaluation[:3])
    dense = statement_scores(ev, texts)
    with steer(ev.model, 1, v, 0.0):
        assert statement_scores(ev, texts) == dense
    with steer(ev.model, 1, v, 1.0):
        assert statement_scores(ev, texts) != dense


def test_learned_steering_refuses_a_validation_statement_that_is_an_evaluation_statement(setup, monkeypatch):
    from persona_core.eval.config import EvalConfig
    from persona_core.eval.objective import LeakError
    from persona_core.eval.steered import learned_choice

    ev, lw, a, b, *_ = setup
    monkeypatch.setattr("persona_core.eval.steered.validation_statements", broken_split)
    with pytest.raises(LeakError, match="validation statements"):
        learned_choice(ev, a, b, EvalConfig(conditions=("dense", "dense+steer-learned")))


def test_learned_steering_drops_a_planted_duplicate_and_counts_only_it(setup, caplog):
    """dense+steer-learned's training data: a calibration statement that repeats the opposite's evaluation
    statement is dropped and counted (1), the validation statements leave without being counted as
    dropped (commit 7d1f38d), and the vector is still learned."""
    from persona_core.eval.config import EvalConfig
    from persona_core.eval.steered import learned_choice

    ev, lw, a, b, *_ = setup
    planted = replace(a, calibration=(*a.calibration, b.evaluation[0].upper()))
    cfg = EvalConfig(conditions=("dense", "dense+steer-learned"), steer_layers=(0.5,), val_statements=2)
    with caplog.at_level("WARNING"):
        vectors, choice = learned_choice(ev, planted, b, cfg)
    lines = [r.getMessage() for r in caplog.records if "dense+steer-learned training data" in r.getMessage()]
    assert len(lines) == 1 and f"of {planted.id!r}: dropped 1 training statement(s)" in lines[0]
    assert len(vectors) == 1 and all(torch.isfinite(v).all() for v in vectors.values())


def test_held_out_duplicates_are_dropped_from_training_in_order_once():
    """The shared rule of both learners (mask and steering vector): duplicates of held-out statements
    leave the training set (case/space-insensitive), the rest keep their order, repeats count once."""
    from persona_core.eval.objective import drop_held_out

    train = ["A cat.", "a  CAT.", "The dog.", "A bird.", "the dog."]
    assert drop_held_out(train, ["the DOG."], "t") == ["A cat.", "A bird."]
    assert drop_held_out(train, [], "t") == ["A cat.", "The dog.", "A bird."]


def test_dense_steer_learned_is_a_registered_opt_in_condition():
    from persona_core.eval.conditions import CONDITIONS, DEFAULT_CONDITIONS, DENSE_CONDITIONS

    c = CONDITIONS["dense+steer-learned"]
    assert c.steered and not c.masked and "dense+steer-learned" in DENSE_CONDITIONS
    assert "dense+steer-learned" not in DEFAULT_CONDITIONS


# ---------------------------------------------------------------------------- the method


def test_persona_jobs_methods_lists_the_method_with_its_parameters(capsys):
    from persona_jobs.cli import main

    assert main(["methods"]) == 0
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("learned-contrastive"))
    for knob in ("init=contrastive-importance", "unit=ffn-channels", "steps=", "lr=", "general_weight="):
        assert knob in line
    assert "persona,opposite" in line


def test_the_unit_names_the_granularity_in_the_spec_and_key():
    from persona_core.run.units import mask_specs

    specs = mask_specs(["learned-contrastive"], [0.1], ["unstructured", "ffn-channels"])
    assert [s.granularity for s in specs] == ["ffn-channels"]  # one spec: the granularity follows the unit
    specs = mask_specs(["learned-contrastive"], [0.1], ["unstructured"], {"learned-contrastive": {"unit": "input-channels"}})
    assert [s.granularity for s in specs] == ["unstructured"]
    from persona_core.learn.contrastive import Knobs

    with pytest.raises(ValueError, match="unit"):
        Knobs.of({"unit": "heads"})


@pytest.mark.slow
def test_build_masks_learns_on_the_pool_and_an_actor_kill_resumes_bit_identical(ray_cluster, tmp_path, tiny,
                                                                                  builtin_catalog, monkeypatch):
    """build-masks hands learned-contrastive units to the learner pool; a killed actor's unit resumes from its
    checkpoint on a fresh actor and stores the same masks as an uninterrupted run."""
    from persona_core.calib.config import CalibConfig
    from persona_core.calib.parts import write_stats
    from persona_core.calib.recorder import calibrate_persona
    from persona_core.masks.codec import read_mask
    from persona_core.masks.spec import spec_key
    from persona_core.run.plan import Selection, make_plan
    from persona_core.store.store import open_store
    from persona_jobs import build_masks, learn_masks
    from persona_jobs.flags import load

    text = tmp_path / "valid.txt"
    text.write_text(" ".join(f"the {w} of a river is long and the sea" for w in range(300)))
    budget = {**SMALL_BUDGET.to_dict(), "ppl_text": str(text)}
    cc = CalibConfig(max_length=64)

    def run(name: str, die: bool):
        store = open_store(str(tmp_path / name))
        for p in (builtin_catalog["introvert"], builtin_catalog["extrovert"]):
            write_stats(store, calibrate_persona(tiny, p, cc)[0], calib_config=cc.to_dict())
        if die:
            monkeypatch.setenv(learn_masks.DIE_AT_ENV, f"introvert:3:{tmp_path / 'markers'}")
        else:
            monkeypatch.delenv(learn_masks.DIE_AT_ENV, raising=False)
        overrides = {"model": "tiny-random-llama", "store": store.url, "masks.methods": ["learned-contrastive"],
                     "masks.baselines": [], "masks.budget": budget, "evaluate.enabled": False,
                     "masks.options.params": {"learned-contrastive": {**FAST, "lr": 0.5}}}
        summary = build_masks.run(make_plan(load(None, overrides), Selection(personas=PAIR)))
        assert summary.ok and summary.done == 2, summary.errors
        spec = MaskSpec("learned-contrastive", 0.0, params={**FAST, "lr": 0.5}, budget=Budget(**budget))
        return [read_mask(store, spec_key(tiny.key, spec, pid, cc.hash)) for pid in PAIR]

    killed = run("a", die=True)
    assert list((tmp_path / "markers").iterdir())  # the actor really died once
    straight = run("b", die=False)
    assert killed[0][1]["learn"]["resumed_from"] == 3 and straight[0][1]["learn"]["resumed_from"] == 0
    for (km, kmeta), (sm, smeta) in zip(killed, straight):
        assert kmeta["budget_search"]["search"] == smeta["budget_search"]["search"]
        assert all(torch.equal(km[n], sm[n]) for n in sm)


def test_the_docs_parameter_table_states_the_registry_defaults():
    import re

    from persona_core.masks.methods import METHODS

    defaults = METHODS["learned-contrastive"].defaults
    text = (ROOT / "docs" / "learned-masks.md").read_text()
    checked = set()
    for names, values in re.findall(r"^\| ((?:`learned-contrastive\.\w+`(?:, )?)+) \| ([^|]+) \|", text, re.M):
        for name, value in zip(re.findall(r"\.(\w+)`", names), [v.strip() for v in values.split(",")]):
            assert value == str(defaults[name]), f"docs/learned-masks.md: {name} {value}, registry {defaults[name]}"
            checked.add(name)
    assert checked == set(defaults)


def test_dense_steer_learned_goes_through_the_verdict_machinery(tmp_path):
    """A learned steering row set is a baseline like prompt or steering: verdicts, W/T/L column, report."""
    import pyarrow as pa

    from persona_core.eval.schema import RESULT_SCHEMA
    from persona_core.report import build_report, summary
    from persona_core.report.analysis import verdicts
    from tests.test_report import scored_results

    rows = scored_results().to_pylist()
    extra = [{**r, "condition": "dense+steer-learned"} for r in rows
             if r["condition"] == "dense+prompt" and r["metric"] in ("statement-preference", "perplexity-ratio")]
    table = pa.Table.from_pylist(rows + extra, schema=RESULT_SCHEMA)
    v = verdicts(table)
    assert "steer-learned" in set(v.baseline) and (v[v.baseline == "steer-learned"].verdict == "win").all()
    s = summary(table).set_index("setting")
    assert s.loc["contrastive-penalty s=0.3"]["vs_steer-learned"] == "2/0/0" and "steer-learned" in s.index
    assert "W/T/L vs learned steering" in build_report(table, tmp_path / "r.html").read_text()
