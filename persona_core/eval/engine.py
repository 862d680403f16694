"""Scoring persona subnetworks: mask apply/restore and the scoring engine.

One `Evaluator` holds one loaded model (placed by an `accelerate.Accelerator`:
bf16 on GPU, fp32 on CPU; `device_map="auto"` spreads a model too large for one
GPU). For each (persona, mask) unit, `evaluate_unit` scores the metrics of
`persona_core.eval.metrics` under up to four conditions:

* ``dense``          the unpruned model, no system prompt
* ``dense+prompt``   the unpruned model, the persona description as system prompt
                     (the prompting baseline)
* ``dense+fewshot``  retrieval-augmented prompting: the description plus k calibration
                     statements as examples (`persona_core.eval.fewshot`)
* ``dense+steer``    activation steering from the residual-stream statistics, layer and
                     coefficient chosen per pair on validation data (`persona_core.eval.steering`)
* ``masked``         the subnetwork, no prompt
* ``masked+prompt``  the subnetwork with the prompt

Dense conditions are computed once per persona (cached in the evaluator) and
repeated in every unit's rows, so each unit's table is self-contained. Masks
are applied in place and the dense weights restored bit-exactly: the evaluator
keeps one copy of the prunable weights, taken the first time a module is
masked; no reload per persona.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import torch
from torch import nn

from persona_core.catalog.personas import Persona
from persona_core.eval.estimates import mean_stderr, take  # noqa: F401  (re-exported: older callers import them from here)
from persona_core.store.hashing import content_hash
from persona_core.versions import EVALUATE_VERSION
from persona_core.models import DEFAULT_MODEL, LoadedModel, linear_groups, load_model

log = logging.getLogger(__name__)

CONDITIONS = ("dense", "dense+prompt", "dense+fewshot", "dense+steer", "masked", "masked+prompt")
DENSE_CONDITIONS = ("dense", "dense+prompt", "dense+fewshot", "dense+steer")
# dense+steer needs residual-stream statistics (the job reads them from the store), so it is opt-in
DEFAULT_CONDITIONS = ("dense", "dense+prompt", "dense+fewshot", "masked", "masked+prompt")
STEER_ROWS = ("steer-layer", "steer-alpha", "steer-val-separation", "steer-val-ppl-ratio", "steer-within-budget")
DENSE_METHOD = "dense"


# ---------------------------------------------------------------------------- masks


def _check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bool mask) per module; every problem is reported before anything changes."""
    problems, out = [], {}
    for name, mask in masks.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module in {type(model).__name__}")
            continue
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor):
            problems.append(f"{name}: module has no weight")
            continue
        if tuple(mask.shape) != tuple(weight.shape):
            problems.append(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
            continue
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point or mask.dtype.is_complex:
                problems.append(f"{name}: mask dtype {mask.dtype} (expected bool, True = keep)")
                continue
            mask = mask.bool()
        out[name] = (weight, mask)
    if problems:
        raise ValueError("masks do not fit the model:\n  " + "\n  ".join(problems))
    return out


class MaskedModel:
    """A model whose prunable weights can be swapped to a mask and back, cheaply.

    The first time a module is masked its dense weight is copied once (on
    `snapshot_device`, default: the weight's own device). `apply` then writes
    ``dense * keep`` into the weight in one pass (no restore needed between two
    masks), and `restore` is one `copy_` per module: bit-exact.
    """

    def __init__(self, model: nn.Module, snapshot_device: str | torch.device | None = None):
        self.model = model
        self.snapshot_device = snapshot_device
        self._dense: dict[str, torch.Tensor] = {}
        self.active: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def apply(self, masks: dict[str, torch.Tensor]) -> None:
        checked = _check_masks(self.model, masks)
        for name, (weight, _) in checked.items():
            if name not in self._dense:
                if self.active is not None and name in self.active:
                    raise RuntimeError(f"{name}: masked without a snapshot")
                dev = self.snapshot_device or weight.device
                self._dense[name] = weight.detach().to(dev, copy=True)
        stale = {n: w for n, w in (self.active or {}).items() if n not in checked}
        for name, weight in stale.items():  # masked before, not by this mask: back to dense
            weight.copy_(self._dense[name], non_blocking=True)
        for name, (weight, mask) in checked.items():
            # dense * keep in one pass (a uint8 view of the bool mask: the fastest kernel on CPU)
            keep = mask.to(weight.device, non_blocking=True).view(torch.uint8)
            torch.mul(self._dense[name].to(weight.device, non_blocking=True), keep, out=weight)
        self.active = {n: w for n, (w, _) in checked.items()}

    @torch.no_grad()
    def restore(self) -> None:
        if self.active is None:
            return
        for name, weight in self.active.items():
            weight.copy_(self._dense[name], non_blocking=True)
        self.active = None

    @contextlib.contextmanager
    def masked(self, masks: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """Inside the block the model is masked (or dense for None); always restored after."""
        if masks is None:
            yield
            return
        self.apply(masks)
        try:
            yield
        finally:
            self.restore()


def mask_content_hash(masks: dict[str, torch.Tensor]) -> str:
    """A stable hash of a mask set (names, shapes, bits), for masks built in memory."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].detach().to("cpu", torch.bool).contiguous()
        h.update(f"{name}:{tuple(m.shape)}\x00".encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class JudgeSettings:
    """Where the optional LLM judge lives: an OpenAI-compatible endpoint or a local model."""

    url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    local: str | None = None  # a model spec for `load_model` instead of an endpoint
    timeout: float = 60.0


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation's numbers; `.hash` keys its results."""

    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    metrics: tuple[str, ...] = ("statement-preference", "yes-no-agreement", "perplexity", "roleplay-fidelity")
    batch_size: int = 16  # sequences per forward pass
    gen_batch_size: int = 8  # prompts per generate() call
    max_statements: int = 32  # held-out statements per side (persona, opposite)
    max_questions: int = 8  # generic questions for role-play answers
    max_new_tokens: int = 40  # length of the dense model's in-role answers (and of sample generations)
    samples: int = 2  # generic questions answered per condition by the sample-generations metric
    max_length: int = 512  # tokens per sequence (contexts are cut from the left)
    ppl_window: int = 128  # tokens per perplexity window
    ppl_windows: int = 8  # windows per text
    ppl_texts: tuple[str, ...] = ()  # extra text files/datasets (URL or URL::field) for perplexity
    ppl_text: str | None = None  # the reported general text (e.g. wikitext-2/test.txt); None: built-in held-out
    seed: int = 0  # which items a max_* cap keeps
    # baselines (dense+fewshot, dense+steer) and what picks their settings
    fewshot_k: int = 8  # calibration statements shown as examples
    steer_layers: tuple[float, ...] = (0.25, 0.4, 0.55, 0.7)  # fractions of depth (or layer indices >= 1)
    steer_alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    ppl_budget: float = 1.10  # max general-text perplexity ratio of a chosen setting (validation text)
    val_statements: int = 16  # validation statements per pole, carved from the calibration statements
    val_text: str | None = None  # validation general text (e.g. wikitext-2/valid.txt); None: built-in
    val_window: int = 128
    val_windows: int = 8
    judge: JudgeSettings | None = None

    def __post_init__(self):
        object.__setattr__(self, "conditions", tuple(self.conditions))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "ppl_texts", tuple(self.ppl_texts))
        object.__setattr__(self, "steer_layers", tuple(self.steer_layers))
        object.__setattr__(self, "steer_alphas", tuple(self.steer_alphas))
        self.steer_settings  # validates the steering search space
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or not self.conditions:
            raise ValueError(f"unknown condition(s) {bad}: choose from {', '.join(CONDITIONS)}")
        from persona_core.eval.metrics import METRICS

        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"unknown metric(s) {unknown}: choose from {', '.join(METRICS)}")
        if self.fewshot_k < 0:
            raise ValueError(f"EvalConfig.fewshot_k must be >= 0, got {self.fewshot_k}")
        if "judge" in self.metrics and self.judge is None:
            raise ValueError("metric 'judge' needs judge settings (an endpoint URL or a local model)")
        for f in ("batch_size", "gen_batch_size", "max_statements", "max_questions", "max_new_tokens",
                  "max_length", "ppl_window", "ppl_windows", "val_statements", "val_window", "val_windows", "samples"):
            if getattr(self, f) < 1:
                raise ValueError(f"EvalConfig.{f} must be >= 1, got {getattr(self, f)}")

    @property
    def steer_settings(self):
        from persona_core.eval.steering import SteerSettings

        return SteerSettings(self.steer_layers, self.steer_alphas, self.ppl_budget)

    @property
    def hash(self) -> str:
        d = asdict(self)
        for k in ("batch_size", "gen_batch_size"):  # speed knobs never change a number
            d.pop(k)
        return content_hash(EVALUATE_VERSION, d)

    @property
    def dense_hash(self) -> str:
        """What decides the dense conditions' rows: the config with only its dense conditions (two runs
        that differ only in their masked conditions share the dense rows)."""
        return replace(self, conditions=tuple(c for c in self.conditions if c in DENSE_CONDITIONS) or ("dense",)).hash

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# ---------------------------------------------------------------------------- evaluator


class Evaluator:
    """One loaded model and the primitives metrics are built from.

    `model` is a spec for `load_model` or an already loaded `LoadedModel`.
    """

    def __init__(self, model: str | LoadedModel = DEFAULT_MODEL, *, device: str | None = None,
                 dtype: str | None = None, device_map: str | dict | None = None,
                 snapshot_device: str | None = None, revision: str | None = None):
        from accelerate import Accelerator

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
        self._dense_cache: dict[tuple, tuple[dict, list[dict]]] = {}
        self._steer_cache: dict[tuple, tuple] = {}
        self.timings: dict[str, float] = {}

    @staticmethod
    def _load_dispatched(spec: str, device_map, dtype, revision: str | None = None) -> LoadedModel:
        """Big-model loading: weights on CPU first, then spread over the visible GPUs."""
        from accelerate import dispatch_model, infer_auto_device_map

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
            get = getattr(self.model, "get_decoder", None)
            body = get() if callable(get) else None
            head = self.model.get_output_embeddings()
            ok = isinstance(body, nn.Module) and isinstance(head, nn.Module) and body is not self.model
            self._parts = (body, head) if ok else (None, None)
            if ok:
                params = inspect.signature(body.forward).parameters
                self._cache_kw = "cache" if "cache" in params else "past_key_values"
        return self._parts

    def _hidden(self, ids: torch.Tensor, att: torch.Tensor, **kw):
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
            ctx = ctx[-(cap - len(cont)):] if ctx else []
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
        (persona, condition) instead of one per statement. Falls back to the plain
        path when reuse is off, the model has no separable head, or a sequence
        would exceed ``max_length``.
        """
        body, _ = self._split()
        longest = max((len(c) for c in conts), default=0)
        if (not self.reuse_prefix or body is None or not prefix or not conts
                or len(prefix) + longest > self.config_max_length):
            return self.continuation_logprobs([(prefix, c) for c in conts])
        if any(not c for c in conts):
            raise ValueError("empty continuation")
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
            seqs = [list(contexts[i])[-cap:] for i in idx]
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

    # ------------------------------------------------------------------ conditions

    def masked(self, masks: dict[str, torch.Tensor] | None):
        return self.masks.masked(masks)

    def score_condition(self, persona: Persona, opposite: Persona | None, condition: str,
                        config: EvalConfig, prepared: dict) -> list[dict]:
        """Rows (metric, value, n, stderr, items) of every configured metric under the current
        weights (and hooks); the condition decides the system prompt."""
        from persona_core.eval.fewshot import FewShot
        from persona_core.eval.metrics import METRICS, MetricContext

        system = persona.description if condition.endswith("+prompt") else None
        fewshot = (FewShot.for_persona(persona, opposite, config.fewshot_k, config.seed)
                   if condition.endswith("+fewshot") else None)
        rows = []
        for name in config.metrics:
            t0 = time.perf_counter()
            ctx = MetricContext(self, persona, opposite, system, config, prepared.get(name), fewshot)
            for sub, score in METRICS[name].fn(ctx).items():
                rows.append({"condition": condition, "metric": sub, "value": float(score.value),
                             "n": int(score.n), "stderr": float(score.stderr),
                             "items": list(score.items) if score.items is not None else None,
                             "items_own": int(score.split),
                             "texts": list(score.texts) if score.texts is not None else None})
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        return rows

    def dense_state(self, persona: Persona, opposite: Persona | None, config: EvalConfig,
                    stats: dict | None = None, rows_cache: "DenseRowCache | None" = None) -> tuple[dict, list[dict]]:
        """Per-persona work done once with the dense weights: metric preparation and dense rows.

        `stats` (persona id -> `PersonaStats`, holding the persona and its opposite, or
        ``general`` for a persona without one) is needed by ``dense+steer`` only. `rows_cache`
        (a `DenseRowCache`) keeps the dense rows across runs: found there, they are not recomputed.
        """
        from persona_core.eval.metrics import METRICS, MetricContext

        ident = dense_ident(self.model_key, persona, opposite, config, stats, self.numerics)
        memo = (ident, config.hash)  # the full config: whether masked conditions need `prepared`
        if memo not in self._dense_cache:
            self.masks.restore()  # a unit may have left its mask applied (restore=False)
            rows = rows_cache.get(ident, persona, opposite, config) if rows_cache is not None else None
            prepared = {}
            if rows is None or any(c not in DENSE_CONDITIONS for c in config.conditions):
                for name in config.metrics:
                    if METRICS[name].prepare is not None:
                        prepared[name] = METRICS[name].prepare(MetricContext(self, persona, opposite, None, config,
                                                                             None))
            if rows is None:
                rows = []
                for cond in DENSE_CONDITIONS:
                    if cond not in config.conditions:
                        continue
                    if cond == "dense+steer":
                        rows += self.steered_rows(persona, opposite, config, prepared, stats)
                    else:
                        rows += self.score_condition(persona, opposite, cond, config, prepared)
                if rows_cache is not None:
                    rows_cache.put(ident, persona, opposite, config, rows)
            self._dense_cache[memo] = (prepared, rows)
        return self._dense_cache[memo]

    # ------------------------------------------------------------------ steering

    def steering_choice(self, persona: Persona, opposite: Persona | None, config: EvalConfig,
                        stats: dict | None):
        """(this persona's steering vectors, the pair's `SteerChoice`), chosen once per pair.

        The choice reads only calibration statistics, validation statements (carved from
        the calibration statements) and the validation general text (`config.val_text`).
        """
        from persona_core.catalog import REFERENCE_PERSONA_ID
        from persona_core.eval.steering import MissingResidualStats, choose, layers_of, steer, steering_vectors
        from persona_core.eval.validation import (perplexity_ratio, statement_scores, text_windows, validation_separation,
                                 validation_statements, window_perplexity)

        ref_id = opposite.id if opposite is not None else REFERENCE_PERSONA_ID
        missing = [pid for pid in (persona.id, ref_id) if not stats or pid not in stats]
        if missing:
            raise MissingResidualStats(
                f"dense+steer for {persona.id!r} needs the calibration statistics (with the residual group) of "
                f"{', '.join(repr(m) for m in missing)}: calibrate them (the evaluate job reads them from the store)")
        if opposite is not None:
            a, b = sorted([persona, opposite], key=lambda p: p.id)
        else:
            a, b = persona, None
        ident = (a.id, b.id if b else REFERENCE_PERSONA_ID, _stats_ident(stats), config.hash)
        if ident not in self._steer_cache:
            va = steering_vectors(stats[a.id], stats[b.id if b else REFERENCE_PERSONA_ID])
            windows = text_windows(self.tokenizer, config.val_text or "builtin:general", config.val_window,
                                   config.val_windows)
            self.masks.restore()  # choices are made on the dense model
            reference = window_perplexity(self, windows)
            settings = config.steer_settings
            if b is not None:
                def evaluate(layer: int, alpha: float) -> tuple[float, float]:
                    plus = lambda: steer(self.model, layer, va[layer], alpha)  # noqa: E731
                    minus = lambda: steer(self.model, layer, -va[layer], alpha)  # noqa: E731
                    sep = validation_separation(self, a, b, plus, minus, n=config.val_statements, seed=config.seed)
                    ratio = max(perplexity_ratio(self, windows, reference, plus),
                                perplexity_ratio(self, windows, reference, minus))
                    return sep, ratio
            else:  # no opposite: the gain in mean log-prob of the persona's own validation statements
                val = validation_statements(a, config.val_statements, config.seed)
                base = sum(statement_scores(self, val)) / max(len(val), 1)

                def evaluate(layer: int, alpha: float) -> tuple[float, float]:
                    with steer(self.model, layer, va[layer], alpha):
                        gain = sum(statement_scores(self, val)) / max(len(val), 1) - base
                    return gain, perplexity_ratio(self, windows, reference,
                                                  lambda: steer(self.model, layer, va[layer], alpha))
            choice = choose(layers_of(self.model), settings, evaluate)
            log.info("steering %s/%s: layer %d alpha %g (validation separation %.3f, ppl x%.3f)", a.id,
                     b.id if b else REFERENCE_PERSONA_ID, choice.layer, choice.alpha, choice.separation, choice.ppl_ratio)
            self._steer_cache[ident] = (va, choice)
        va, choice = self._steer_cache[ident]
        sign = 1.0 if persona.id == a.id else -1.0
        return {k: sign * v for k, v in va.items()}, choice

    def steered_rows(self, persona: Persona, opposite: Persona | None, config: EvalConfig, prepared: dict,
                     stats: dict | None) -> list[dict]:
        from persona_core.eval.steering import steer

        vectors, choice = self.steering_choice(persona, opposite, config, stats)
        with steer(self.model, choice.layer, vectors[choice.layer], choice.alpha):
            rows = self.score_condition(persona, opposite, "dense+steer", config, prepared)
        extra = {"steer-layer": choice.layer, "steer-alpha": choice.alpha,
                 "steer-val-separation": choice.separation, "steer-val-ppl-ratio": choice.ppl_ratio,
                 "steer-within-budget": float(choice.within_budget)}
        return rows + [{"condition": "dense+steer", "metric": k, "value": float(v), "n": len(choice.tried),
                        "stderr": float("nan"), "items": None, "items_own": 0, "texts": None}
                       for k, v in extra.items()]


def _stats_ident(stats: dict | None) -> tuple:
    return tuple(sorted((pid, s.persona_hash, s.calib_hash, s.tokens, len(s.groups)) for pid, s in (stats or {}).items()))


def dense_ident(model_key: str, persona: Persona, opposite: Persona | None, config: EvalConfig,
                stats: dict | None = None, numerics: str = "") -> str:
    """Everything the dense rows of one persona depend on, hashed: the model (and where and in what
    precision it runs), the persona's evaluation data and description, its opposite's, the config's
    dense part and (for dense+steer) the statistics."""
    steer = _residual_digest(stats) if "dense+steer" in config.conditions else None
    return content_hash(EVALUATE_VERSION, model_key, numerics, persona.evaluation_hash, persona.description,
                        opposite.evaluation_hash if opposite else None, config.dense_hash, steer)[:16]


def _residual_digest(stats: dict | None) -> str:
    """A digest of what the steering baseline reads from the statistics: each persona's residual-stream
    token counts and sums (the same numbers under another calibration option give the same digest)."""
    h = hashlib.sha256()
    for pid, s in sorted((stats or {}).items()):
        h.update(f"{pid}\0".encode())
        for key in sorted(k for k in s.groups if k[1] == "residual"):
            g = s.groups[key]
            h.update(f"{key[0]}:{g.tokens}\0".encode())
            h.update(g.sum.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


class DenseRowCache:
    """Dense-condition rows kept in the store across runs (``dense/model=<k>/persona=<id>/rows-<ident>.parquet``).

    The prompt, few-shot and steering baselines (the steering search above all) cost more than a
    masked condition, and they do not change when only the masks do: a nightly run with new masks,
    or a study adding a method to a catalog already evaluated, reads them back instead. What is
    read is verified (model, persona, opposite, evaluation data, dense config, code version, the
    conditions asked for) and a mismatch is recomputed and overwritten, never used.
    """

    def __init__(self, store, model_key: str):
        self.store, self.model_key = store, model_key

    def key(self, ident: str, persona: Persona) -> str:
        from persona_core.store import layout

        return layout.dense_rows(self.model_key, persona.id, ident)

    def get(self, ident: str, persona: Persona, opposite: Persona | None, config: EvalConfig) -> list[dict] | None:
        key = self.key(ident, persona)
        if not self.store.exists(key):
            return None
        try:
            table = self.store.read_parquet(key)
            problem = self._check(table, persona, opposite, config)
        except Exception as err:  # unreadable: recompute, the rewrite replaces it
            problem = f"{type(err).__name__}: {err}"
        if problem:
            log.warning("%s: %s; recomputing the dense rows", self.store.uri(key), problem)
            return None
        cols = ("condition", "metric", "value", "n", "stderr", "items", "items_own", "texts")
        return [{c: r[c] for c in cols} for r in table.to_pylist()]

    def _check(self, table: pa.Table, persona: Persona, opposite: Persona | None, config: EvalConfig) -> str:
        if not table.schema.equals(RESULT_SCHEMA):
            return "not the result schema"
        want = {"model": self.model_key, "persona": persona.id, "opposite": opposite.id if opposite else "",
                "method": DENSE_METHOD, "config_hash": config.dense_hash, "eval_hash": persona.evaluation_hash,
                "code_version": EVALUATE_VERSION}
        for col, value in want.items():
            found = set(table.column(col).to_pylist())
            if found != {value}:
                return f"column {col!r} holds {sorted(map(str, found))}, expected {value!r}"
        conditions = set(table.column("condition").to_pylist())
        asked = {c for c in config.conditions if c in DENSE_CONDITIONS}
        if conditions != asked:
            return f"conditions {sorted(conditions)}, expected {sorted(asked)}"
        return ""

    def put(self, ident: str, persona: Persona, opposite: Persona | None, config: EvalConfig, rows: list[dict]) -> None:
        if not rows:
            return
        common = {"model": self.model_key, "persona": persona.id, "opposite": opposite.id if opposite else "",
                  "method": DENSE_METHOD, "sparsity": 0.0, "granularity": "", "mask_hash": "",
                  "config_hash": config.dense_hash, "eval_hash": persona.evaluation_hash, "code_version": EVALUATE_VERSION}
        self.store.write_parquet(self.key(ident, persona),
                                 pa.Table.from_pylist([{**common, **r} for r in rows], schema=RESULT_SCHEMA))


# ---------------------------------------------------------------------------- units


RESULT_SCHEMA = pa.schema([
    ("model", pa.string()), ("persona", pa.string()), ("opposite", pa.string()),
    ("method", pa.string()), ("sparsity", pa.float64()), ("granularity", pa.string()),
    ("mask_hash", pa.string()), ("condition", pa.string()), ("metric", pa.string()),
    ("value", pa.float64()), ("n", pa.int64()), ("stderr", pa.float64()),
    ("config_hash", pa.string()), ("eval_hash", pa.string()), ("code_version", pa.string()),
    # per-item scores behind `value` (statement-preference: each own statement's mean token log-prob,
    # then each opposite statement's; `items_own` own ones first): what bootstrap intervals resample
    ("items", pa.list_(pa.float64())), ("items_own", pa.int64()),
    ("texts", pa.list_(pa.string())),  # generated texts (sample-generations: "question\nanswer")
])


def _meta(mask_meta: dict | None, masks: dict | None) -> tuple[str, float, str, str]:
    meta = dict(mask_meta or {})
    if masks is None:
        return DENSE_METHOD, 0.0, "", ""
    method = str(meta.get("method") or "unknown")
    sparsity = float(meta.get("sparsity") or 0.0)
    granularity = str(meta.get("granularity") or "unstructured")
    mhash = next((str(meta[k]) for k in ("content_hash", "mask_hash", "hash") if meta.get(k)), None)
    return method, sparsity, granularity, mhash or mask_content_hash(masks)


def evaluate_unit(evaluator: Evaluator, persona: Persona, opposite: Persona | None,
                  masks: dict[str, torch.Tensor] | None, mask_meta: dict | None,
                  config: EvalConfig, *, restore: bool = True, stats: dict | None = None,
                  rows_cache: DenseRowCache | None = None) -> pa.Table:
    """Score one (persona, mask) unit: one row per (condition, metric).

    `stats` (persona id -> `PersonaStats` of the persona and its opposite, or of
    ``general``) feeds ``dense+steer``; other conditions never read it.

    `masks=None` scores the dense conditions only (method ``dense``). Dense rows
    come from the evaluator's per-persona cache (and from `rows_cache`, the store's,
    across runs); masked conditions apply the
    mask in place and restore the dense weights afterwards. ``restore=False``
    leaves the mask applied for a loop over many masks: the next mask is written
    straight over it from the dense snapshot, and the dense weights come back
    (bit-exact) whenever they are next needed or on `evaluator.masks.restore()`.
    """
    evaluator.configure(config)
    method, sparsity, granularity, mhash = _meta(mask_meta, masks)
    prepared, dense_rows = evaluator.dense_state(persona, opposite, config, stats, rows_cache)
    rows = list(dense_rows)
    masked_conds = [c for c in config.conditions if c not in DENSE_CONDITIONS]
    if masks is not None and masked_conds:
        evaluator.masks.apply(masks)
        try:
            for cond in masked_conds:
                rows += evaluator.score_condition(persona, opposite, cond, config, prepared)
        finally:
            if restore:
                evaluator.masks.restore()
    rows += budget_rows(mask_meta)
    common = {"model": evaluator.model_key, "persona": persona.id, "opposite": opposite.id if opposite else "",
              "method": method, "sparsity": sparsity, "granularity": granularity, "mask_hash": mhash,
              "config_hash": config.hash, "eval_hash": persona.evaluation_hash, "code_version": EVALUATE_VERSION}
    return pa.Table.from_pylist([{**common, **r} for r in rows], schema=RESULT_SCHEMA)


def budget_rows(mask_meta: dict | None) -> list[dict]:
    """A budgeted mask's choice as result rows (condition ``masked``): the chosen sparsity and strength,
    and the validation figures the search saw (``budget-*`` metrics; see persona_core.masks.budget)."""
    search = ((mask_meta or {}).get("budget_search") or {}).get("search")
    if not search:
        return []
    chosen = search["chosen"]
    figures = {"budget-sparsity": chosen["sparsity"], "budget-strength": chosen["strength"],
               "budget-val-ppl-ratio": mask_meta["budget_search"].get("final_perplexity_ratio"),
               "budget-val-separation": chosen["separation"], "budget-within": float(bool(search["within_budget"])),
               "budget-points": len(search["points"])}
    return [{"condition": "masked", "metric": k, "value": float("nan") if v is None else float(v), "n": 1,
             "stderr": float("nan")} for k, v in figures.items()]

