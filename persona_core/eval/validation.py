"""What settings are chosen on: validation statements, validation separation, general-text perplexity.

Anything that picks a setting (the steering layer and coefficient here; a
sparsity or strength under a perplexity budget in the budget search) must see
calibration or validation data only. This module is that data's one door:

* `validation_statements`: a seeded split of a persona's *calibration*
  statements (never its evaluation statements, nor any text equal to one of
  the pair's evaluation statements).
* `validation_separation`: a pair's separation on those statements, with each
  side's model state given as a context-manager factory (a steering hook, a
  mask swap, ...), so any method's candidate setting can be scored.
* `text_windows` / `window_perplexity` / `perplexity_ratio`: perplexity on a fixed
  number of fixed-length windows, spread evenly over a text file (WikiText-2
  ``valid.txt`` for choices, ``test.txt`` for reported figures) or the built-in
  text when none is named.

Everything here is written against `persona_core.eval.scorer.Scorer` (the engine implements it)
and leaves the model's weights and hooks as it found them. `text_key` is the one comparison of
texts that keeps held-out texts out (here, in few-shot examples and in learned masks' data).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

from persona_core.calib.general_text import load_general_text
from persona_core.catalog import Persona
from persona_core.eval.estimates import pairwise_auc
from persona_core.eval.scorer import Scorer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STATEMENT_QUESTION = "Describe yourself in one sentence."  # the question statements answer (metrics too)

State = Callable[[], ContextManager]  # puts the model in one side's state for the block


def text_key(text: str) -> str:
    """A text as compared when held-out texts are kept out: case- and whitespace-insensitive."""
    return " ".join(text.casefold().split())


def validation_statements(persona: Persona, n: int, seed: int = 0, exclude: Sequence[str] = ()) -> list[str]:
    """At most n of `persona`'s calibration statements, chosen by a seeded hash (stable as statements
    are added); texts equal to an evaluation statement of the persona or in `exclude` never qualify."""
    banned = {text_key(t) for t in (*persona.evaluation, *exclude)}
    pool = list(dict.fromkeys(t for t in persona.calibration if text_key(t) not in banned))
    rank = lambda s: hashlib.sha256(f"validation\x00{seed}\x00{s}".encode()).hexdigest()  # noqa: E731
    return sorted(pool, key=rank)[:n]


def statement_scores(ev: Scorer, statements: Sequence[str], system: str | None = None) -> list[float]:
    """Mean token log-prob of each statement as the answer to the statement question (shared prefix)."""
    if not statements:
        return []
    prefix = ev.encode(ev.prompt(system, STATEMENT_QUESTION))
    conts = ev.encode_many(statements, continuation=True)
    return [lp.mean().item() if lp.numel() else 0.0 for lp in ev.prefix_logprobs(prefix, conts)]


def validation_separation(ev: Scorer, a: Persona, b: Persona, state_a: State | None = None,
                          state_b: State | None = None, *, n: int = 16, seed: int = 0,
                          system_a: str | None = None, system_b: str | None = None) -> float:
    """Separation of the pair on validation statements: AUC_A + AUC_B - 1, where AUC_A is how
    often A's state gives A's validation statements a higher mean log-prob than B's."""
    va = validation_statements(a, n, seed, exclude=b.evaluation)
    vb = validation_statements(b, n, seed, exclude=a.evaluation)
    if not va or not vb:
        raise ValueError(f"validation separation of {a.id!r}/{b.id!r}: no calibration statements to validate on")
    none = contextlib.nullcontext
    with (state_a or none)():
        sa = statement_scores(ev, va + vb, system_a)
    with (state_b or none)():
        sb = statement_scores(ev, vb + va, system_b)
    return pairwise_auc(sa[: len(va)], sa[len(va):])[0] + pairwise_auc(sb[: len(vb)], sb[len(vb):])[0] - 1


# ---------------------------------------------------------------------------- general text


def _read_text(source: str | None) -> str:
    """The text behind a general-text spec (`persona_core.calib.general_text`; None: the built-in held-out text)."""
    return load_general_text(source).text


_WINDOWS: dict[tuple, list[list[int]]] = {}


def text_windows(tokenizer: PreTrainedTokenizerBase, source: str | None, window: int, count: int) -> list[list[int]]:
    """`count` windows of `window` tokens spread evenly over a general text (any spec of
    `persona_core.calib.general_text`: a file, ``builtin:general``, ``wikitext-2-valid``, a URL, an
    ``hf:`` dataset; None: the built-in held-out text). Fewer when the text is short."""
    key = (id(tokenizer), load_general_text(source).sha256, window, count)
    if key not in _WINDOWS:
        ids = tokenizer(_read_text(source), add_special_tokens=False)["input_ids"]
        total = len(ids) // window
        if total == 0:
            if len(ids) < 2:
                raise ValueError(f"general text {source or 'built-in'} is too short to score")
            out = [ids]
        else:
            step = max(1, total // count)
            out = [ids[i * window * step: i * window * step + window] for i in range(min(count, total))]
        _WINDOWS[key] = out
    return _WINDOWS[key]


def lead_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before any text (Gemma, Llama: ``<bos>``; GPT-2-style
    tokenizers such as SmolLM2's: none). A window cut from the middle of a text gets them too: a
    model trained with a BOS token is far off without one, and that would inflate its dense perplexity."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return list(with_special[:n]) if n > 0 and with_special[n:] == plain else []


def window_nlls(ev: Scorer, windows: Sequence[list[int]], system: str | None = None) -> list[tuple[float, int]]:
    """(NLL, scored tokens) of each window (its first token is context only, after the tokenizer's
    leading special tokens); with `system`, its text precedes every window."""
    prefix = lead_ids(ev.tokenizer)
    if system:  # the prompt (a few-shot one: ~1,000 tokens) runs once, its cache shared by every window
        prefix = prefix + ev.tokenizer(f"{system}\n\n", add_special_tokens=False)["input_ids"]
        lps = [lp[1:] for lp in ev.prefix_logprobs(prefix, windows)]  # a window's first token: context only
    else:
        lps = ev.continuation_logprobs([(prefix + w[:1], w[1:]) for w in windows])
    return [(-lp.sum().item(), len(lp)) for lp in lps]


def window_nll(ev: Scorer, windows: Sequence[list[int]], system: str | None = None) -> tuple[float, int]:
    """Total NLL and scored tokens over the windows (`window_nlls`, summed)."""
    per = window_nlls(ev, windows, system)
    return sum(nll for nll, _ in per), sum(n for _, n in per)


def window_perplexity(ev: Scorer, windows: Sequence[list[int]], system: str | None = None) -> float:
    nll, n = window_nll(ev, windows, system)
    return math.exp(nll / max(n, 1))


def perplexity_ratio(ev: Scorer, windows: Sequence[list[int]], reference: float,
                     state: State | None = None, system: str | None = None) -> float:
    """Perplexity under `state` over the dense reference perplexity of the same windows."""
    with (state or contextlib.nullcontext)():
        return window_perplexity(ev, windows, system) / reference
