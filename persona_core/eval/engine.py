"""The scoring engine: `Evaluator`, one loaded model that implements `persona_core.eval.scorer.Scorer`.

One `Evaluator` holds one loaded model (placed by an `accelerate.Accelerator`: bf16 on GPU,
fp32 on CPU; `device_map="auto"` spreads a model too large for one GPU), the text format of its
requests (its chat template), the batched scoring primitives metrics are built from, and a
`MaskedModel` over its prunable weights: masks are applied in place and the dense weights
restored bit-exactly, with no reload per persona. What is scored under which condition is
`persona_core.eval.unit` (`evaluate_unit`); the metrics (`persona_core.eval.metrics`) see the
engine only as a `Scorer`.

Scoring runs the LM head only on the positions scored, and reuses the key/value cache of a
prefix shared by many continuations (the statement question, a few-shot prompt): speed only,
the same numbers.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any, ContextManager, Sequence

import torch
from torch import nn

from persona_core.eval.config import EvalConfig
from persona_core.eval.fewshot import FewShotChoice
from persona_core.eval.masked import MaskedModel
from persona_core.eval.steering import SteerChoice
from persona_core.eval.validation import lead_ids
from persona_core.models.layers import body_and_head, linear_groups
from persona_core.models.loading import DEFAULT_MODEL, LoadedModel, load_model

log = logging.getLogger(__name__)


class Evaluator:
    """One loaded model, the `Scorer` primitives metrics are built from, and its masks.

    `model` is a spec for `load_model` or an already loaded `LoadedModel`.
    """

    def __init__(self, model: str | LoadedModel = DEFAULT_MODEL, *, device: str | None = None,
                 dtype: str | None = None, device_map: str | dict | None = None,
                 snapshot_device: str | None = None, revision: str | None = None):
        from accelerate import Accelerator  # heavy: accelerate loads only when an evaluator is made

        cpu = device == "cpu" or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16")
        if isinstance(model, LoadedModel):
            self.loaded = model
        elif device_map is not None and not cpu:
            self.loaded = self._load_dispatched(model, device_map, dtype, revision)
        else:
            self.loaded = load_model(model, device=str(self.accelerator.device), dtype=dtype, revision=revision)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.model_key = self.loaded.key
        self.masks = MaskedModel(self.model, snapshot_device)
        # per-model memos, filled by `persona_core.eval.unit` and `persona_core.eval.steered`:
        # (dense ident, config hash) -> (metric preparations, dense rows); pair -> (vectors, choice)
        self.dense_memo: dict[tuple[str, str], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        self.steer_memo: dict[tuple, tuple[dict[int, torch.Tensor], SteerChoice]] = {}
        self.fewshot_memo: dict[tuple, FewShotChoice] = {}  # pair -> few-shot k (`persona_core.eval.fewshot`)
        self.timings: dict[str, float] = {}  # seconds per metric, summed over the conditions scored
        self.lead = lead_ids(self.tokenizer)  # <bos> or nothing: kept when a context is cut to fit

    def cut(self, ctx: list[int], room: int) -> list[int]:
        """`ctx` in at most `room` tokens: cut from the left, but a context that opens with the
        tokenizer's leading special tokens keeps them (Gemma without its <bos> is about twice as
        perplexed), so a long few-shot prompt loses its oldest text, never its <bos>."""
        if len(ctx) <= room:
            return ctx
        n = len(self.lead)
        if n and room > n and ctx[:n] == self.lead:
            return ctx[:n] + ctx[len(ctx) - (room - n):]
        return ctx[len(ctx) - room:]

    @staticmethod
    def _load_dispatched(spec: str, device_map: str | dict, dtype: str | None,
                         revision: str | None = None) -> LoadedModel:
        """Big-model loading: weights on CPU first, then spread over the visible GPUs."""
        from accelerate import dispatch_model, infer_auto_device_map  # heavy: only for models spread over GPUs

        loaded = load_model(spec, device="cpu", dtype=dtype or "bfloat16", revision=revision)
        if device_map == "auto":
            device_map = infer_auto_device_map(loaded.model, no_split_module_classes=getattr(
                loaded.model, "_no_split_modules", None) or [], dtype=loaded.model.dtype)
        loaded.model = dispatch_model(loaded.model, device_map=device_map)
        return loaded

    @property
    def numerics(self) -> str:
        """Device type and dtype: what makes the same model give other digits (bf16 GPU vs fp32 CPU)."""
        return f"{self.device.type}-{self.model.dtype}".replace("torch.", "")

    @property
    def device(self) -> torch.device:
        """Where inputs go (the first layer's device under a device map)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def prunable(self) -> list[str]:
        return [n for g in linear_groups(self.model) for n in g.modules]

    # ------------------------------------------------------------------ text formatting

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt(self, system: str | None, user: str) -> str:
        """The text that precedes the model's answer to `user` (with `system` as system prompt)."""
        if self.has_chat_template:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        head = f"{system}\n\n" if system else ""
        return f"{head}Question: {user}\nAnswer:"

    def encode_many(self, texts: Sequence[str], *, continuation: bool = False) -> list[list[int]]:
        """`encode` of many texts in one tokenizer call."""
        texts = list(texts)
        if not texts:
            return []
        if continuation and not self.has_chat_template:
            texts = [" " + t if t and not t[0].isspace() else t for t in texts]
        special = not continuation and not self.has_chat_template
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def encode(self, text: str, *, continuation: bool = False) -> list[int]:
        """Token ids; chat-formatted text carries its own special tokens, so none are added."""
        if continuation and not self.has_chat_template and text and not text[0].isspace():
            text = " " + text
        special = not continuation and not self.has_chat_template
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    # ------------------------------------------------------------------ scoring primitives

    def _pad(self, seqs: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            att[i, sl] = 1
        return ids.to(self.device), att.to(self.device)

    def _forward(self, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.accelerator.autocast():
            return self.model(input_ids=ids, attention_mask=att, use_cache=False).logits

    def _split(self) -> tuple[nn.Module | None, nn.Module | None]:
        """(decoder body, LM head): scoring runs the head on scored positions only."""
        if getattr(self, "_parts", None) is None:
            try:
                body, head = body_and_head(self.model)
            except ValueError:
                body = head = None
            ok = body is not None
            self._parts = (body, head)
            if ok:
                params = inspect.signature(body.forward).parameters
                self._cache_kw = "cache" if "cache" in params else "past_key_values"
        return self._parts

    def _hidden(self, ids: torch.Tensor, att: torch.Tensor, **kw: Any) -> Any:
        body, _ = self._split()
        with torch.inference_mode(), self.accelerator.autocast():
            return body(input_ids=ids, attention_mask=att, **kw)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head (with the model's final logit soft-capping, if any) over final hidden states, fp32."""
        _, head = self._split()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        with torch.inference_mode(), self.accelerator.autocast():
            logits = head(hidden).float()
        return torch.tanh(logits / cap) * cap if cap else logits

    def _head_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """log p(target) from final hidden states (N, D): the LM head over these N rows only (fp32, CPU)."""
        out = []
        for i in range(0, hidden.shape[0], chunk):
            logits = self._logits(hidden[i: i + chunk])
            tgt = targets[i: i + chunk].to(logits.device)
            out.append((logits.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(logits, -1)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _full_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, vocab) log-probs from final hidden states (N, D) (fp32, CPU)."""
        return torch.log_softmax(self._logits(hidden), -1).cpu()

    def continuation_logprobs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """Per (context ids, continuation ids): the log-prob of each continuation token (fp32, CPU).

        Batches of similar lengths, right-padded; the last continuation token is never fed
        (nothing is predicted from it) and the LM head runs only on the positions scored.
        """
        out: list[torch.Tensor | None] = [None] * len(pairs)
        cap = self.config_max_length
        jobs = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"item {i}: empty continuation")
            cont = cont[: cap - 1]
            ctx = self.cut(ctx, cap - len(cont))
            if not ctx:  # the first token has nothing to be predicted from
                ctx, cont = cont[:1], cont[1:]
                if not cont:
                    out[i] = torch.zeros(0)
                    continue
            jobs.append((i, ctx, cont))
        jobs.sort(key=lambda j: len(j[1]) + len(j[2]), reverse=True)  # similar lengths share a batch
        bs = self.batch_size
        body, _ = self._split()
        for b in range(0, len(jobs), bs):
            batch = jobs[b: b + bs]
            ids, att = self._pad([c + t[:-1] for _, c, t in batch])
            rows = torch.cat([torch.full((len(t),), r, dtype=torch.long) for r, (_, _, t) in enumerate(batch)])
            pos = torch.cat([torch.arange(len(c) - 1, len(c) + len(t) - 1) for _, c, t in batch])
            tgt = torch.tensor([x for _, _, t in batch for x in t], dtype=torch.long)
            if body is None:  # no separable head: full logits
                logits = self._forward(ids, att)
                lp = torch.log_softmax(logits[rows.to(logits.device), pos.to(logits.device)].float(), -1)
                flat = lp.gather(1, tgt.to(lp.device)[:, None])[:, 0].cpu()
            else:
                h = self._hidden(ids, att, use_cache=False).last_hidden_state
                flat = self._head_logprobs(h[rows.to(h.device), pos.to(h.device)], tgt)
            for (i, _, t), part in zip(batch, flat.split([len(t) for _, _, t in batch])):
                out[i] = part
        return out  # type: ignore[return-value]

    #: reuse the key/value cache of a prefix shared by many continuations (speed only: same numbers)
    reuse_prefix: bool = True

    def prefix_logprobs(self, prefix: list[int], conts: Sequence[list[int]]) -> list[torch.Tensor]:
        """`continuation_logprobs` for many continuations of one shared prefix.

        The prefix runs once; its key/value cache is repeated over each batch of
        continuations, so a long few-shot prompt costs one forward pass per
        (persona, condition) instead of one per statement or text window. Where a
        prefix and a continuation exceed ``max_length``, the prefix is cut from the
        left exactly as `continuation_logprobs` cuts a context (`cut`), and continuations
        that keep the same part of it share one cache. Falls back to the plain path
        when reuse is off, the model has no separable head, or a continuation alone
        leaves no room for context.
        """
        body, _ = self._split()
        cap = self.config_max_length
        if (not self.reuse_prefix or body is None or not prefix or not conts
                or max(len(c) for c in conts) >= cap):
            return self.continuation_logprobs([(prefix, c) for c in conts])
        if any(not c for c in conts):
            raise ValueError("empty continuation")
        kept: dict[int, list[int]] = {}  # prefix tokens kept -> continuations (the plain path's left cut)
        for i, c in enumerate(conts):
            kept.setdefault(min(len(prefix), cap - len(c)), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(conts)
        for keep, idx in kept.items():
            for i, lp in zip(idx, self._cached_prefix_logprobs(self.cut(prefix, keep), [conts[i] for i in idx])):
                out[i] = lp
        return out  # type: ignore[return-value]

    def _cached_prefix_logprobs(self, prefix: list[int], conts: list[list[int]]) -> list[torch.Tensor]:
        """`prefix_logprobs` of continuations that each fit after the whole prefix (one cache)."""
        dev = self.device
        pre = torch.tensor([prefix], dtype=torch.long, device=dev)
        first = self._hidden(pre, torch.ones_like(pre), use_cache=True)
        cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
        # every continuation's first token is predicted from the prefix's last position: one head row
        lp_all = self._full_logprobs(first.last_hidden_state[0, -1:])[0]
        out: list[torch.Tensor] = [lp_all[c[0]: c[0] + 1] for c in conts]
        jobs = sorted((i for i in range(len(conts)) if len(conts[i]) > 1), key=lambda i: -len(conts[i]))
        n = len(prefix)
        for b in range(0, len(jobs), self.batch_size):
            batch = jobs[b: b + self.batch_size]
            seqs = [conts[i][:-1] for i in batch]
            ids, att = self._pad(seqs)
            full = torch.cat([torch.ones((len(batch), n), dtype=att.dtype, device=att.device), att], 1)
            position = (n + torch.arange(ids.shape[1], device=ids.device)).expand(len(batch), -1)
            kv = copy.deepcopy(cache)
            kv.batch_repeat_interleave(len(batch))
            h = self._hidden(ids, full, position_ids=position, use_cache=True,
                             **{self._cache_kw: kv}).last_hidden_state
            rows = torch.cat([torch.full((len(s),), r, dtype=torch.long) for r, s in enumerate(seqs)])
            pos = torch.cat([torch.arange(len(s)) for s in seqs])
            tgt = torch.tensor([x for i in batch for x in conts[i][1:]], dtype=torch.long)
            flat = self._head_logprobs(h[rows.to(h.device), pos.to(h.device)], tgt)
            for i, part in zip(batch, flat.split([len(conts[i]) - 1 for i in batch])):
                out[i] = torch.cat([out[i], part])
        return out

    def next_token_logprobs(self, contexts: Sequence[list[int]]) -> torch.Tensor:
        """(len(contexts), vocab) log-probs of the token after each context (fp32, CPU)."""
        cap = self.config_max_length
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]), reverse=True)
        rows: dict[int, torch.Tensor] = {}
        for b in range(0, len(order), self.batch_size):
            idx = order[b: b + self.batch_size]
            seqs = [self.cut(list(contexts[i]), cap) for i in idx]
            ids, att = self._pad(seqs)
            logits = self._forward(ids, att)
            last = torch.tensor([len(s) - 1 for s in seqs], device=logits.device)
            lp = torch.log_softmax(logits[torch.arange(len(idx), device=logits.device), last].float(), -1).cpu()
            for k, i in enumerate(idx):
                rows[i] = lp[k]
        return torch.stack([rows[i] for i in range(len(contexts))]) if rows else torch.zeros(0)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of chat-formatted prompts (deterministic)."""
        answers: list[str] = []
        eos = self.tokenizer.eos_token_id
        for b in range(0, len(prompts), self.gen_batch_size):
            seqs = [self.encode(p) for p in prompts[b: b + self.gen_batch_size]]
            ids, att = self._pad(seqs, left=True)
            with torch.inference_mode(), self.accelerator.autocast():
                gen = self.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                          eos_token_id=eos)
            for row in gen[:, ids.shape[1]:]:
                answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers

    # knobs set per call by `evaluate_unit` (kept on the evaluator so primitives stay short)
    batch_size: int = EvalConfig.batch_size
    gen_batch_size: int = EvalConfig.gen_batch_size
    config_max_length: int = EvalConfig.max_length

    def configure(self, config: EvalConfig) -> None:
        self.batch_size, self.gen_batch_size, self.config_max_length = (
            config.batch_size, config.gen_batch_size, config.max_length)

    def masked(self, masks: dict[str, torch.Tensor] | None) -> ContextManager[None]:
        """Inside the block the model is masked (or dense for None); always restored after."""
        return self.masks.masked(masks)
