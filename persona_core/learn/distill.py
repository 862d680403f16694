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
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from persona_core.catalog.personas import Persona
from persona_core.eval.validation import lead_ids
from persona_core.learn.config import LearnConfig
from persona_core.models.layers import body_and_head
from persona_core.models.loading import LoadedModel
from persona_core.store.hashing import content_hash


def chat_prompt(tokenizer, system: str | None, user: str) -> str:
    """The text before the assistant's answer, with `system` as system prompt (none for None)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@dataclass
class Example:
    """One training sequence: the student's input ids, where the scored tokens are, and the
    dense teacher's top-K log-probs for each of them (teacher_lp, teacher_ix: [A, K]; tail: [A])."""

    ids: list[int]
    start: int  # the first scored position predicts ids[start + 1]
    targets: list[int]  # the A scored tokens
    teacher_lp: torch.Tensor
    teacher_ix: torch.Tensor
    tail: torch.Tensor  # log of the teacher's probability outside its top K

    @property
    def positions(self) -> range:
        return range(self.start, self.start + len(self.targets))


def pad_sequences(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        att[i, : len(s)] = 1
    return ids.to(device), att.to(device)


def scored_logits(model: nn.Module, seqs: Sequence[Sequence[int]], spans: Sequence[range], pad: int
                   ) -> torch.Tensor:
    """Logits (fp32) at the scored positions of every sequence, concatenated: [sum A, V].
    The LM head runs on those positions only."""
    body, head = body_and_head(model)
    device = next(model.parameters()).device
    ids, att = pad_sequences(seqs, pad, device)
    hidden = body(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
    rows = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(spans)]).to(device)
    cols = torch.cat([torch.tensor(list(r), dtype=torch.long) for r in spans]).to(device)
    return head(hidden[rows, cols]).float()


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


def teacher_targets(model: nn.Module, pad: int, items: list[tuple[list[int], int, list[int]]], topk: int,
             batch: int) -> list[Example]:
    out = []
    for b in range(0, len(items), batch):
        chunk = items[b: b + batch]
        spans = [range(s, s + len(t)) for _, s, t in chunk]
        with torch.inference_mode():
            lp = torch.log_softmax(scored_logits(model, [i for i, _, _ in chunk], spans, pad), -1)
            k = min(topk, lp.shape[-1])
            top, ix = lp.topk(k, dim=-1)
            tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
        n = 0
        for (ids, start, targets) in chunk:
            a = len(targets)
            out.append(Example(ids, start, targets, top[n: n + a].cpu().clone(), ix[n: n + a].cpu().clone(),
                               tail[n: n + a].cpu().clone()))
            n += a
    return out


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


def distill_loss(logits: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    """Mean over scored tokens of KL(teacher || student) over the teacher's top K + its tail."""
    lp = torch.log_softmax(logits, -1)
    t_lp = torch.cat([e.teacher_lp for e in examples]).to(lp.device)
    t_ix = torch.cat([e.teacher_ix for e in examples]).to(lp.device)
    t_tail = torch.cat([e.tail for e in examples]).to(lp.device)
    s_top = lp.gather(1, t_ix)
    s_tail = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-7))
    kl = (t_lp.exp() * (t_lp - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    return kl.mean()


def lm_loss(logits: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    targets = torch.tensor([t for e in examples for t in e.targets], device=logits.device)
    return F.cross_entropy(logits, targets)
