"""Persona-Pruner's learned FFN-channel masks: a straight-through top-k over frozen weights.

From one persona description to an ``ffn-channels`` mask, in three steps:

1. **Training data** (`generate_training_data`): the dense model, with the description
   as its system prompt, answers a set of instructions (the calibration half of the
   project's generic questions plus any user-named files), greedily. Instructions held
   out for evaluation are removed first, so training never sees an evaluation question.
2. **Teacher targets** (`prepare_examples`): the dense model's next-token distributions
   on every answer token, with the prompt, kept as their top-K log-probs plus the tail's
   mass (the KL is computed over K + 1 outcomes: a lower bound of the full KL that is
   exact when the tail is one outcome, and small enough to keep for every example).
   WikiText-2 validation windows (`general_windows`) get dense targets the same way. Targets are
   remembered for the last few inputs, so a persona's objectives and sparsities share one teacher.
3. **The learner** (`MaskLearner`): one score per MLP intermediate channel of every
   decoder layer, initialised from the training-free channel importance of the persona's
   statistics (`masks.ffn_channel_scores`, standardised log per layer). Each step keeps
   the top k channels of every layer (the same k everywhere) by multiplying the down
   projection's input by the hard 0/1 mask; the backward pass sees the surrogate
   ``sigmoid((score - t) / temperature)`` instead (t halfway between the k-th and the
   k+1-th score): a straight-through gradient that reaches the scores and nothing else
   (the model's parameters stay frozen). Objectives, both distillation from the dense
   model with the prompt:

   * ``with-prompt``  the pruned model with the prompt (Persona-Pruner's setting);
   * ``prompt-free``  the pruned model without any prompt: a smaller model that *is* the persona;

   plus ``general_weight`` times the KL to the dense model on general text. ``loss="lm"``
   replaces the persona KL by the plain LM loss on the dense answers. Under ``with-prompt`` every
   sequence of a batch starts with the same system prompt: it runs once per step and its
   key/value cache is repeated over the batch (same loss and gradient up to rounding, tested).

Determinism: every step's batch is drawn from a generator seeded by (seed, step), and the
optimiser is a plain Adam on one tensor, so a learner resumed from a checkpoint
(`LearnerState`) ends bit-identical to one that ran through (same device, same threads).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from persona_core.catalog import Persona, generic_questions, load_texts
from persona_core.store.hashing import content_hash
from persona_core.versions import LEARN_VERSION
from persona_core.masks.methods import LinearWeights, MaskSpec, StatsLike, channel_module_masks, ffn_channel_scores, keep_top, n_pruned
from persona_core.models import LoadedModel, decoder_layers, linear_groups

log = logging.getLogger(__name__)

OBJECTIVES = ("with-prompt", "prompt-free")
LOSSES = ("kl", "lm")
WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2"


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class DataConfig:
    """How a persona's training data is made from its description. `hash` keys it."""

    examples: int = 24  # question/answer pairs (at most the instructions available)
    max_new_tokens: int = 48  # answer length, tokens
    builtin: bool = True  # the calibration half of the project's generic questions
    instructions: tuple[str, ...] = ()  # extra instruction files: "URL" or "URL::field" (see catalog.load_texts)
    gen_batch_size: int = 8
    seed: int = 0  # which instructions a cap keeps

    def __post_init__(self):
        object.__setattr__(self, "instructions", tuple(self.instructions))
        for f in ("examples", "max_new_tokens", "gen_batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"DataConfig.{f} must be >= 1, got {getattr(self, f)}")
        if not self.builtin and not self.instructions:
            raise ValueError("DataConfig: no instructions (builtin is off and no instruction files are named)")

    @property
    def hash(self) -> str:
        d = asdict(self)
        d.pop("gen_batch_size")  # batching never changes a greedy answer's text... in exact arithmetic
        return content_hash(LEARN_VERSION, d)


@dataclass(frozen=True)
class LearnConfig:
    """The learner's knobs. `hash` keys a learned mask (with the data, persona and model)."""

    objective: str = "with-prompt"  # with-prompt | prompt-free
    loss: str = "kl"  # kl (to the dense model's answer distributions) | lm (on the dense answers)
    sparsity: float = 0.25  # fraction of MLP channels removed in every layer
    steps: int = 40
    lr: float = 0.03  # Adam, on per-layer standardised scores (chosen on validation: benchmarks/sweep_learn.py)
    batch_size: int = 4  # persona examples per step
    temperature: float = 0.5  # of the straight-through surrogate sigmoid((s - t) / T)
    general_weight: float = 2.0  # weight of the KL on general text (0: off); 2.0: same fidelity, less perplexity
    general_batch: int = 2  # general-text windows per step
    general_windows: int = 32  # WikiText-2 validation windows in the pool
    general_window: int = 128  # tokens per window
    teacher_topk: int = 64  # teacher log-probs kept per token (plus the tail's mass)
    init: str = "wanda"  # training-free channel importance the scores start from (a mask method)
    max_length: int = 384  # tokens per training sequence (prompt cut from the left)
    seed: int = 0
    checkpoint_every: int = 10  # steps between checkpoints (0: none)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"LearnConfig.objective: {self.objective!r} (use {', '.join(OBJECTIVES)})")
        if self.loss not in LOSSES:
            raise ValueError(f"LearnConfig.loss: {self.loss!r} (use {', '.join(LOSSES)})")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"LearnConfig.sparsity must be in [0, 1), got {self.sparsity}")
        for f in ("batch_size", "general_window", "teacher_topk", "max_length"):
            if getattr(self, f) < 1:
                raise ValueError(f"LearnConfig.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("steps", "general_batch", "general_windows", "checkpoint_every"):
            if getattr(self, f) < 0:
                raise ValueError(f"LearnConfig.{f} must be >= 0, got {getattr(self, f)}")
        if self.lr < 0 or self.temperature <= 0 or self.general_weight < 0:
            raise ValueError("LearnConfig: lr and general_weight must be >= 0 and temperature > 0")
        MaskSpec(self.init, self.sparsity, "ffn-channels")  # unknown init method: fail now

    @property
    def hash(self) -> str:
        d = asdict(self)
        d.pop("checkpoint_every")  # where it may stop, not what it computes
        return content_hash(LEARN_VERSION, d)

    @property
    def method(self) -> str:
        """The mask's method name in the store: ``learned-<objective>``."""
        return f"learned-{self.objective}"


# ---------------------------------------------------------------------------- training data


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def training_instructions(data: DataConfig, held_out: Iterable[str] = ()) -> list[str]:
    """The instructions a persona's training data answers: never one of `held_out` (compared
    case- and whitespace-insensitively) nor one of the project's evaluation questions."""
    pool: list[str] = list(generic_questions("calibration")) if data.builtin else []
    for spec in data.instructions:
        url, _, fieldname = spec.partition("::")
        pool.extend(load_texts(url, fieldname or "text"))
    banned = {_norm(q) for q in (*held_out, *generic_questions("evaluation"))}
    seen, out = set(), []
    for q in pool:
        n = _norm(q)
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
    from persona_core.calib.config import CalibConfig
    from persona_core.calib.texts import generate_replies

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


# ---------------------------------------------------------------------------- general text


def general_text() -> tuple[str, str | None]:
    """(name, source for `validation.text_windows`): WikiText-2 validation from ../shared/data when
    present, else the project's own held-out text (named, so results say which was used)."""
    path = WIKITEXT / "valid.txt"
    if path.is_file():
        return "wikitext-2-valid", str(path)
    log.warning("%s is absent: the general-text term uses the built-in held-out text", path)
    return "builtin-heldout", None


def general_windows(tokenizer, n: int, window: int) -> list[list[int]]:
    """`n` windows of `window` tokens spread evenly over the general text (`general_text`)."""
    from persona_core.eval.validation import text_windows

    return text_windows(tokenizer, general_text()[1], window, n) if n else []


# ---------------------------------------------------------------------------- examples and targets


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


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    head = model.get_output_embeddings()
    if not isinstance(body, nn.Module) or not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__}: cannot split into decoder body and LM head")
    return body, head


def _pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        att[i, : len(s)] = 1
    return ids.to(device), att.to(device)


def _scored_logits(model: nn.Module, seqs: Sequence[Sequence[int]], spans: Sequence[range], pad: int
                   ) -> torch.Tensor:
    """Logits (fp32) at the scored positions of every sequence, concatenated: [sum A, V].
    The LM head runs on those positions only."""
    body, head = _body_and_head(model)
    device = next(model.parameters()).device
    ids, att = _pad(seqs, pad, device)
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


def _scored_logits_shared(model: nn.Module, seqs: Sequence[Sequence[int]], spans: Sequence[range], pad: int,
                          prefix: int) -> torch.Tensor:
    """`_scored_logits` for sequences sharing their first `prefix` tokens (a persona's system
    prompt): the prefix runs once and its key/value cache is repeated over the batch. Same
    numbers up to float rounding; gradients flow through the cache."""
    body, head = _body_and_head(model)
    device = next(model.parameters()).device
    pre = torch.tensor([list(seqs[0][:prefix])], dtype=torch.long, device=device)
    first = body(input_ids=pre, attention_mask=torch.ones_like(pre), use_cache=True)
    cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
    cache.batch_repeat_interleave(len(seqs))
    cache_kw = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    ids, att = _pad([s[prefix:] for s in seqs], pad, device)
    full = torch.cat([torch.ones((len(seqs), prefix), dtype=att.dtype, device=device), att], 1)
    position = (prefix + torch.arange(ids.shape[1], device=device)).expand(len(seqs), -1)
    hidden = body(input_ids=ids, attention_mask=full, position_ids=position, use_cache=True,
                  **{cache_kw: cache}).last_hidden_state
    rows = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(spans)]).to(device)
    cols = torch.cat([torch.tensor(list(r), dtype=torch.long) - prefix for r in spans]).to(device)
    return head(hidden[rows, cols]).float()


def _teacher(model: nn.Module, pad: int, items: list[tuple[list[int], int, list[int]]], topk: int,
             batch: int) -> list[Example]:
    out = []
    for b in range(0, len(items), batch):
        chunk = items[b: b + batch]
        spans = [range(s, s + len(t)) for _, s, t in chunk]
        with torch.inference_mode():
            lp = torch.log_softmax(_scored_logits(model, [i for i, _, _ in chunk], spans, pad), -1)
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
    teacher = _teacher_memo(loaded, pad, teacher_items, config.teacher_topk, batch)
    return [replace(t, ids=ids, start=start) for t, (ids, start, _) in zip(teacher, student_items)]


def prepare_general(loaded: LoadedModel, windows: Sequence[list[int]], config: LearnConfig,
                    batch: int = 8) -> list[Example]:
    """Dense targets on general-text windows (no prompt, every token after the first scored; the
    tokenizer's leading special tokens, if any, precede each window as `window_nll` scores them)."""
    from persona_core.eval.validation import lead_ids

    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lead = lead_ids(tok)
    items = [(lead + list(w), len(lead), list(w[1:])) for w in windows]
    return _teacher_memo(loaded, pad, items, config.teacher_topk, batch)


_MEMO: dict[str, list[Example]] = {}
_MEMO_SIZE = 8


def _teacher_memo(loaded: LoadedModel, pad: int, items, topk: int, batch: int) -> list[Example]:
    """`_teacher`, remembered for the last few inputs: a persona's objectives and sparsities share
    one dense teacher. The model must be dense whenever it is called (the learner only hooks it)."""
    key = content_hash(loaded.key, id(loaded.model), [[i, s, t] for i, s, t in items], topk)
    if key not in _MEMO:
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = _teacher(loaded.model, pad, items, topk, batch)
    return list(_MEMO[key])


# ---------------------------------------------------------------------------- the straight-through top-k


def hard_topk(scores: torch.Tensor, k: int, tiebreak: torch.Tensor) -> torch.Tensor:
    """Bool [L, C]: exactly the k highest scores of every row (ties: tiebreak, then lower index)."""
    return keep_top(scores.detach().cpu().double(), k, tiebreak.detach().cpu()).to(scores.device)


def straight_through(scores: torch.Tensor, k: int, tiebreak: torch.Tensor, temperature: float) -> torch.Tensor:
    """The hard top-k mask (0/1 values) whose gradient is that of sigmoid((scores - t) / T),
    t halfway between each row's k-th and k+1-th score."""
    hard = hard_topk(scores, k, tiebreak).to(scores.dtype)
    n = scores.shape[-1]
    if k in (0, n):
        return hard
    with torch.no_grad():
        top = scores.topk(k + 1, dim=-1).values
        t = (top[:, k - 1: k] + top[:, k: k + 1]) / 2
    soft = torch.sigmoid((scores - t) / temperature)
    return hard + (soft - soft.detach())  # exactly the hard values forward (x - x == 0)


class ChannelGate:
    """Forward pre-hooks that multiply every layer's down-projection input by a channel mask.

    Zeroing a channel's input to the down projection is what removing its gate/up rows and
    its down column computes (act(0) * 0 = 0 either way). `values` is [L, C] (set it before
    a forward); None leaves the model dense.
    """

    def __init__(self, model: nn.Module):
        self.downs: list[nn.Module] = []
        by_layer = {g.layer: g for g in linear_groups(model) if g.name == "mlp_out"}
        for layer in range(len(decoder_layers(model)[1])):
            g = by_layer.get(layer)
            if g is None or len(g.modules) != 1:
                raise ValueError(f"layer {layer}: learned channel masks need one MLP down projection")
            self.downs.append(model.get_submodule(g.modules[0]))
        self.values: torch.Tensor | None = None
        self._handles: list = []

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.downs), self.downs[0].in_features

    def __enter__(self) -> "ChannelGate":
        for i, mod in enumerate(self.downs):
            self._handles.append(mod.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.values = None

    def _hook(self, layer: int):
        def hook(module, args):
            if self.values is None:
                return None
            return (args[0] * self.values[layer].to(args[0].dtype),) + tuple(args[1:])

        return hook


# ---------------------------------------------------------------------------- losses


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


# ---------------------------------------------------------------------------- the learner


@dataclass
class LearnerState:
    """Everything a learner needs to continue: scores, Adam's moments, the step reached."""

    step: int
    scores: torch.Tensor  # [L, C] float64
    m: torch.Tensor
    v: torch.Tensor

    def to_bytes(self, metadata: Mapping[str, str] | None = None) -> bytes:
        from safetensors.torch import save

        meta = {"format": "persona-learner/v1", "step": str(self.step), **(metadata or {})}
        return save({"scores": self.scores.cpu().contiguous(), "m": self.m.cpu().contiguous(),
                     "v": self.v.cpu().contiguous()}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple["LearnerState", dict[str, str]]:
        from safetensors.torch import load

        try:
            tensors = load(data)
            n = int.from_bytes(data[:8], "little")
            meta = dict(json.loads(data[8: 8 + n]).get("__metadata__") or {})
        except Exception as err:
            raise ValueError(f"not a learner checkpoint ({err})") from None
        if meta.get("format") != "persona-learner/v1" or set(tensors) != {"scores", "m", "v"}:
            raise ValueError("not a learner checkpoint")
        shapes = {t.shape for t in tensors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"learner checkpoint: tensors disagree in shape {sorted(map(tuple, shapes))}")
        return cls(int(meta["step"]), tensors["scores"], tensors["m"], tensors["v"]), meta


def initial_scores(loaded: LoadedModel | nn.Module, stats: Sequence[StatsLike], config: LearnConfig,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [L, C] float64, tiebreak [L, C]): the standardised log of the training-free channel
    importance of `config.init` on `stats`. Its top k per layer is exactly the training-free
    ``ffn-channels`` mask of that method (log is monotone; ties keep the same tiebreak)."""
    lw = LinearWeights.from_model(loaded)
    spec = MaskSpec(config.init, config.sparsity, "ffn-channels")
    rows, ties = [], []
    for _, scores, tiebreak in ffn_channel_scores(lw, stats, spec, device):
        x = scores[0].double().clamp_min(1e-300).log()
        sd = x.std()
        rows.append((x - x.mean()) / (sd if sd > 0 else 1.0))
        ties.append(tiebreak.double())
    return torch.stack(rows), torch.stack(ties)


def channels_kept(width: int, sparsity: float) -> int:
    return width - n_pruned(width, sparsity)


class MaskLearner:
    """Learns one persona's channel scores; see the module docstring.

    `examples`: persona examples (`prepare_examples`); `general`: general-text examples
    (`prepare_general`, may be empty). The model is used frozen: its parameters'
    requires_grad is switched off for the learner's lifetime and restored after.
    """

    betas = (0.9, 0.999)
    eps = 1e-8
    share_prefix = True  # run a batch's shared prompt prefix once (speed only: same numbers up to rounding)

    def __init__(self, loaded: LoadedModel, examples: Sequence[Example], general: Sequence[Example],
                 scores: torch.Tensor, tiebreak: torch.Tensor, config: LearnConfig,
                 state: LearnerState | None = None):
        if not examples:
            raise ValueError("MaskLearner: no training examples")
        self.loaded, self.config = loaded, config
        self.examples, self.general = list(examples), list(general)
        self.gate = ChannelGate(loaded.model)
        if tuple(scores.shape) != self.gate.shape:
            raise ValueError(f"scores have shape {tuple(scores.shape)}, the model's MLPs {self.gate.shape}")
        self.tiebreak = tiebreak
        self.k = channels_kept(scores.shape[1], config.sparsity)
        device = loaded.device
        if state is None:
            z = torch.zeros_like(scores, dtype=torch.float64)
            state = LearnerState(0, scores.double().clone(), z, z.clone())
        elif tuple(state.scores.shape) != tuple(scores.shape):
            raise ValueError("checkpoint scores do not fit this model")
        self.state = LearnerState(state.step, state.scores.to(device), state.m.to(device), state.v.to(device))
        self.history: list[dict] = []
        self.tokens = 0
        tok = loaded.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    # ---- batches

    def _draw(self, pool_size: int, n: int, step: int, salt: int) -> list[int]:
        g = torch.Generator().manual_seed((self.config.seed * 1_000_003 + step) * 4 + salt)
        if n >= pool_size:
            return torch.randperm(pool_size, generator=g).tolist()
        return torch.randperm(pool_size, generator=g)[:n].tolist()

    def batch(self, step: int) -> tuple[list[Example], list[Example]]:
        """The persona and general examples of `step` (a pure function of seed and step)."""
        c = self.config
        persona = [self.examples[i] for i in self._draw(len(self.examples), c.batch_size, step, 0)]
        general = ([self.general[i] for i in self._draw(len(self.general), c.general_batch, step, 1)]
                   if self.general and c.general_weight > 0 and c.general_batch > 0 else [])
        return persona, general

    # ---- one step

    def loss(self, mask: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        c = self.config
        persona, general = self.batch(step)
        model = self.loaded.model
        self.gate.values = mask
        pseqs, pspans = [e.ids for e in persona], [e.positions for e in persona]
        prefix = shared_prefix(pseqs, pspans) if self.share_prefix else 0
        if prefix >= MIN_SHARED_PREFIX:  # with-prompt: the persona's system prompt runs once per step
            logits = _scored_logits_shared(model, pseqs, pspans, self.pad, prefix)
            if general:
                logits = torch.cat([logits, _scored_logits(model, [e.ids for e in general],
                                                           [e.positions for e in general], self.pad)])
        else:
            logits = _scored_logits(model, pseqs + [e.ids for e in general],
                                    pspans + [e.positions for e in general], self.pad)
        self.tokens += sum(len(e.ids) for e in (*persona, *general))
        n_p = sum(len(e.targets) for e in persona)
        lp, lg = logits[:n_p], logits[n_p:]
        persona_loss = lm_loss(lp, persona) if c.loss == "lm" else distill_loss(lp, persona)
        total = persona_loss
        info = {"persona": float(persona_loss.detach())}
        if general:
            general_loss = distill_loss(lg, general)
            total = total + c.general_weight * general_loss
            info["general"] = float(general_loss.detach())
        return total, info

    def step(self) -> dict:
        c, st = self.config, self.state
        scores = st.scores.detach().requires_grad_(True)
        mask = straight_through(scores, self.k, self.tiebreak, c.temperature).float()
        total, info = self.loss(mask, st.step)
        (grad,) = torch.autograd.grad(total, scores)
        b1, b2 = self.betas
        t = st.step + 1
        with torch.no_grad():
            st.m.mul_(b1).add_(grad, alpha=1 - b1)
            st.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            m_hat = st.m / (1 - b1 ** t)
            v_hat = st.v / (1 - b2 ** t)
            st.scores.sub_(c.lr * m_hat / (v_hat.sqrt() + self.eps))
        st.step = t
        info.update(step=t, loss=float(total.detach()))
        self.history.append(info)
        return info

    def run(self, on_checkpoint: Callable[[LearnerState], None] | None = None) -> LearnerState:
        """Steps until `config.steps`, calling `on_checkpoint` every `checkpoint_every` steps."""
        c = self.config
        for p in self.loaded.model.parameters():
            if p.requires_grad:
                raise ValueError("MaskLearner: the model's parameters must be frozen (requires_grad=False)")
        with self.gate:
            t0 = time.perf_counter()
            while self.state.step < c.steps:
                info = self.step()
                if info["step"] % 10 == 0 or info["step"] == c.steps:
                    log.info("learn step %d/%d loss %.4f (%s) %.1f s", info["step"], c.steps, info["loss"],
                             ", ".join(f"{k} {v:.4f}" for k, v in info.items() if k in ("persona", "general")),
                             time.perf_counter() - t0)
                if on_checkpoint and c.checkpoint_every and (info["step"] % c.checkpoint_every == 0
                                                             or info["step"] == c.steps):
                    on_checkpoint(self.state)
        return self.state

    # ---- results

    def channels(self) -> dict[int, torch.Tensor]:
        keep = hard_topk(self.state.scores, self.k, self.tiebreak).cpu()
        return {layer: keep[layer] for layer in range(keep.shape[0])}

    def masks(self) -> dict[str, torch.Tensor]:
        """The learned mask as ordinary ``ffn-channels`` module masks (what `build_masks` gives)."""
        return dict(channel_module_masks(LinearWeights.from_model(self.loaded), self.channels()))


# ---------------------------------------------------------------------------- one persona, end to end


@dataclass
class LearnResult:
    masks: dict[str, torch.Tensor]
    state: LearnerState
    samples: list[dict[str, str]]
    metadata: dict
    history: list[dict] = field(default_factory=list)


def identity(model_key: str, persona: Persona, init_fingerprint: str, config: LearnConfig, data: DataConfig,
             held_out: Iterable[str], general_name: str) -> str:
    """What a learned mask is keyed by: persona, base model, objective and knobs, data recipe,
    the statistics its scores start from, the held-out questions and the general text."""
    return content_hash(LEARN_VERSION, model_key, persona.content_hash, persona.description, init_fingerprint,
                        config.hash, data.hash, sorted(_norm(q) for q in held_out), general_name)


def learn_persona(loaded: LoadedModel, persona: Persona, stats: Sequence[StatsLike], config: LearnConfig,
                  data: DataConfig = DataConfig(), *, held_out: Iterable[str] = (),
                  samples: Sequence[Mapping[str, str]] | None = None,
                  state: LearnerState | None = None,
                  on_checkpoint: Callable[[LearnerState], None] | None = None) -> LearnResult:
    """Generate data (unless `samples` are given), prepare targets, learn, and return the mask.

    `stats`: what `config.init` needs (the persona's statistics for ``wanda``; nothing for
    ``magnitude``). `state` resumes a checkpoint; `on_checkpoint` is called with the state
    every `config.checkpoint_every` steps.
    """
    held_out = list(held_out)
    t0 = time.perf_counter()
    samples = list(samples) if samples is not None else generate_training_data(loaded, persona, data, held_out)
    leaks = {_norm(s["question"]) for s in samples} & {_norm(q) for q in held_out}
    if leaks:
        raise ValueError(f"persona {persona.id!r}: {len(leaks)} training question(s) are evaluation questions")
    t_data = time.perf_counter()
    examples = prepare_examples(loaded, persona, samples, config)
    gname = general_text()[0]
    general = (prepare_general(loaded, general_windows(loaded.tokenizer, config.general_windows,
                                                       config.general_window), config)
               if config.general_weight > 0 and config.general_windows > 0 else [])
    scores, tiebreak = initial_scores(loaded, stats, config)
    t_prep = time.perf_counter()
    learner = MaskLearner(loaded, examples, general, scores, tiebreak, config, state)
    start = learner.state.step
    final = learner.run(on_checkpoint)
    t_end = time.perf_counter()
    masks = learner.masks()
    init_keep = hard_topk(scores, learner.k, tiebreak)
    changed = int((init_keep.cpu() != hard_topk(final.scores, learner.k, tiebreak).cpu()).sum()) // 2
    meta = {
        "method": config.method, "granularity": "ffn-channels", "sparsity": config.sparsity,
        "learn": asdict(config), "data": asdict(data), "data_hash": samples_hash(samples),
        "examples": len(samples), "general_text": gname if general else "", "channels_kept": learner.k,
        "channels_changed": changed, "steps_run": final.step - start,
        "final_loss": learner.history[-1]["loss"] if learner.history else None,
        "seconds": {"data": round(t_data - t0, 2), "prepare": round(t_prep - t_data, 2),
                    "learn": round(t_end - t_prep, 2)},
        "learner_tokens": learner.tokens,
    }
    return LearnResult(masks, final, samples, meta, learner.history)


def samples_to_json(samples: Sequence[Mapping[str, str]]) -> str:
    return json.dumps([{"question": s["question"], "answer": s["answer"]} for s in samples], ensure_ascii=False)


def samples_from_json(text: str) -> list[dict[str, str]]:
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(s, dict) and isinstance(s.get("question"), str)
                                             and isinstance(s.get("answer"), str) for s in data):
        raise ValueError("training data: expected a list of {question, answer} objects")
    return [{"question": s["question"], "answer": s["answer"]} for s in data]


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
