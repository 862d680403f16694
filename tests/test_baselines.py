"""The dense+fewshot and dense+steer conditions in the evaluator, and the fast scoring paths."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from persona_core.calib.config import CalibConfig
from persona_core.calib.recorder import calibrate
from persona_core.catalog.personas import Persona
from persona_core.eval.config import EvalConfig
from persona_core.eval.engine import Evaluator
from persona_core.eval.steered import steering_choice
from persona_core.eval.unit import evaluate_unit
from persona_core.eval.fewshot import FewShot
from persona_core.models.layers import decoder_layers
from persona_core.models.loading import load_model
from persona_core.calib.stats import PersonaStats
from persona_core.eval.steering import MissingResidualStats, steer
from persona_core.eval.validation import statement_scores, validation_statements, window_nlls

CAL_A = tuple(f"I love quiet evening number {i} with a book." for i in range(12))
CAL_B = tuple(f"Party number {i} is where I shine with friends!" for i in range(12))
A = Persona("quiet", "You are quiet.", CAL_A, ("Silence is golden.", "I read alone."), "loud")
B = Persona("loud", "You are loud.", CAL_B, ("Crowds energise me.", "I talk to everyone."), "quiet")
CFG = EvalConfig(conditions=("dense", "dense+steer"), metrics=("statement-preference",), max_statements=4,
                 steer_layers=(0.0, 1), steer_alphas=(0.5, 2.0), val_statements=4, val_window=32, val_windows=2,
                 ppl_budget=50.0)


@pytest.fixture(scope="module")
def ev():
    return Evaluator(load_model("tiny-random-llama", device="cpu"))


@pytest.fixture(scope="module")
def stats(ev):
    cfg = CalibConfig(batch_size=4)
    return {p.id: PersonaStats(ev.model_key, p.id, p.content_hash,
                               calibrate(ev.loaded, list(p.calibration), cfg), cfg.hash) for p in (A, B)}


def rows(table):
    return {(c, m): (v, it) for c, m, v, it in zip(*(table.column(k).to_pylist()
                                                   for k in ("condition", "metric", "value", "items")))}


def test_steering_with_alpha_zero_reproduces_dense_exactly_and_hooks_go_away(ev, stats):
    stmts = list(A.evaluation + B.evaluation)
    ev.configure(CFG)
    dense = statement_scores(ev, stmts)
    v = torch.randn(ev.model.config.hidden_size)
    with steer(ev.model, 1, v, 0.0):
        zero = statement_scores(ev, stmts)
    assert zero == dense  # bit-identical
    with steer(ev.model, 1, v, 3.0):
        moved = statement_scores(ev, stmts)
    assert moved != dense
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(ev.model)[1])
    assert statement_scores(ev, stmts) == dense  # a later condition is the dense model again


def test_dense_steer_condition_records_choice_and_leaves_model_dense(ev, stats):
    t = rows(evaluate_unit(ev, A, B, None, None, CFG, stats=stats))
    layer, alpha = t[("dense+steer", "steer-layer")][0], t[("dense+steer", "steer-alpha")][0]
    assert layer in (0, 1) and alpha in (0.5, 2.0)
    assert len(t[("dense+steer", "statement-preference")][1]) == 4  # per-statement scores kept
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(ev.model)[1])
    tb = rows(evaluate_unit(ev, B, A, None, None, CFG, stats=stats))
    assert (tb[("dense+steer", "steer-layer")][0], tb[("dense+steer", "steer-alpha")][0]) == (layer, alpha)  # per pair
    after = rows(evaluate_unit(ev, A, B, None, None, dataclasses.replace(CFG, conditions=("dense",)), stats=stats))
    assert after[("dense", "statement-preference")] == t[("dense", "statement-preference")]


def test_choosing_layer_and_alpha_never_reads_evaluation_statements(ev, stats):
    ev.configure(CFG)
    _, first = steering_choice(ev, A, B, CFG, stats)
    a2 = dataclasses.replace(A, evaluation=("Completely different held-out text.", "Another one."))
    b2 = dataclasses.replace(B, evaluation=("Yet another statement.",))
    ev.steer_memo.clear()
    _, second = steering_choice(ev, a2, b2, CFG, stats)
    assert (first.layer, first.alpha, first.separation, first.ppl_ratio) == \
        (second.layer, second.alpha, second.separation, second.ppl_ratio)
    assert first.tried == second.tried


def test_missing_residual_statistics_name_what_to_recompute(ev, stats):
    old = {pid: PersonaStats(s.model_key, s.persona_id, s.persona_hash,
                             {k: g for k, g in s.groups.items() if k[1] != "residual"}, s.calib_hash)
           for pid, s in stats.items()}
    ev.steer_memo.clear()
    with pytest.raises(MissingResidualStats, match="persona 'loud'.*recompute|Recompute"):
        evaluate_unit(ev, B, A, None, None, CFG, stats=old)
    with pytest.raises(MissingResidualStats, match="'loud'"):
        evaluate_unit(ev, A, B, None, None, CFG, stats={"quiet": stats["quiet"]})


def test_fewshot_prompts_never_contain_an_evaluation_statement():
    # built to collide: calibration sets hold (re-cased, re-spaced) copies of both poles' evaluation statements
    a = Persona("a", "You are A.", ("I like tea.", "silence  is GOLDEN.", "I read alone.", "Tea at noon.",
                                    "Crowds energise me."), ("Silence is golden.", "I read alone."), "b")
    b = Persona("b", "You are B.", ("Coffee!", "i talk to everyone."), ("Crowds energise me.", "I talk to everyone."), "a")
    for p, o in ((a, b), (b, a)):
        fs = FewShot.for_persona(p, o, k=10, seed=0)
        banned = {" ".join(t.casefold().split()) for t in p.evaluation + o.evaluation}
        for question in (None, *p.evaluation, *o.evaluation, "Do you like tea?"):
            shots = fs.examples(question)
            assert not {" ".join(s.casefold().split()) for s in shots} & banned
            system = fs.system(question)
            assert system.startswith(p.description)
            assert all(t.casefold() not in system.casefold() for t in p.evaluation + o.evaluation)
    fs = FewShot.for_persona(a, b, k=2, seed=0)
    assert fs.examples("What do you drink, tea?")[0] in ("I like tea.", "Tea at noon.")  # retrieval by TF-IDF
    assert fs.examples(None) == fs.examples(None) and len(fs.examples(None)) == 2  # seeded, fixed


def test_windows_after_a_long_prompt_score_as_with_the_prompt_refed_for_each_window(ev):
    """A few-shot prompt before perplexity windows runs once (its cache reused), and where prompt and
    window exceed max_length the prompt is cut from the left exactly as the plain path cuts a context."""
    windows = [ev.tokenizer(f"Window {i} of plain general text, long enough.", add_special_tokens=False)["input_ids"]
               for i in range(5)]
    system = "You are loud. Things you have said: - Parties! " * 4
    prefix = ev.tokenizer(f"{system}\n\n", add_special_tokens=False)["input_ids"]
    for max_length in (512, len(prefix) + 20):  # the whole prompt fits; the prompt is cut (windows ~45 tokens)
        ev.configure(EvalConfig(batch_size=2, max_length=max_length))
        cached = window_nlls(ev, windows, system)
        plain = ev.continuation_logprobs([(prefix + w[:1], w[1:]) for w in windows])
        for (nll, n), lp in zip(cached, plain):
            assert n == len(lp) and nll == pytest.approx(-lp.sum().item(), rel=1e-4)
    assert max_length < len(prefix) + len(windows[0])
    ev.configure(EvalConfig())


def test_a_context_cut_to_fit_keeps_the_tokenizers_bos():
    """A few-shot prompt too long for max_length loses its oldest text, never the <bos> it opens with:
    every scoring path (plain, shared prefix, next token) sees <bos> + the prompt's tail."""
    from tokenizers import processors

    from persona_core.models.loading import LoadedModel
    from persona_core.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                 special_tokens=[("<|im_start|>", bos)])
    base = load_model("tiny-random-llama", device="cpu")
    gem = Evaluator(LoadedModel("tiny-bos", base.key, base.model, tok), device="cpu")
    assert gem.lead == [bos]
    gem.configure(EvalConfig(batch_size=2, max_length=40))
    prompt = [bos] + tok("An old example nobody reads. A recent example!", add_special_tokens=False)["input_ids"]
    conts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Window one.", "Another window here.")]
    want = [gem.continuation_logprobs([([bos] + prompt[len(prompt) - (39 - len(c)):], c)])[0] for c in conts]
    assert all(len(prompt) + len(c) > 40 for c in conts)
    for got in (gem.continuation_logprobs([(prompt, c) for c in conts]), gem.prefix_logprobs(prompt, conts)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    lost = gem.continuation_logprobs([(prompt[len(prompt) - (40 - len(conts[0])):], conts[0])])[0]
    assert not torch.allclose(lost, want[0], atol=1e-4)  # the plain left cut (no <bos>) scores otherwise
    torch.testing.assert_close(gem.next_token_logprobs([prompt * 2])[0],
                               gem.next_token_logprobs([[bos] + (prompt * 2)[-39:]])[0])


def test_prefix_cache_matches_the_plain_forward_past_a_sliding_window():
    """Gemma 3's sliding-window layers keep a window of the prefix's cache: a prompt longer than the window
    must still score every continuation as the full forward does."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from persona_core.models.loading import LoadedModel
    from persona_core.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Gemma3ForCausalLM(cfg).eval()
    gem = Evaluator(LoadedModel("tiny-gemma3", "tiny-gemma3-test", model, tok), device="cpu")
    gem.configure(EvalConfig(batch_size=3))
    prefix = gem.encode(gem.prompt("A long system prompt, far past the sliding window.", "Describe yourself."))
    conts = gem.encode_many(["Hi.", "A longer statement about myself.", "x"], continuation=True)
    assert len(prefix) > 4 * cfg.sliding_window
    fast = gem.prefix_logprobs(prefix, conts)
    gem.reuse_prefix = False
    plain = gem.prefix_logprobs(prefix, conts)
    for f, p in zip(fast, plain):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-4)


def test_validation_statements_come_from_calibration_only():
    val = validation_statements(A, 5, seed=0)
    assert len(val) == 5 and set(val) <= set(A.calibration) and not set(val) & set(A.evaluation)
    assert validation_statements(A, 5, seed=0) == val


def test_prefix_cache_reuse_and_head_on_scored_positions_match_the_plain_forward(ev):
    ev.configure(EvalConfig(batch_size=3))
    prefix = ev.encode(ev.prompt("A long system prompt with examples. " * 3, "Describe yourself."))
    conts = ev.encode_many(["Hi.", "I am a rather long statement about myself.", "x", "Medium text here."],
                           continuation=True)
    ev.reuse_prefix = True
    fast = ev.prefix_logprobs(prefix, conts)
    ev.reuse_prefix = False
    plain = ev.prefix_logprobs(prefix, conts)
    ev.reuse_prefix = True
    ids, att = ev._pad([prefix + c for c in conts])
    logits = ev._forward(ids, att).float().log_softmax(-1)  # the full model, every position
    for i, c in enumerate(conts):
        ref = logits[i, torch.arange(len(prefix) - 1, len(prefix) + len(c) - 1), torch.tensor(c)]
        torch.testing.assert_close(plain[i], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast[i], ref, rtol=1e-4, atol=1e-4)
