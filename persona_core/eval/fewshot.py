"""Retrieval-augmented prompting: the `dense+fewshot` baseline's system prompts.

The system prompt is the persona's description followed by k of its
*calibration* statements as examples of how it speaks::

    <description>

    Things you have said:
    - <statement 1>
    ...

When the scored item has a question (a yes/no question, a generic role-play
question), the k statements most similar to it by TF-IDF cosine are chosen
(ties broken by a seeded hash, so the choice is deterministic); without one
(statement preference, perplexity) a fixed seeded sample is used, the same for
every item, so its key/value cache can be computed once and reused.

Only calibration statements are ever candidates, and any text that also occurs
(compared case- and space-insensitively) in an excluded set (the evaluation
statements of the persona and of its opposite) is dropped, so an example can
never be an item the condition is scored on, even in a catalog where the sets
collide.

How many examples (`choose_k`): ``fewshot_select: fixed`` shows ``fewshot_k``;
``fewshot_select: validation`` chooses k per opposing pair, on the dense model,
among ``fewshot_ks`` and the most examples that fit, by the pair's separation on
its *validation* statements (`persona_core.eval.validation`: a seeded split of
the calibration statements, never an evaluation statement). While choosing, the
validation statements of both poles are kept out of the examples, so a candidate
k is never scored on a statement it shows; a candidate is capped at the
examples left after that split (every calibration statement that is not held out
for validation) and at what fits the context: the prompt with k examples, the
statement question and room for the longest calibration statement and an answer
of ``max_new_tokens`` within ``max_length`` tokens. Ties go to the smaller k. The
chosen k is then used with the full calibration pool, like every condition's
setting (`FewShotChoice`, result rows ``fewshot-*``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from persona_core.catalog.personas import Persona
from persona_core.eval.scorer import Scorer
from persona_core.eval.validation import (STATEMENT_QUESTION, statement_scores, text_key, validation_separation,
                                          validation_statements)


class FewShotSettings(Protocol):
    """What choosing k reads of an `EvalConfig` (config imports conditions, which import this module)."""

    fewshot_k: int
    fewshot_select: str
    fewshot_ks: tuple[int, ...]
    val_statements: int
    seed: int
    max_length: int
    max_new_tokens: int

    @property
    def hash(self) -> str: ...

log = logging.getLogger(__name__)

HEADER = "Things you have said:"
_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"fewshot\x00{seed}\x00{text}".encode()).hexdigest()


class TfIdf:
    """A small TF-IDF index (sublinear tf, smoothed idf, L2-normalised) over a fixed set of texts."""

    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)
        docs = [Counter(_words(t)) for t in self.texts]
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        self.idf = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}
        self.vectors = [self._vector(d) for d in docs]

    def _vector(self, counts: Counter) -> dict[str, float]:
        v = {w: (1.0 + math.log(c)) * self.idf.get(w, 0.0) for w, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items() if x}

    def similarities(self, query: str) -> list[float]:
        q = self._vector(Counter(_words(query)))
        return [sum(x * d.get(w, 0.0) for w, x in q.items()) for d in self.vectors]


@dataclass
class FewShot:
    """The few-shot prompts of one persona (examples drawn from its calibration statements only)."""

    persona: Persona
    k: int = 8
    seed: int = 0
    exclude: frozenset[str] = frozenset()  # normalised texts never to show (evaluation statements)
    pool: list[str] = field(init=False)
    _index: TfIdf | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"few-shot k must be >= 0, got {self.k}")
        seen, pool = set(), []
        for t in self.persona.calibration:
            n = text_key(t)
            if n and n not in self.exclude and n not in seen:
                seen.add(n)
                pool.append(t)
        self.pool = pool

    @classmethod
    def for_persona(cls, persona: Persona, opposite: Persona | None, k: int = 8, seed: int = 0,
                    exclude: Iterable[str] = ()) -> "FewShot":
        """Examples for `persona`, never any evaluation statement of it or of its opposite."""
        banned = {text_key(t) for t in persona.evaluation}
        if opposite is not None:
            banned |= {text_key(t) for t in opposite.evaluation}
        banned |= {text_key(t) for t in exclude}
        return cls(persona, k, seed, frozenset(banned))

    def examples(self, question: str | None = None) -> list[str]:
        """k calibration statements: most similar to `question` (TF-IDF), else a seeded sample."""
        if self.k == 0 or not self.pool:
            return []
        by_hash = sorted(self.pool, key=lambda t: _rank(self.seed, t))
        if question is None or not _words(question):
            return by_hash[: self.k]
        if self._index is None:
            self._index = TfIdf(by_hash)
        sims = self._index.similarities(question)
        order = sorted(range(len(by_hash)), key=lambda i: -sims[i])  # stable: ties keep the seeded order
        return [by_hash[i] for i in order[: self.k]]

    def system(self, question: str | None = None) -> str:
        """The system prompt: description plus the examples (the description alone without any)."""
        shots = self.examples(question)
        desc = self.persona.description
        if not shots:
            return desc
        lines = "\n".join(f"- {s}" for s in shots)
        return f"{desc}\n\n{HEADER}\n{lines}" if desc else f"{HEADER}\n{lines}"


# ---------------------------------------------------------------------------- how many examples

SELECTIONS = ("fixed", "validation")  # EvalConfig.fewshot_select


@dataclass(frozen=True)
class FewShotChoice:
    """The k a pair's few-shot prompts show, and how it was chosen (``fixed``: the config's k)."""

    k: int
    selection: str = "fixed"
    separation: float = math.nan  # validation separation at k (validation only)
    fit: int = -1  # the most examples a candidate could have (validation pool, context); -1: not computed
    candidates: tuple[tuple[int, float], ...] = ()  # (k, validation separation) of every candidate tried

    def rows(self) -> list[dict]:
        """Result rows recording a choice made on validation (none for a fixed k)."""
        if self.selection != "validation":
            return []
        figures = {"fewshot-k": self.k, "fewshot-val-separation": self.separation, "fewshot-k-fit": self.fit}
        return [{"metric": m, "value": float(v), "n": 1, "stderr": math.nan} for m, v in figures.items()]


def prompt_tokens(ev: Scorer, few: FewShot, k: int) -> int:
    """Tokens of the statement question under `few`'s prompt with its first k seeded examples."""
    sub = FewShot(few.persona, k, few.seed, few.exclude)
    return len(ev.encode(ev.prompt(sub.system(), STATEMENT_QUESTION)))


def examples_that_fit(ev: Scorer, few: FewShot, max_length: int, answer_tokens: int) -> int:
    """The largest k (at most the pool) whose prompt leaves room within `max_length` for the longest
    statement of the pool and an answer of `answer_tokens` (prompts grow with k: bisection)."""
    if not few.pool:
        return 0
    room = max_length - answer_tokens - max(len(ids) for ids in ev.encode_many(few.pool, continuation=True))
    lo, hi = 0, len(few.pool)
    if prompt_tokens(ev, few, 0) > room:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt_tokens(ev, few, mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def choose_k(ev: Scorer, persona: Persona, opposite: Persona | None, config: FewShotSettings, *,
             may_compute: bool = True) -> FewShotChoice:
    """The few-shot k of `persona` (and its pair) under `config` (see the module docstring).

    Chosen on the dense model and remembered per pair in the evaluator's ``fewshot_memo``;
    `may_compute=False` (a masked condition is being scored) raises when it is not chosen yet,
    rather than choosing on the masked model."""
    if config.fewshot_select == "fixed":
        return FewShotChoice(config.fewshot_k)
    pair = sorted([persona, opposite], key=lambda p: p.id) if opposite is not None else [persona]
    ident = (tuple((p.id, p.content_hash, p.evaluation_hash) for p in pair), config.hash)
    memo = getattr(ev, "fewshot_memo", None)
    if memo is not None and ident in memo:
        return memo[ident]
    if not may_compute:
        raise RuntimeError(f"few-shot k of {persona.id!r} is chosen on the dense model: choose it (choose_k) "
                           "before a mask is applied")
    masks = getattr(ev, "masks", None)
    if masks is not None:
        masks.restore()  # chosen on the dense model
    choice = _choose(ev, pair, config)
    log.info("few-shot %s: k=%d (validation separation %.3f; candidates %s; at most %d fit)",
             "/".join(p.id for p in pair), choice.k, choice.separation,
             ", ".join(f"{k}:{v:.3f}" for k, v in choice.candidates), choice.fit)
    if memo is not None:
        memo[ident] = choice
    return choice


def _choose(ev: Scorer, pair: list[Persona], config: FewShotSettings) -> FewShotChoice:
    n, seed = config.val_statements, config.seed
    if len(pair) == 2:
        a, b = pair
        val = {a.id: validation_statements(a, n, seed, exclude=b.evaluation),
               b.id: validation_statements(b, n, seed, exclude=a.evaluation)}
    else:
        a, b = pair[0], None
        val = {a.id: validation_statements(a, n, seed)}
    held = [t for v in val.values() for t in v]  # never an example while choosing
    shots = {p.id: FewShot.for_persona(p, o, 0, seed, exclude=held) for p, o in ((a, b), (b, a)) if p is not None}
    fit = min(examples_that_fit(ev, f, config.max_length, config.max_new_tokens) for f in shots.values())
    ks = sorted({k for k in config.fewshot_ks if k <= fit} | {fit})
    scored: list[tuple[int, float]] = []
    for k in ks:
        sys_of = {pid: FewShot(f.persona, k, seed, f.exclude).system() for pid, f in shots.items()}
        if b is not None:
            sep = validation_separation(ev, a, b, n=n, seed=seed, system_a=sys_of[a.id], system_b=sys_of[b.id])
        else:  # no opposite: the mean log-prob of the persona's own validation statements
            scores = statement_scores(ev, val[a.id], sys_of[a.id])
            sep = sum(scores) / max(len(scores), 1)
        scored.append((k, float(sep)))
    best_k, best = max(scored, key=lambda kv: (kv[1], -kv[0]))  # ties: the smaller k
    return FewShotChoice(best_k, "validation", best, fit, tuple(scored))
