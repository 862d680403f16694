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
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from persona_core.catalog.personas import Persona
from persona_core.eval.validation import text_key

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
