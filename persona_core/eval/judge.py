"""The optional LLM judge: a 0-100 role-play score from the judge's number-token log-probs.

Persona-Pruner's scoring: the judge reads the persona, a question and an answer,
and is asked for one integer; instead of the sampled number, the score is the
expectation over the number tokens it would emit, weighted by their renormalised
probabilities. Two backends:

* `EndpointJudge`: any OpenAI-compatible ``/chat/completions`` endpoint that
  returns ``logprobs`` with ``top_logprobs`` (vLLM, llama.cpp server, OpenAI).
  The key, if any, is read from the environment variable named in the settings.
* `LocalJudge`: a causal LM loaded with `load_model`; the next-token
  distribution after the chat prompt. Tokenizers that split numbers into digits
  get a 0-9 rubric, rescaled to 0-100.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

import torch

from persona_core.models.loading import LoadedModel, load_model

log = logging.getLogger(__name__)

RUBRIC = (
    "You are grading how well an answer stays in character.\n"
    "Character: {persona}\n"
    "Question: {question}\n"
    "Answer: {answer}\n\n"
    "How consistent is the answer with the character's personality, values and voice? "
    "Reply with a single integer from 0 (not at all) to {top} (perfectly in character) and nothing else."
)


@dataclass(frozen=True)
class JudgeSettings:
    """Where the optional LLM judge lives: an OpenAI-compatible endpoint or a local model."""

    url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    local: str | None = None  # a model spec for `load_model` instead of an endpoint
    timeout: float = 60.0


class JudgeError(RuntimeError):
    """The judge could not be reached or gave no usable number."""


class Judge(Protocol):
    def score(self, persona: str, question: str, answer: str, rubric: str | None = None) -> float: ...


def judge_prompt(persona: str, question: str, answer: str, rubric: str | None, top: int) -> str:
    """The judge's prompt: the built-in RUBRIC, or a persona's own rubric (``{question}`` and
    ``{answer}`` placeholders; for a 0-`top` judge its 0-100 scale is restated)."""
    if not rubric:
        return RUBRIC.format(persona=persona, question=question, answer=answer, top=top)
    text = rubric.replace("{question}", question).replace("{answer}", answer)
    if top != 100:
        text += f"\n(Use the scale 0 to {top} instead: reply with one integer from 0 to {top}.)"
    return text


def expected_number(logprobs: dict[str, float], lo: int = 0, hi: int = 100) -> float:
    """Expectation of the integer tokens in [lo, hi] under their renormalised probabilities.

    Tokens that are not integers in range are ignored; probabilities of tokens
    that strip to the same number add up.
    """
    mass: dict[int, float] = {}
    for tok, lp in logprobs.items():
        text = tok.strip()
        if text.isdigit() and lo <= int(text) <= hi:
            mass[int(text)] = mass.get(int(text), 0.0) + math.exp(lp)
    total = sum(mass.values())
    if total <= 0:
        raise JudgeError(f"no number token in {lo}..{hi} among the judge's top tokens: {sorted(logprobs)[:10]}")
    return sum(k * p for k, p in mass.items()) / total


class EndpointJudge:
    def __init__(self, url: str, model: str = "", api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout

    def score(self, persona: str, question: str, answer: str, rubric: str | None = None) -> float:
        body = {"model": self.model, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20,
                "messages": [{"role": "user", "content": judge_prompt(persona, question, answer, rubric, 100)}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env or "", "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise JudgeError(f"judge endpoint {self.url}: {err}") from err
        try:
            choice = reply["choices"][0]
            content = choice.get("logprobs", {}).get("content") or []
            if content and content[0].get("top_logprobs"):
                return expected_number({t["token"]: t["logprob"] for t in content[0]["top_logprobs"]})
            text = choice["message"]["content"].strip()  # no log-probs offered: the sampled number
            return float(expected_number({text: 0.0}))
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise JudgeError(f"judge endpoint {self.url}: unexpected reply {str(reply)[:200]}") from err


class LocalJudge:
    def __init__(self, spec_or_model: str | LoadedModel) -> None:
        self.loaded = spec_or_model if isinstance(spec_or_model, LoadedModel) else load_model(spec_or_model)
        tok = self.loaded.tokenizer
        numbers: dict[int, list[int]] = {}
        for n in range(101):
            ids = tok.encode(str(n), add_special_tokens=False)
            if len(ids) == 1:
                numbers.setdefault(n, []).append(ids[0])
        self.top = 100 if 100 in numbers else 9  # digit-level tokenizers: a 0-9 rubric
        self.numbers = {n: ids for n, ids in numbers.items() if n <= self.top}
        if len(self.numbers) < 2:
            raise JudgeError(f"judge model {self.loaded.spec}: its tokenizer has no number tokens")

    @torch.no_grad()
    def score(self, persona: str, question: str, answer: str, rubric: str | None = None) -> float:
        tok, model = self.loaded.tokenizer, self.loaded.model
        text = judge_prompt(persona, question, answer, rubric, self.top)
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(text + "\nScore:")["input_ids"]
        logits = model(input_ids=torch.tensor([ids], device=self.loaded.device)).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1).cpu()
        value = expected_number({str(n): torch.logsumexp(lp[ids_], 0).item() for n, ids_ in self.numbers.items()},
                                0, self.top)
        return value * 100.0 / self.top


_JUDGES: dict[JudgeSettings, Judge] = {}


def get_judge(settings: JudgeSettings | None) -> Judge:
    """The judge for `JudgeSettings` (built once per process and settings)."""
    if settings is None:
        raise JudgeError("no judge configured: give an endpoint URL or a local model")
    if settings not in _JUDGES:
        if settings.url:
            _JUDGES[settings] = EndpointJudge(settings.url, settings.model, settings.api_key_env, settings.timeout)
        elif settings.local:
            _JUDGES[settings] = LocalJudge(settings.local)
        else:
            raise JudgeError("judge settings name neither an endpoint URL nor a local model")
    return _JUDGES[settings]
