"""Persona-Pruner's learned FFN-channel masks: a straight-through top-k over frozen weights.

From one persona description to an ``ffn-channels`` mask, in three steps:

1. **Training data** (`persona_core.learn.data.generate_training_data`): the dense model, with the description
   as its system prompt, answers a set of instructions (the calibration half of the
   project's generic questions plus any user-named files), greedily. Instructions held
   out for evaluation are removed first, so training never sees an evaluation question.
2. **Teacher targets** (`persona_core.learn.distill.prepare_examples`): the dense model's next-token distributions
   on every answer token, with the prompt, kept as their top-K log-probs plus the tail's
   mass (the KL is computed over K + 1 outcomes: a lower bound of the full KL that is
   exact when the tail is one outcome, and small enough to keep for every example).
   WikiText-2 validation windows (`general_windows`) get dense targets the same way. Targets are
   remembered for the last few inputs, so a persona's objectives and sparsities share one teacher.
3. **The learner** (`MaskLearner`): one score per MLP intermediate channel of every
   decoder layer, initialised from the training-free channel importance of the persona's
   statistics (`persona_core.masks.build.ffn_channel_scores`, standardised log per layer). Each step keeps
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

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load
from torch import nn

from persona_core.catalog.personas import Persona
from persona_core.eval.validation import text_key
from persona_core.learn.config import DataConfig, LearnConfig
from persona_core.learn.data import (general_text, general_text_record, general_windows, generate_training_data,
                                    samples_hash)
from persona_core.learn.distill import (MIN_SHARED_PREFIX, Example, distill_loss, lm_loss, prepare_examples,
                                        prepare_general, scored_logits, scored_logits_shared, shared_prefix)
from persona_core.learn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from persona_core.learn.gate import ChannelGate, channels_kept, hard_topk, straight_through
from persona_core.masks.build import channel_module_masks, ffn_channel_scores
from persona_core.masks.inputs import LinearWeights, StatsLike
from persona_core.masks.spec import MaskSpec
from persona_core.models.loading import LoadedModel
from persona_core.store.hashing import content_hash
from persona_core.versions import LEARN_VERSION

log = logging.getLogger(__name__)


@dataclass
class LearnerState:
    """Everything a learner needs to continue: scores, Adam's moments, the step reached."""

    step: int
    scores: torch.Tensor  # [L, C] float64
    m: torch.Tensor
    v: torch.Tensor

    FORMAT = "persona-learner/v2"

    def to_bytes(self, metadata: Mapping[str, str] | None = None) -> bytes:
        """Checkpoint bytes: the tensors, the step, `metadata` (owner fields) and a content digest."""
        return save_checkpoint({"scores": self.scores, "m": self.m, "v": self.v}, self.step, self.FORMAT,
                               dict(metadata or {}))

    @classmethod
    def from_bytes(cls, data: bytes, owner: Mapping[str, str] | None = None, shape: tuple[int, int] | None = None,
                   max_step: int = 2**62) -> tuple["LearnerState", dict[str, str]]:
        """A verified checkpoint (`persona_core.learn.checkpoint`): digest, `owner` fields, the scores'
        `shape` (when given: else the three tensors must agree), finite values, step <= `max_step`;
        anything else raises `CheckpointError` (a ValueError)."""
        if shape is None:
            try:
                shape = tuple(load(data)["scores"].shape)
            except Exception:
                raise CheckpointError("not a learner checkpoint (unreadable)") from None
        try:
            tensors, meta, step = load_checkpoint(data, cls.FORMAT, owner or {},
                                                  {k: tuple(shape) for k in ("scores", "m", "v")}, max_step)
        except CheckpointError as err:
            raise CheckpointError(f"not a learner checkpoint to resume: {err}") from None
        if len(shape) != 2:
            raise CheckpointError(f"not a learner checkpoint to resume: scores of shape {tuple(shape)}")
        return cls(step, tensors["scores"], tensors["m"], tensors["v"]), meta


def initial_scores(loaded: LoadedModel | nn.Module, stats: Sequence[StatsLike], config: LearnConfig,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [L, C] float64, tiebreak [L, C]): the standardised log of the training-free channel
    importance of `config.init` on `stats`. Its top k per layer is exactly the training-free
    ``ffn-channels`` mask of that method (log is monotone; ties keep the same tiebreak).
    Computed on `device`, default the model's: statistics (kept on CPU) move to the weights, so a
    model on the GPU works (its weights on CUDA met CPU statistics before)."""
    lw = LinearWeights.from_model(loaded)
    spec = MaskSpec(config.init, config.sparsity, "ffn-channels")
    if device is None:
        model = loaded.model if isinstance(loaded, LoadedModel) else loaded
        device = next(model.parameters()).device
    rows, ties = [], []
    for _, scores, tiebreak in ffn_channel_scores(lw, stats, spec, device):
        x = scores[0].double().clamp_min(1e-300).log()
        sd = x.std()
        rows.append((x - x.mean()) / (sd if sd > 0 else 1.0))
        ties.append(tiebreak.double())
    return torch.stack(rows), torch.stack(ties)




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
            logits = scored_logits_shared(model, pseqs, pspans, self.pad, prefix)
            if general:
                logits = torch.cat([logits, scored_logits(model, [e.ids for e in general],
                                                           [e.positions for e in general], self.pad)])
        else:
            logits = scored_logits(model, pseqs + [e.ids for e in general],
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
        if not torch.isfinite(total.detach()):
            raise FloatingPointError(f"mask learner ({c.method}, sparsity {c.sparsity:g}): the loss is not finite at "
                                     f"step {st.step + 1} ({info}); lower lr (now {c.lr:g}) or check the model's "
                                     "numerics (dtype)")
        (grad,) = torch.autograd.grad(total, scores)
        if not torch.isfinite(grad).all():
            raise FloatingPointError(f"mask learner ({c.method}, sparsity {c.sparsity:g}): non-finite gradient at "
                                     f"step {st.step + 1}; lower lr (now {c.lr:g}) or check the model's numerics")
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
                        config.hash, data.hash, sorted(text_key(q) for q in held_out), general_name)


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
    leaks = {text_key(s["question"]) for s in samples} & {text_key(q) for q in held_out}
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
        "examples": len(samples), "general_text": gname if general else "",
        "general_text_record": general_text_record() if general else None, "channels_kept": learner.k,
        "channels_changed": changed, "steps_run": final.step - start,
        "final_loss": learner.history[-1]["loss"] if learner.history else None,
        "seconds": {"data": round(t_data - t0, 2), "prepare": round(t_prep - t_data, 2),
                    "learn": round(t_end - t_prep, 2)},
        "learner_tokens": learner.tokens,
    }
    return LearnResult(masks, final, samples, meta, learner.history)


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
