"""Each metric against a hand-computed case: tiny-random-llama with a rigged lm_head."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from torch import nn

from persona_core.catalog.personas import Persona
from persona_core.eval.config import EvalConfig
from persona_core.eval.engine import Evaluator
from persona_core.eval.unit import evaluate_unit
from persona_core.eval.estimates import pairwise_auc
from persona_core.eval.judge import EndpointJudge, JudgeError, JudgeSettings, expected_number
from persona_core.eval.metrics import METRICS, agreement, answer_token_ids

VOCAB = 260


class ConstHead(nn.Module):
    """An lm_head whose logits are the same fixed vector at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, h):
        return self.logits.to(h.dtype).expand(*h.shape[:-1], -1).clone()


@pytest.fixture
def rigged():
    """A fresh tiny model whose next-token distribution never changes: byte 'a' (and 'Y') favoured."""
    from persona_core.models.loading import load_model

    loaded = load_model("tiny-random-llama", device="cpu")
    tok = loaded.tokenizer
    logits = torch.zeros(VOCAB)
    a, y = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("Y")
    logits[a], logits[y] = 1.0, 2.0
    loaded.model.lm_head = ConstHead(logits)
    return Evaluator(loaded), logits


PERSONA = Persona("p", "You love the letter a.", ("cal",), ("aaaa", "aaab"), "q")
OPPOSITE = Persona("q", "You avoid the letter a.", ("cal",), ("bbbb", "abbb"), "p")
SMALL = dict(max_statements=8, max_questions=2, max_new_tokens=6, ppl_window=64, ppl_windows=2)


def rows(table) -> dict[tuple[str, str], float]:
    return {(c, m): v for c, m, v in zip(table.column("condition").to_pylist(), table.column("metric").to_pylist(),
                                         table.column("value").to_pylist())}


def test_pairwise_auc_by_hand():
    auc, se = pairwise_auc([3.0, 2.0], [1.0, 2.0])
    assert auc == pytest.approx(3.5 / 4)  # 3>1, 3>2, 2>1, 2=2 counts half
    assert 0 < se < 0.5
    assert pairwise_auc([0.0], [1.0])[0] == 0.0
    assert math.isnan(pairwise_auc([], [1.0])[0])


def test_agreement_renormalises_over_the_two_answers():
    p = agreement(torch.log(torch.tensor([0.3, 0.3])), torch.log(torch.tensor([0.1, 0.1])),
                  torch.tensor([True, False]))
    assert p.tolist() == pytest.approx([0.75, 0.25])


def test_answer_tokens_skip_bare_space(tiny):
    tok = tiny.tokenizer
    yes = answer_token_ids(tok, "Yes")
    assert yes == [tok.convert_tokens_to_ids("Y"), tok.convert_tokens_to_ids("y")]  # " Yes" starts with a space token
    assert not set(yes) & set(answer_token_ids(tok, "No"))


def test_statement_preference_by_hand(rigged):
    ev, logits = rigged
    cfg = EvalConfig(conditions=("dense", "dense+prompt"), metrics=("statement-preference",), **SMALL)
    r = rows(evaluate_unit(ev, PERSONA, OPPOSITE, None, None, cfg))
    # mean log-prob of a statement = mean logit of its bytes - logZ: own 1, .75; other 0, .25
    assert r[("dense", "statement-preference")] == pytest.approx(1.0)
    assert r[("dense", "statement-margin")] == pytest.approx((1 + 0.75) / 2 - (0 + 0.25) / 2, abs=1e-5)
    assert r[("dense+prompt", "statement-preference")] == pytest.approx(1.0)  # the head ignores the prompt


def test_yes_no_agreement_by_hand(rigged):
    ev, logits = rigged
    cfg = EvalConfig(conditions=("dense",), metrics=("yes-no-agreement",), **SMALL)
    r = rows(evaluate_unit(ev, PERSONA, OPPOSITE, None, None, cfg))
    e = math.e
    p_yes = (e**2 + 1) / (e**2 + 1 + 1 + 1)  # Yes: 'Y' (logit 2) + 'y'; No: 'N' + 'n'
    assert r[("dense", "yes-no-agreement")] == pytest.approx((2 * p_yes + 2 * (1 - p_yes)) / 4)
    assert p_yes > 0.7


def test_perplexity_by_hand(rigged):
    ev, logits = rigged
    cfg = EvalConfig(conditions=("dense", "masked"), metrics=("perplexity",), **SMALL)
    masks = {n: torch.rand(ev.model.get_submodule(n).weight.shape) > 0.5 for n in ev.prunable}
    r = rows(evaluate_unit(ev, PERSONA, OPPOSITE, masks, {"method": "random", "sparsity": 0.5}, cfg))
    # the held-out text is plain English: no 'Y'; each 'a' has log-prob 1 - logZ, others -logZ
    # windows of 64 tokens spread evenly over the text; the first token of each is context only
    from persona_core.eval.validation import text_windows

    windows = text_windows(ev.tokenizer, None, cfg.ppl_window, cfg.ppl_windows)
    assert len(windows) == cfg.ppl_windows and all(len(w) == 64 for w in windows)
    scored = [t for w in windows for t in w[1:]]
    log_z = torch.logsumexp(logits, 0).item()
    nll = sum(log_z - logits[t].item() for t in scored) / len(scored)
    assert r[("dense", "perplexity")] == pytest.approx(math.exp(nll), rel=1e-5)
    assert r[("masked", "perplexity-ratio")] == pytest.approx(1.0, abs=1e-6)  # the head ignores the mask


def test_perplexity_windows_open_with_the_tokenizers_bos():
    """A tokenizer that puts <bos> before text (Gemma, Llama) gets it before every window, and
    before the persona text when there is one; one that puts nothing (SmolLM2, GPT-2) gets nothing."""
    from tokenizers import processors

    from persona_core.models.tiny import byte_tokenizer
    from persona_core.eval.validation import lead_ids, window_nll

    plain = byte_tokenizer()
    assert lead_ids(plain) == []
    with_bos = byte_tokenizer()
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    assert with_bos("ab")["input_ids"][0] == bos
    assert lead_ids(with_bos) == [bos]

    class Recorder:
        def __init__(self, tokenizer):
            self.tokenizer, self.pairs = tokenizer, []

        def continuation_logprobs(self, pairs):
            self.pairs += pairs
            return [torch.zeros(len(cont)) for _, cont in pairs]

        def prefix_logprobs(self, prefix, conts):  # one shared prompt: every window after it
            self.pairs += [(prefix, c) for c in conts]
            return [torch.ones(len(c)) for c in conts]

    windows = [[10, 11, 12], [20, 21]]
    for tok, lead in ((plain, []), (with_bos, [bos])):
        ev = Recorder(tok)
        assert window_nll(ev, windows) == (0.0, 3)  # the first token of a window is context only
        system = tok("Be kind.\n\n", add_special_tokens=False)["input_ids"]
        assert window_nll(ev, windows, "Be kind.") == (-3.0, 3)  # ...and its log-prob after the prompt dropped
        assert ev.pairs == [(lead + [10], [11, 12]), (lead + [20], [21]),
                            (lead + system, [10, 11, 12]), (lead + system, [20, 21])]


def test_roleplay_fidelity_by_hand(rigged):
    ev, logits = rigged
    cfg = EvalConfig(conditions=("dense", "dense+prompt"), metrics=("roleplay-fidelity",), **SMALL)
    r = rows(evaluate_unit(ev, PERSONA, OPPOSITE, None, None, cfg))
    # greedy in-role answers are 'YYYYYY' (logit 2); every token costs logZ - 2 under any condition
    nll = torch.logsumexp(logits, 0).item() - 2.0
    assert r[("dense", "roleplay-nll")] == pytest.approx(nll, rel=1e-5)
    assert r[("dense", "roleplay-fidelity")] == pytest.approx(0.0, abs=1e-6)
    assert r[("dense+prompt", "roleplay-fidelity")] == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------------------- judge


def test_expected_number():
    lp = {"70": math.log(0.5), " 90": math.log(0.25), "x": math.log(0.25), "300": -0.1}
    assert expected_number(lp) == pytest.approx((70 * 0.5 + 90 * 0.25) / 0.75)
    with pytest.raises(JudgeError):
        expected_number({"hello": 0.0})


@pytest.fixture
def judge_server():
    """An OpenAI-compatible /chat/completions on 127.0.0.1 answering 70 (p=.5) or 90 (p=.25)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            top = [{"token": "70", "logprob": math.log(0.5)}, {"token": "90", "logprob": math.log(0.25)},
                   {"token": "I", "logprob": math.log(0.25)}]
            reply = {"choices": [{"message": {"role": "assistant", "content": "70"},
                                  "logprobs": {"content": [{"token": "70", "logprob": top[0]["logprob"],
                                                            "top_logprobs": top}]}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", seen
    server.shutdown()


def test_endpoint_judge(judge_server, monkeypatch):
    url, seen = judge_server
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    judge = EndpointJudge(url, "judge-model", api_key_env="TEST_JUDGE_KEY")
    assert judge.score("A pirate.", "Hi?", "Arr!") == pytest.approx(230 / 3)
    path, body, auth = seen[0]
    assert path == "/v1/chat/completions" and body["logprobs"] and body["max_tokens"] == 1
    assert "A pirate." in body["messages"][0]["content"] and auth == "Bearer sk-test"


def test_judge_metric_through_evaluate_unit(judge_server, tiny):
    url, seen = judge_server
    assert not METRICS["judge"].default
    cfg = EvalConfig(conditions=("dense",), metrics=("judge",), judge=JudgeSettings(url=url), **SMALL)
    r = rows(evaluate_unit(Evaluator(tiny), PERSONA, OPPOSITE, None, None, cfg))
    assert r[("dense", "judge-score")] == pytest.approx(230 / 3)
    assert len(seen) == SMALL["max_questions"]


def test_judge_unreachable_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match=f"127.0.0.1:{port}"):
        EndpointJudge(f"http://127.0.0.1:{port}/v1", timeout=5).score("p", "q", "a")


class OnlyScorer:
    """A `Scorer` and nothing more: every request goes to an evaluator through the protocol's members."""

    def __init__(self, ev: Evaluator):
        self._ev = ev

    @property
    def tokenizer(self):
        return self._ev.tokenizer

    def prompt(self, system, user):
        return self._ev.prompt(system, user)

    def encode(self, text, *, continuation=False):
        return self._ev.encode(text, continuation=continuation)

    def encode_many(self, texts, *, continuation=False):
        return self._ev.encode_many(texts, continuation=continuation)

    def continuation_logprobs(self, pairs):
        return self._ev.continuation_logprobs(pairs)

    def prefix_logprobs(self, prefix, conts):
        return self._ev.prefix_logprobs(prefix, conts)

    def next_token_logprobs(self, contexts):
        return self._ev.next_token_logprobs(contexts)

    def generate(self, prompts, max_new_tokens):
        return self._ev.generate(prompts, max_new_tokens)


def test_metrics_need_only_the_scorer_protocol(rigged):
    """The engine is a Scorer; every metric scores the same through an object that is only a Scorer."""
    from persona_core.eval.metrics import MetricSettings
    from persona_core.eval.scorer import Scorer
    from persona_core.eval.scoring import prepare_metrics, score_condition

    ev, _ = rigged
    assert isinstance(ev, Scorer) and isinstance(OnlyScorer(ev), Scorer)
    cfg = EvalConfig(metrics=("statement-preference", "yes-no-agreement", "perplexity", "roleplay-fidelity",
                              "sample-generations"), **SMALL)
    assert isinstance(cfg, MetricSettings)
    ev.configure(cfg)
    for condition in ("dense", "dense+prompt", "dense+fewshot"):
        direct = score_condition(ev, PERSONA, OPPOSITE, condition, cfg, prepare_metrics(ev, PERSONA, OPPOSITE, cfg))
        only = OnlyScorer(ev)
        through = score_condition(only, PERSONA, OPPOSITE, condition, cfg,
                                  prepare_metrics(only, PERSONA, OPPOSITE, cfg))
        assert through == direct and {r["metric"] for r in direct} >= {"statement-preference", "perplexity-ratio"}


def test_metric_registry_decorator_and_errors():
    from persona_core.eval.metrics import default_metrics, metric

    assert list(METRICS) == ["statement-preference", "yes-no-agreement", "perplexity", "roleplay-fidelity",
                             "sample-generations", "judge"]
    assert default_metrics() == EvalConfig().metrics
    with pytest.raises(ValueError, match="registered twice"):
        metric("perplexity")(lambda ctx: {})
    with pytest.raises(ValueError, match=r"EvalConfig\.metrics: unknown metric 'perplexty' \(did you mean "
                                         r"'perplexity'\?\); available: statement-preference"):
        EvalConfig(metrics=("perplexty",))
    with pytest.raises(ValueError, match=r"EvalConfig\.metrics: none given"):
        EvalConfig(metrics=())
