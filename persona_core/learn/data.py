"""A learned mask's data: the persona's training answers, and the general text it must not lose.

Training data (`generate_training_data`): the dense model, with the persona's description as its
system prompt, answers a set of instructions (the calibration half of the project's generic
questions plus any user-named files), greedily. Instructions held out for evaluation are removed
first, so training never sees an evaluation question. General text (`general_windows`):
WikiText-2 validation windows (an error when WikiText-2 is absent: see `persona_core.calib.general_text`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Iterable, Mapping, Sequence

from persona_core.calib.config import CalibConfig
from persona_core.calib.general_text import load_general_text, resolve_general_text
from persona_core.calib.texts import generate_replies
from persona_core.catalog import Persona, generic_questions, load_texts
from persona_core.eval.validation import text_key, text_windows
from persona_core.learn.config import DataConfig
from persona_core.models.loading import LoadedModel
from persona_core.store.hashing import content_hash

log = logging.getLogger(__name__)

GENERAL_TEXT = "wikitext-2-valid"  # the general-text term's text (a persona_core.calib.general_text spec)


def training_instructions(data: DataConfig, held_out: Iterable[str] = ()) -> list[str]:
    """The instructions a persona's training data answers: never one of `held_out` (compared
    case- and whitespace-insensitively) nor one of the project's evaluation questions."""
    pool: list[str] = list(generic_questions("calibration")) if data.builtin else []
    for spec in data.instructions:
        url, _, fieldname = spec.partition("::")
        pool.extend(load_texts(url, fieldname or "text"))
    banned = {text_key(q) for q in (*held_out, *generic_questions("evaluation"))}
    seen, out = set(), []
    for q in pool:
        n = text_key(q)
        if n and n not in banned and n not in seen:
            seen.add(n)
            out.append(q.strip())
    if not out:
        raise ValueError("no training instructions left after removing the evaluation questions")
    if len(out) > data.examples:
        rank = lambda q: hashlib.sha256(f"{data.seed}\x00{q}".encode()).hexdigest()  # noqa: E731
        keep = set(sorted(out, key=rank)[: data.examples])
        out = [q for q in out if q in keep]
    elif len(out) < data.examples:
        log.info("training data: %d instructions available, %d asked for", len(out), data.examples)
    return out


def generate_training_data(loaded: LoadedModel, persona: Persona, data: DataConfig,
                           held_out: Iterable[str] = ()) -> list[dict[str, str]]:
    """The dense model's in-role answers (description as system prompt) to the training instructions."""
    if not persona.description:
        raise ValueError(f"persona {persona.id!r}: learning a mask needs a description")
    questions = training_instructions(data, held_out)
    cfg = CalibConfig(gen_max_new_tokens=data.max_new_tokens, gen_batch_size=data.gen_batch_size)
    answers = generate_replies(loaded, persona.description, questions, cfg)
    samples = [{"question": q, "answer": a} for q, a in zip(questions, answers) if a.strip()]
    if not samples:
        raise ValueError(f"persona {persona.id!r}: the model answered nothing in role")
    return samples


def samples_hash(samples: Sequence[Mapping[str, str]]) -> str:
    return content_hash([[s["question"], s["answer"]] for s in samples])




def general_text(spec: str = GENERAL_TEXT) -> tuple[str, str]:
    """(name, source for `validation.text_windows`) of the general text (`persona_core.calib.general_text`;
    WikiText-2 validation by default, found via $PERSONA_WIKITEXT2 or ../shared/data/wikitext-2).
    `GeneralTextError` when it is absent: never a silent stand-in."""
    return spec, resolve_general_text(spec)


def general_text_record(spec: str = GENERAL_TEXT) -> dict[str, object]:
    """What a learned mask stores about its general text: spec, source, SHA-256, characters."""
    return load_general_text(general_text(spec)[1]).record() | {"spec": spec}


def general_windows(tokenizer, n: int, window: int) -> list[list[int]]:
    """`n` windows of `window` tokens spread evenly over the general text (`general_text`)."""
    return text_windows(tokenizer, general_text()[1], window, n) if n else []


def samples_to_json(samples: Sequence[Mapping[str, str]]) -> str:
    return json.dumps([{"question": s["question"], "answer": s["answer"]} for s in samples], ensure_ascii=False)


def samples_from_json(text: str) -> list[dict[str, str]]:
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(s, dict) and isinstance(s.get("question"), str)
                                             and isinstance(s.get("answer"), str) for s in data):
        raise ValueError("training data: expected a list of {question, answer} objects")
    return [{"question": s["question"], "answer": s["answer"]} for s in data]
