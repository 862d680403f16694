"""The metrics: each one a function, registered in `METRICS` by the `metric` decorator.

A metric function takes a `MetricContext` (a `Scorer` with the model in the condition's
state, the persona, its opposite, the system prompt of the condition or None, the
settings, and what the metric's `prepare` computed once with the dense weights) and returns
``{row metric name: Score}``. Metrics are written against `persona_core.eval.scorer.Scorer`
and `MetricSettings` (what they read of `persona_core.eval.config.EvalConfig`), never the
engine or the config module, which both build on this one.

Registered metrics (row names in brackets):

* ``statement-preference`` [statement-preference, statement-margin]: on the
  persona's held-out statements against its opposite's, the probability that
  a persona statement gets the higher mean token log-prob (pairwise, AUC), and
  the mean log-prob margin. Separation of a pair = preference(A) + preference(B) - 1
  (see `persona_core.report.analysis.pair_separation`), 0 for the dense model without prompt.
* ``yes-no-agreement`` [yes-no-agreement]: P(matching answer) from the next-token
  probabilities of Yes / No, renormalised over the two; own statements match
  Yes, the opposite's match No.
* ``perplexity`` [perplexity, perplexity-ratio, perplexity:<text>...]: on
  `EvalConfig.ppl_windows` windows of `ppl_window` tokens spread over the general
  text `EvalConfig.ppl_text` (e.g. WikiText-2 test; default the project's held-out
  text) and any `EvalConfig.ppl_texts`, absolute and relative to the dense model
  without prompt.
* ``roleplay-fidelity`` [roleplay-nll, roleplay-fidelity]: mean NLL of answers
  the dense model gave in role (description as system prompt) to held-out
  generic questions (or the persona's own questions, e.g. persona-pruner-eval);
  fidelity = dense no-prompt NLL - this NLL (nats/token, > 0 means closer to the
  in-role model).
* ``sample-generations`` [sample-generations] (off by default): greedy answers to
  `EvalConfig.samples` held-out generic questions under the condition, kept as
  text for the report (value: how many).
* ``judge`` [judge-score] (off by default): an LLM judge's 0-100 role-play score
  of answers generated under the condition (with the persona's own rubric when it has one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import torch

from persona_core.catalog import Persona, generic_questions, load_texts
from persona_core.eval.estimates import mean_stderr, pairwise_auc, take
from persona_core.eval.fewshot import FewShot
from persona_core.eval.judge import JudgeSettings, get_judge
from persona_core.eval.scorer import Scorer
from persona_core.calib.general_text import is_dataset_file
from persona_core.eval.validation import statement_scores, text_windows, window_nll
from persona_core.registry import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

YES_NO_QUESTION = ("Is the following statement something you would say?\n\"{statement}\"\n"
                   "Answer with Yes or No.")


@dataclass(frozen=True)
class Score:
    value: float
    n: int
    stderr: float = float("nan")
    items: tuple[float, ...] | None = None  # per-item scores behind value (bootstrap intervals)
    split: int = 0  # how many leading items are the persona's own (statement-preference)
    texts: tuple[str, ...] | None = None  # generated texts (sample-generations)


@runtime_checkable
class MetricSettings(Protocol):
    """What metrics read of the evaluation config (`EvalConfig` has these fields and more)."""

    @property
    def max_statements(self) -> int: ...
    @property
    def max_questions(self) -> int: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def samples(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def ppl_window(self) -> int: ...
    @property
    def ppl_windows(self) -> int: ...
    @property
    def ppl_text(self) -> str | None: ...
    @property
    def ppl_texts(self) -> tuple[str, ...]: ...
    @property
    def judge(self) -> JudgeSettings | None: ...


@dataclass
class MetricContext:
    ev: Scorer
    persona: Persona
    opposite: Persona | None
    system: str | None  # the persona description under +prompt conditions
    config: MetricSettings
    prepared: Any = None  # what the metric's prepare() returned (dense weights, no prompt)
    fewshot: FewShot | None = None  # under dense+fewshot: examples chosen per question

    def system_for(self, question: str | None = None) -> str | None:
        """The system prompt for an item asking `question` (None: an item without a question)."""
        return self.fewshot.system(question) if self.fewshot is not None else self.system


MetricFn = Callable[[MetricContext], dict[str, Score]]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    prepare: Callable[[MetricContext], Any] | None = None  # once per persona, dense weights, no prompt
    default: bool = True  # in `default_metrics()`: what a run scores when it names none
    description: str = ""  # what it measures, in one line (`persona-jobs metrics`)


METRICS: Registry[Metric] = Registry("metric")


def metric(name: str, *, prepare: Callable[[MetricContext], Any] | None = None,
           default: bool = True, description: str | None = None) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register the function as metric `name` (a name registered twice raises); its
    `description` (default: the first line of the function's docstring) is what `persona-jobs metrics` prints."""

    def decorate(fn: MetricFn) -> MetricFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        METRICS.add(name, Metric(name, fn, prepare, default, description or (doc[0].strip() if doc else "")))
        return fn

    return decorate


# ---------------------------------------------------------------------------- answers


def agreement(lp_yes: torch.Tensor, lp_no: torch.Tensor, want_yes: torch.Tensor) -> torch.Tensor:
    """P(matching answer) renormalised over {Yes, No}, per item, from log-probs of each."""
    p_yes = torch.sigmoid(lp_yes - lp_no)  # = e^yes / (e^yes + e^no)
    return torch.where(want_yes, p_yes, 1 - p_yes)


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """First tokens that start `answer` in this tokenizer: "Yes", " Yes", "yes", " yes".

    A token counts only if its text, stripped, is a non-empty prefix of the
    answer (a bare-space token from a byte-level tokenizer does not).
    """
    ids = []
    for variant in (answer, " " + answer, answer.lower(), " " + answer.lower()):
        toks = tokenizer.encode(variant, add_special_tokens=False)
        if not toks:
            continue
        text = tokenizer.decode([toks[0]]).strip()
        if text and answer.lower().startswith(text.lower()) and toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: no token starts the answer {answer!r}")
    return ids


def _logsumexp_over(lp: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return torch.logsumexp(lp[:, ids], dim=-1)


# ---------------------------------------------------------------------------- statement-preference


def _statement_logprobs(ctx: MetricContext, statements: list[str]) -> list[float]:
    # the statement question is the same for every item: one shared prefix (its KV cache reused)
    return statement_scores(ctx.ev, statements, ctx.system_for(None))


def _sides(ctx: MetricContext) -> tuple[list[str], list[str]]:
    cfg = ctx.config
    own = take(ctx.persona.evaluation, cfg.max_statements, cfg.seed)
    other = take(ctx.opposite.evaluation, cfg.max_statements, cfg.seed) if ctx.opposite else []
    return own, other


@metric("statement-preference")
def statement_preference(ctx: MetricContext) -> dict[str, Score]:
    """P(own held-out statement scores above the opposite's) (AUC), and the mean log-prob margin."""
    own, other = _sides(ctx)
    if not own or not other:
        log.warning("statement-preference: persona %r needs held-out statements of its own and of an "
                    "opposite; skipped", ctx.persona.id)
        return {}
    scores = _statement_logprobs(ctx, own + other)
    a, b = scores[: len(own)], scores[len(own):]
    auc, auc_se = pairwise_auc(a, b)
    ma, sa = mean_stderr(a)
    mb, sb = mean_stderr(b)
    return {"statement-preference": Score(auc, len(a) * len(b), auc_se, tuple(a + b), len(a)),
            "statement-margin": Score(ma - mb, len(a) + len(b), math.hypot(sa, sb))}


# ---------------------------------------------------------------------------- yes-no-agreement


@metric("yes-no-agreement")
def yes_no_agreement(ctx: MetricContext) -> dict[str, Score]:
    """P(matching Yes/No answer) to "is this something you would say?" over both sides' statements."""
    own, other = _sides(ctx)
    items = [(s, True) for s in own] + [(s, False) for s in other]
    if not items:
        log.warning("yes-no-agreement: persona %r has no held-out statements; skipped", ctx.persona.id)
        return {}
    ev = ctx.ev
    yes, no = answer_token_ids(ev.tokenizer, "Yes"), answer_token_ids(ev.tokenizer, "No")
    if set(yes) & set(no):
        raise ValueError(f"Yes and No share first tokens {sorted(set(yes) & set(no))} in this tokenizer")
    questions = [YES_NO_QUESTION.format(statement=s) for s, _ in items]
    lp = ev.next_token_logprobs([ev.encode(ev.prompt(ctx.system_for(q), q)) for q in questions])
    want = torch.tensor([w for _, w in items])
    p = agreement(_logsumexp_over(lp, yes), _logsumexp_over(lp, no), want)
    m, se = mean_stderr(p.tolist())
    return {"yes-no-agreement": Score(m, len(items), se)}


# ---------------------------------------------------------------------------- perplexity


def _ppl_sources(config: MetricSettings) -> list[tuple[str, str | None]]:
    """(row suffix, source) of every perplexity text: the reported general text, then the extras."""
    out: list[tuple[str, str | None]] = [("", config.ppl_text)]
    for spec in config.ppl_texts:
        url, _, fieldname = spec.partition("::")
        name = url.rstrip("/").rsplit("/", 1)[-1]
        out.append((f":{name}", spec))
    return out


def _windows(ctx: MetricContext, source: str | None) -> list[list[int]]:
    cfg = ctx.config
    if source is not None and is_dataset_file(source):
        url, _, fieldname = source.partition("::")  # a dataset file: its texts joined
        text = "\n\n".join(load_texts(url, fieldname or "text"))
        ids = ctx.ev.tokenizer(text, add_special_tokens=False)["input_ids"]
        w = cfg.ppl_window
        wins = [ids[i: i + w] for i in range(0, len(ids), w) if len(ids[i: i + w]) > 1][: cfg.ppl_windows]
        if not wins:
            raise ValueError(f"perplexity text {url} is too short to score")
        return wins
    return text_windows(ctx.ev.tokenizer, source, cfg.ppl_window, cfg.ppl_windows)


def _nll_windows(ctx: MetricContext, source: str | None) -> tuple[float, int]:
    """Total NLL and token count over fixed windows of a text (same tokens under every condition)."""
    return window_nll(ctx.ev, _windows(ctx, source), ctx.system_for(None))


def prepare_perplexity(ctx: MetricContext) -> dict[str, float]:
    """Dense no-prompt perplexity of each text: the reference of the ratio."""
    refs = {}
    for suffix, source in _ppl_sources(ctx.config):
        nll, n = _nll_windows(ctx, source)
        refs[suffix] = math.exp(nll / n)
    return refs


@metric("perplexity", prepare=prepare_perplexity)
def perplexity(ctx: MetricContext) -> dict[str, Score]:
    """General-text perplexity, absolute and as a ratio to the dense model without prompt."""
    out = {}
    for suffix, source in _ppl_sources(ctx.config):
        nll, n = _nll_windows(ctx, source)
        ppl = math.exp(nll / n)
        out[f"perplexity{suffix}"] = Score(ppl, n)
        out[f"perplexity-ratio{suffix}"] = Score(ppl / ctx.prepared[suffix], n)
    return out


# ---------------------------------------------------------------------------- roleplay-fidelity


def heldout_questions(config: MetricSettings, persona: Persona | None = None) -> list[str]:
    """Questions for role-play answers: the persona's own evaluation questions when it has them
    (persona-pruner-eval), else the held-out half of the built-in questions (calibration and
    learned-mask training data come from the other half only); capped by `max_questions`."""
    pool = persona.questions if persona is not None and persona.questions else generic_questions("evaluation")
    return take(pool, config.max_questions, config.seed)


def _answer_nll(ctx: MetricContext, system: str | None, qa: list[tuple[str, str]]) -> list[float]:
    ev = ctx.ev
    pick = (lambda q: ctx.fewshot.system(q)) if ctx.fewshot is not None else (lambda q: system)  # noqa: E731
    pairs = [(ev.encode(ev.prompt(pick(q), q)), ev.encode(a, continuation=True)) for q, a in qa]
    return [-lp.mean().item() for lp in ev.continuation_logprobs(pairs)]


def prepare_roleplay(ctx: MetricContext) -> dict[str, Any]:
    """The dense model's in-role answers, and their NLL under the dense model without prompt."""
    ev, questions = ctx.ev, heldout_questions(ctx.config, ctx.persona)
    answers = ev.generate([ev.prompt(ctx.persona.description, q) for q in questions], ctx.config.max_new_tokens)
    qa = [(q, a) for q, a in zip(questions, answers) if ev.encode(a, continuation=True)]
    if not qa:
        raise ValueError(f"roleplay-fidelity: the model answered nothing in role for {ctx.persona.id!r}")
    return {"qa": qa, "dense_nll": _answer_nll(ctx, None, qa)}


@metric("roleplay-fidelity", prepare=prepare_roleplay)
def roleplay_fidelity(ctx: MetricContext) -> dict[str, Score]:
    """NLL of the dense model's in-role answers; fidelity = dense no-prompt NLL minus this NLL."""
    qa, ref = ctx.prepared["qa"], ctx.prepared["dense_nll"]
    nll = _answer_nll(ctx, ctx.system, qa)
    m, se = mean_stderr(nll)
    gains = [r - x for r, x in zip(ref, nll)]
    gain, gse = mean_stderr(gains)
    return {"roleplay-nll": Score(m, len(nll), se, items=tuple(nll)),
            "roleplay-fidelity": Score(gain, len(nll), gse, items=tuple(gains))}


# ---------------------------------------------------------------------------- sample generations


@metric("sample-generations", default=False)
def sample_generations(ctx: MetricContext) -> dict[str, Score]:
    """Greedy answers to a few held-out questions, kept as text for the report."""
    ev, questions = ctx.ev, heldout_questions(ctx.config, ctx.persona)[: ctx.config.samples]
    answers = ev.generate([ev.prompt(ctx.system_for(q), q) for q in questions], ctx.config.max_new_tokens)
    texts = tuple(f"{q}\n{a}" for q, a in zip(questions, answers))
    return {"sample-generations": Score(float(len(texts)), len(texts), texts=texts)}


# ---------------------------------------------------------------------------- judge


@metric("judge", default=False)
def judge_score(ctx: MetricContext) -> dict[str, Score]:
    """An LLM judge's 0-100 role-play score of answers generated under the condition."""
    ev, questions = ctx.ev, heldout_questions(ctx.config, ctx.persona)
    answers = ev.generate([ev.prompt(ctx.system_for(q), q) for q in questions], ctx.config.max_new_tokens)
    judge = get_judge(ctx.config.judge)
    scores = [judge.score(ctx.persona.description, q, a, ctx.persona.rubric or None)
              for q, a in zip(questions, answers)]
    m, se = mean_stderr(scores)
    return {"judge-score": Score(m, len(scores), se)}


def default_metrics() -> tuple[str, ...]:
    return tuple(m.name for m in METRICS.values() if m.default)
