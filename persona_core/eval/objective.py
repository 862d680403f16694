"""The one objective of the contrastive learners (masks and steering vectors), weights frozen.

For a pole P with opposite Q:

    loss = -(mean_s in P  l(s)  -  mean_s in Q  l(s))  +  general_weight * KL(dense || student on general text)

where l(s) is the mean token log-prob of statement s as the answer to the evaluator's statement
question with no system prompt: exactly what `persona_core.eval.validation.statement_scores`
scores (the same `Scorer.prompt` / `Scorer.encode_many` formatting, so the learner optimises the
number the evaluation reads). The general term is the KL over the dense model's top-K + tail
(`persona_core.learn.distill.distill_loss`) on general-text windows.

`StatementBatch` holds one pole's token sequences; `margin` is differentiable through whatever
state the model is in (a channel gate, a steering hook). `Objective` draws each step's statements
and windows as a pure function of (seed, step), so a learner resumed from a checkpoint repeats
an uninterrupted run bit for bit.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from torch import nn

from persona_core.eval.scorer import Scorer
from persona_core.eval.validation import STATEMENT_QUESTION, lead_ids, text_key
from persona_core.models.layers import body_and_head

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- logits and the KL


@dataclass
class Example:
    """One scored sequence: input ids, where the scored tokens are, and the dense teacher's top-K
    log-probs for each of them (teacher_lp, teacher_ix: [A, K]; tail: [A])."""

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


def teacher_targets(model: nn.Module, pad: int, items: list[tuple[list[int], int, list[int]]], topk: int,
                    batch: int) -> list[Example]:
    """(ids, start, targets) items with the model's current top-K log-probs (+ tail) at each target."""
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


# ---------------------------------------------------------------------------- statements


class LeakError(ValueError):
    """Training statements include a held-out (validation or evaluation) statement."""


@dataclass(frozen=True)
class StatementBatch:
    """One pole's statements as the evaluator formats them: the question prefix and each statement's ids."""

    prefix: list[int]
    statements: tuple[list[int], ...]

    @classmethod
    def of(cls, scorer: Scorer, statements: Sequence[str], system: str | None = None) -> "StatementBatch":
        prefix = scorer.encode(scorer.prompt(system, STATEMENT_QUESTION))
        conts = [c for c in scorer.encode_many(list(statements), continuation=True)]
        if not conts or any(not c for c in conts):
            raise ValueError("statement batch: no statements, or a statement with no tokens")
        return cls(list(prefix), tuple(list(c) for c in conts))

    def __len__(self) -> int:
        return len(self.statements)


def statement_logprobs(model, batch: StatementBatch, index: Sequence[int], pad: int) -> torch.Tensor:
    """[len(index)]: the mean token log-prob of each chosen statement (differentiable).

    The shared prefix runs once (batch 1, its key/value cache repeated over the statements), as the
    evaluator's `prefix_logprobs` does: the prefix is most of every sequence's tokens (36 of ~51 on
    SmolLM2), so a learner step costs about half the tokens. Gradients flow through the cache."""
    body, head = body_and_head(model)
    device = next(model.parameters()).device
    n = len(batch.prefix)
    pre = torch.tensor([batch.prefix], dtype=torch.long, device=device)
    first = body(input_ids=pre, attention_mask=torch.ones_like(pre), use_cache=True)
    cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
    conts = [batch.statements[i] for i in index]
    lp_first = torch.log_softmax(head(first.last_hidden_state[0, -1:]).float(), -1)[0]
    totals = [lp_first[c[0]: c[0] + 1] for c in conts]  # each first token, from the prefix's last position
    rest = [i for i, c in enumerate(conts) if len(c) > 1]
    if rest:
        seqs = [conts[i][:-1] for i in rest]
        ids, att = pad_sequences(seqs, pad, device)
        full = torch.cat([torch.ones((len(rest), n), dtype=att.dtype, device=device), att], 1)
        position = (n + torch.arange(ids.shape[1], device=device)).expand(len(rest), -1)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            raise ValueError(f"{type(model).__name__}: no key/value cache to share the statement prefix")
        cache.batch_repeat_interleave(len(rest))
        kw = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        hidden = body(input_ids=ids, attention_mask=full, position_ids=position, use_cache=True,
                      **{kw: cache}).last_hidden_state
        rows = torch.cat([torch.full((len(s),), r, dtype=torch.long) for r, s in enumerate(seqs)]).to(device)
        cols = torch.cat([torch.arange(len(s)) for s in seqs]).to(device)
        targets = torch.tensor([t for i in rest for t in conts[i][1:]], device=device)
        lp = torch.log_softmax(head(hidden[rows, cols]).float(), -1).gather(1, targets[:, None])[:, 0]
        for i, part in zip(rest, lp.split([len(conts[i]) - 1 for i in rest])):
            totals[i] = torch.cat([totals[i], part])
    return torch.stack([t.mean() for t in totals])


def margin(model, own: StatementBatch, other: StatementBatch, own_index: Sequence[int], other_index: Sequence[int],
           pad: int) -> torch.Tensor:
    """Mean statement log-prob of the pole's own statements minus the opposite's (higher: more the pole)."""
    return (statement_logprobs(model, own, own_index, pad).mean()
            - statement_logprobs(model, other, other_index, pad).mean())


def general_examples(model: nn.Module, tokenizer, windows: Sequence[list[int]], topk: int = 64,
                     batch: int = 8) -> list[Example]:
    """Targets of the model as it is now (call it dense) on general-text windows, scored as `window_nll`
    does (the tokenizer's leading special tokens first, every token after the window's first scored)."""
    lead = lead_ids(tokenizer)
    items = [(lead + list(w), len(lead), list(w[1:])) for w in windows if len(w) > 1]
    return teacher_targets(model, pad_id(tokenizer), items, topk, batch) if items else []


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def general_kl(model, examples: Sequence[Example], pad: int) -> torch.Tensor:
    logits = scored_logits(model, [e.ids for e in examples], [e.positions for e in examples], pad)
    return distill_loss(logits, examples)


def check_disjoint(training: Sequence[str], held_out: Sequence[str], what: str) -> None:
    """Refuse training statements that equal a held-out statement (case/space-insensitive)."""
    leaks = sorted({text_key(t) for t in training} & {text_key(t) for t in held_out})
    if leaks:
        raise LeakError(f"{what}: {len(leaks)} training statement(s) are held-out statements, e.g. {leaks[0][:60]!r}; "
                        "the calibration and evaluation statements of the pair must not overlap")


def drop_held_out(training: Sequence[str], held_out: Sequence[str], what: str) -> list[str]:
    """`training` without the statements equal to a held-out one (case/space-insensitive), in order and
    deduplicated; how many were dropped is logged. A source's own duplicates (Anthropic's files repeat a
    statement now and then, so a calibration statement can equal an evaluation one) are not a broken split:
    the learner simply never sees them. A broken split (a validation statement that is an evaluation one)
    is `check_disjoint`'s to refuse."""
    held = {text_key(t) for t in held_out}
    seen: set[str] = set()
    out = []
    for t in training:
        key = text_key(t)
        if key not in held and key not in seen:
            out.append(t)
        seen.add(key)
    dropped = len({text_key(t) for t in training} & held)
    if dropped:
        log.warning("%s: dropped %d training statement(s) equal to a held-out (validation or evaluation) "
                    "statement, e.g. %r", what, dropped, sorted({text_key(t) for t in training} & held)[0][:60])
    return out


def training_statements(persona, validation: Sequence[str], held_out: Sequence[str], what: str) -> list[str]:
    """The pole's calibration statements minus its validation ones and minus any equal to a held-out
    (validation or evaluation) statement of the pair: those are dropped, with a logged count
    (`drop_held_out`), so a catalog that repeats a statement across the split still learns from the rest.
    Both learners' rule (``learned-contrastive`` masks, ``dense+steer-learned`` vectors); a validation
    statement that is an evaluation one is a broken split, refused by the caller (`check_disjoint`)."""
    val = {text_key(t) for t in validation}
    train = drop_held_out([t for t in persona.calibration if text_key(t) not in val], held_out,
                          f"{what} training data of {persona.id!r}")
    if not train:
        raise ValueError(f"{what}: persona {persona.id!r} has no calibration statements left to learn from after "
                         f"the {len(val)} validation ones and the held-out duplicates")
    check_disjoint(train, held_out, f"{what} training data of {persona.id!r}")  # drop_held_out's promise
    return train


def draw(pool: int, n: int, seed: int, step: int, salt: int) -> list[int]:
    """`n` indices of `pool` for (seed, step, salt): a pure function, so resumed runs draw the same."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + salt)
    perm = torch.randperm(pool, generator=g)
    return perm[: min(n, pool)].tolist()


@dataclass
class Objective:
    """One pole's loss: margin over the opposite on training statements, plus the general KL.

    `own` / `other`: the training statements of the pole and of its opposite (never a validation
    or evaluation statement: `check_disjoint` before building them). `general`: dense targets on
    general-text windows (may be empty). `batch`: statements per pole per step; `general_batch`:
    windows per step.
    """

    own: StatementBatch
    other: StatementBatch
    general: list[Example]
    batch: int = 12
    general_batch: int = 2
    general_weight: float = 1.0
    seed: int = 0
    pad: int = 0

    def __call__(self, model, step: int, side: int = 0) -> tuple[torch.Tensor, dict]:
        """(loss, figures) at `step`; `side` salts the draw so two poles see different batches."""
        oi = draw(len(self.own), self.batch, self.seed, step, 2 * side)
        qi = draw(len(self.other), self.batch, self.seed, step, 2 * side + 1)
        m = margin(model, self.own, self.other, oi, qi, self.pad)
        total = -m
        info = {"margin": float(m.detach())}
        if self.general and self.general_weight > 0 and self.general_batch > 0:
            gi = draw(len(self.general), self.general_batch, self.seed, step, 7)
            kl = general_kl(model, [self.general[i] for i in gi], self.pad)
            total = total + self.general_weight * kl
            info["general_kl"] = float(kl.detach())
        info["loss"] = float(total.detach())
        if not math.isfinite(info["loss"]):
            info["nonfinite"] = True
        return total, info


def adam_step(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One plain Adam update in place (step t >= 1): one tensor, no hidden state, bit-reproducible."""
    b1, b2 = betas
    with torch.no_grad():
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        param.sub_(lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps))
