"""Distillation from the dense model: training sequences, their teacher targets, and the losses.

Teacher targets (`prepare_examples`, `prepare_general`): the dense model's next-token
distributions on every answer token, with the prompt, kept as their top-K log-probs plus the
tail's mass (the KL is computed over K + 1 outcomes: a lower bound of the full KL that is exact
when the tail is one outcome, and small enough to keep for every example). Targets are remembered
for the last few inputs, so a persona's objectives and sparsities share one teacher.

Logits are computed at scored positions only (`scored_logits`); sequences that share a long
prefix (a persona's system prompt) run it once and repeat its key/value cache over the batch
(`scored_logits_shared`: same loss and gradient up to rounding, tested).
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from persona_core.catalog.personas import Persona
# the scoring and KL pieces live with the contrastive objective (eval layer, shared with the learned steering
# vector); named here too for the learner and its tests
from persona_core.eval.objective import (Example, distill_loss, pad_sequences, scored_logits,  # noqa: F401
                                         teacher_targets)
from persona_core.eval.validation import lead_ids
from persona_core.learn.config import LearnConfig
from persona_core.models.layers import body_and_head
from persona_core.models.loading import LoadedModel
from persona_core.store.hashing import content_hash


def chat_prompt(tokenizer, system: str | None, user: str) -> str:
    """The text before the assistant's answer, with `system` as system prompt (none for None)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


MIN_SHARED_PREFIX = 16  # tokens a batch's sequences must share before the prefix runs once


def shared_prefix(seqs: Sequence[Sequence[int]], spans: Sequence[range]) -> int:
    """Length of the token prefix every sequence shares, capped so that every scored position
    (and at least one token of each sequence) lies after it."""
    if len(seqs) < 2:
        return 0
    n = min(min(len(s) for s in seqs) - 1, min(r.start for r in spans))
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return max(n, 0)


def scored_logits_shared(model: nn.Module, seqs: Sequence[Sequence[int]], spans: Sequence[range], pad: int,
                          prefix: int) -> torch.Tensor:
    """`scored_logits` for sequences sharing their first `prefix` tokens (a persona's system
    prompt): the prefix runs once and its key/value cache is repeated over the batch. Same
    numbers up to float rounding; gradients flow through the cache."""
    body, head = body_and_head(model)
    device = next(model.parameters()).device
    pre = torch.tensor([list(seqs[0][:prefix])], dtype=torch.long, device=device)
    first = body(input_ids=pre, attention_mask=torch.ones_like(pre), use_cache=True)
    cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
    cache.batch_repeat_interleave(len(seqs))
    cache_kw = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    ids, att = pad_sequences([s[prefix:] for s in seqs], pad, device)
    full = torch.cat([torch.ones((len(seqs), prefix), dtype=att.dtype, device=device), att], 1)
    position = (prefix + torch.arange(ids.shape[1], device=device)).expand(len(seqs), -1)
    hidden = body(input_ids=ids, attention_mask=full, position_ids=position, use_cache=True,
                  **{cache_kw: cache}).last_hidden_state
    rows = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(spans)]).to(device)
    cols = torch.cat([torch.tensor(list(r), dtype=torch.long) - prefix for r in spans]).to(device)
    return head(hidden[rows, cols]).float()


def prepare_examples(loaded: LoadedModel, persona: Persona, samples: Sequence[Mapping[str, str]],
                     config: LearnConfig, batch: int = 8) -> list[Example]:
    """Student sequences for `config.objective` with the dense+prompt model's answer distributions."""
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    student_system = persona.description if config.objective == "with-prompt" else None
    teacher_items, student_items = [], []
    for s in samples:
        answer = tok(s["answer"], add_special_tokens=False)["input_ids"] + eos
        answer = answer[: config.max_length // 2]
        for system, items in ((persona.description, teacher_items), (student_system, student_items)):
            ctx = tok(chat_prompt(tok, system, s["question"]), add_special_tokens=False)["input_ids"]
            ctx = ctx[-(config.max_length - len(answer)):]
            # position p predicts token p + 1: the answer's tokens are predicted from len(ctx) - 1 on
            items.append((ctx + answer, len(ctx) - 1, answer))
    teacher = teacher_memo(loaded, pad, teacher_items, config.teacher_topk, batch)
    return [replace(t, ids=ids, start=start) for t, (ids, start, _) in zip(teacher, student_items)]


def prepare_general(loaded: LoadedModel, windows: Sequence[list[int]], config: LearnConfig,
                    batch: int = 8) -> list[Example]:
    """Dense targets on general-text windows (no prompt, every token after the first scored; the
    tokenizer's leading special tokens, if any, precede each window as `window_nll` scores them)."""
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lead = lead_ids(tok)
    items = [(lead + list(w), len(lead), list(w[1:])) for w in windows]
    return teacher_memo(loaded, pad, items, config.teacher_topk, batch)


_MEMO: dict[str, list[Example]] = {}
_MEMO_SIZE = 8


def teacher_memo(loaded: LoadedModel, pad: int, items, topk: int, batch: int) -> list[Example]:
    """`teacher_targets`, remembered for the last few inputs: a persona's objectives and sparsities share
    one dense teacher. The model must be dense whenever it is called (the learner only hooks it)."""
    key = content_hash(loaded.key, id(loaded.model), [[i, s, t] for i, s, t in items], topk)
    if key not in _MEMO:
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = teacher_targets(loaded.model, pad, items, topk, batch)
    return list(_MEMO[key])


def lm_loss(logits: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    targets = torch.tensor([t for e in examples for t in e.targets], device=logits.device)
    return F.cross_entropy(logits, targets)
