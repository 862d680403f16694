"""Few-shot k chosen on validation (issue 26 item 3a) and the masked+fewshot condition (item 3c)."""

from __future__ import annotations

import math

import pytest
import torch

from persona_core.catalog.personas import Persona
from persona_core.eval.config import EvalConfig
from persona_core.eval.engine import Evaluator
from persona_core.eval.fewshot import FewShot, FewShotChoice, choose_k, examples_that_fit, prompt_tokens
from persona_core.eval.unit import evaluate_unit
from persona_core.eval.validation import text_key, validation_separation, validation_statements
from persona_core.models.loading import load_model

CAL_A = tuple(f"I love quiet evening number {i} with a book." for i in range(14))
CAL_B = tuple(f"Party number {i} is where I shine with friends!" for i in range(14))
A = Persona("quiet", "You are quiet.", CAL_A, ("Silence is golden.", "I read alone.", "Tea and a book."), "loud")
B = Persona("loud", "You are loud.", CAL_B, ("Crowds energise me.", "I talk to everyone.", "More music!"), "quiet")
SELECT = EvalConfig(conditions=("dense", "dense+fewshot", "masked", "masked+fewshot"),
                    metrics=("statement-preference",), max_statements=3, val_statements=4,
                    fewshot_select="validation", fewshot_ks=(0, 1, 3, 6), max_length=2048, max_new_tokens=8)


@pytest.fixture(scope="module")
def ev():
    return Evaluator(load_model("tiny-random-llama", device="cpu"))


class Spy:
    """A Scorer that records every system prompt the choice builds (and forwards everything else)."""

    def __init__(self, ev):
        self.ev, self.systems = ev, []

    def __getattr__(self, name):
        return getattr(self.ev, name)

    def prompt(self, system, user):
        self.systems.append(system or "")
        return self.ev.prompt(system, user)


def test_default_config_keeps_its_hash_and_a_fixed_k():
    """Knobs added later do not move old results' keys; a fixed selection is the config's k, computed nothing."""
    from dataclasses import asdict

    from persona_core.store.hashing import content_hash
    from persona_core.versions import EVALUATE_VERSION

    d = {k: v for k, v in asdict(EvalConfig()).items()
         if k not in ("batch_size", "gen_batch_size", "fewshot_select", "fewshot_ks", "steer_refine")}
    assert EvalConfig().hash == content_hash(EVALUATE_VERSION, d)
    assert EvalConfig(fewshot_select="validation").hash != EvalConfig().hash
    assert EvalConfig(steer_refine=2).hash != EvalConfig().hash
    with pytest.raises(ValueError, match="steering refine must be >= 0"):
        EvalConfig(steer_refine=-1)
    assert choose_k(None, A, B, EvalConfig(fewshot_k=5)) == FewShotChoice(5)
    with pytest.raises(ValueError, match="fewshot_select must be one of fixed, validation"):
        EvalConfig(fewshot_select="test")
    with pytest.raises(ValueError, match="fewshot_ks must be integers >= 0"):
        EvalConfig(fewshot_ks=(2, -1))


def test_the_most_examples_that_fit_leave_room_for_a_statement_and_an_answer(ev):
    few = FewShot.for_persona(A, B, 0, 0)
    room = lambda k: prompt_tokens(ev, few, k)  # noqa: E731
    longest = max(len(t) for t in ev.encode_many(few.pool, continuation=True))
    limit = room(5) + longest + 8
    assert examples_that_fit(ev, few, limit, 8) == 5  # exactly room for 5
    assert examples_that_fit(ev, few, limit - 1, 8) == 4
    assert examples_that_fit(ev, few, 10_000, 8) == len(few.pool)  # every calibration statement
    assert examples_that_fit(ev, few, 4, 8) == 0


def test_k_is_the_validation_argmax_and_never_shows_a_held_out_statement(ev):
    spy = Spy(ev)
    spy.fewshot_memo = {}
    choice = choose_k(spy, A, B, SELECT)
    val = {*validation_statements(A, 4, 0, exclude=B.evaluation), *validation_statements(B, 4, 0, exclude=A.evaluation)}
    held = {text_key(t) for t in (*val, *A.evaluation, *B.evaluation)}
    shown = {text_key(line[2:]) for s in spy.systems for line in s.splitlines() if line.startswith("- ")}
    assert shown and not shown & held  # examples came from calibration minus validation only
    # the candidates: fewshot_ks up to the most that fit the validation pool (14 - 4 per pole), plus that most
    assert [k for k, _ in choice.candidates] == [0, 1, 3, 6, 10] and choice.fit == 10
    for k, sep in choice.candidates:  # each figure is the pair's validation separation with k examples
        shots = {p.id: FewShot.for_persona(p, o, k, 0, exclude=val) for p, o in ((A, B), (B, A))}
        assert sep == pytest.approx(validation_separation(ev, A, B, n=4, seed=0, system_a=shots["quiet"].system(),
                                                          system_b=shots["loud"].system()))
    best = max(sep for _, sep in choice.candidates)
    assert choice.separation == best and choice.k == min(k for k, s in choice.candidates if s == best)
    assert choose_k(spy, B, A, SELECT) is choice  # one choice per pair, remembered
    rows = {r["metric"]: r["value"] for r in choice.rows()}
    assert rows == {"fewshot-k": choice.k, "fewshot-val-separation": best, "fewshot-k-fit": 10}


def test_a_masked_condition_never_chooses_k_on_the_masked_model(ev):
    ev.fewshot_memo.clear()
    with pytest.raises(RuntimeError, match="chosen on the dense model"):
        choose_k(ev, A, B, SELECT, may_compute=False)


def test_masked_fewshot_with_a_keep_all_mask_equals_dense_fewshot(ev):
    """masked+fewshot uses the pair's k, chosen on the dense model before the mask goes on (even when the
    dense conditions are not scored in this unit): with a mask that keeps every weight it is dense+fewshot."""
    ev.fewshot_memo.clear()
    ev.dense_memo.clear()
    keep = {name: torch.ones_like(ev.model.get_submodule(name).weight, dtype=torch.bool) for name in ev.prunable}
    meta = {"method": "keep-all", "sparsity": 0.0}
    only_masked = EvalConfig(**{**SELECT.__dict__, "conditions": ("masked+fewshot",)})
    masked = evaluate_unit(ev, A, B, keep, meta, only_masked)
    ev.fewshot_memo.clear()
    full = evaluate_unit(ev, A, B, keep, meta, SELECT)

    def value(table, cond, metric):
        got = [v for c, m, v in zip(*(table.column(k).to_pylist() for k in ("condition", "metric", "value")))
               if c == cond and m == metric]
        assert len(got) == 1, (cond, metric, got)
        return got[0]

    dense = value(full, "dense+fewshot", "statement-preference")
    assert value(masked, "masked+fewshot", "statement-preference") == pytest.approx(dense, abs=1e-6)
    assert value(full, "masked+fewshot", "statement-preference") == pytest.approx(dense, abs=1e-6)
    k = value(full, "dense+fewshot", "fewshot-k")
    assert k == choose_k(ev, A, B, SELECT).k and not math.isnan(value(full, "dense+fewshot", "fewshot-val-separation"))
    assert not any(m.startswith("fewshot-") for c, m in zip(full.column("condition").to_pylist(),
                                                             full.column("metric").to_pylist()) if c != "dense+fewshot")


def test_run_config_takes_the_selection():
    from persona_core.run.config import ConfigError, parse_config

    cfg = parse_config("model: tiny-random-llama\nevaluate:\n  conditions: [dense+fewshot, masked+fewshot]\n"
                       "  options:\n    fewshot_select: validation\n    fewshot_ks: [0, 4, 8]\n", "x.yaml")
    assert cfg.evaluate.options.eval_fields()["fewshot_select"] == "validation"
    with pytest.raises(ConfigError, match="fewshot_select must be one of"):
        parse_config("model: tiny-random-llama\nevaluate:\n  options:\n    fewshot_select: best\n", "x.yaml")
