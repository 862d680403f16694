"""The statistics recorder: forward pre-hooks that reduce every prunable linear input on the fly.

One forward pre-hook per `LinearGroup` (on its first module: q/k/v share one input,
gate/up share one), so every shared input is reduced once. Per batch the hook
makes three batched matmuls of the (B, 1, T) token weights (1 real, 0 padding)
with x, |x| and x*x of the (B, T, D) input, which gives every sample's sums over
its own real tokens in one BLAS call each. From those, in float64 on the model's
device:

    sum    += sum_t x          sumabs   += sum_t |x|        sumsq = sum_s ||x_s||^2
    norm_sum += sum_s ||x_s||  norm_sumsq += sum_s ||x_s||^2

Only real tokens count (``tokens`` is the number of unpadded tokens), unlike
Wanda's running average, which counts sequences and includes padding.

The same five statistics are recorded for the residual stream entering every
decoder layer (group ``residual``, width = hidden size; a forward pre-hook on
the layer itself): its per-channel token mean is what activation steering
(`persona_core.eval.steering`) contrasts between personas. Mask methods read only
the linear groups; stores calibrated before this group existed still load, the
group is simply absent there.

`calibrate` records the statistics of a list of texts, `calibrate_persona` those of one shard
of a persona's calibration texts (see `persona_core.calib.texts`).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from persona_core.calib.attribution import attribution
from persona_core.calib.config import CalibConfig
from persona_core.calib.stats import GroupKey, GroupStats, PersonaStats, Shard
from persona_core.calib.texts import batches, shard_texts
from persona_core.catalog.personas import Persona
from persona_core.models.layers import decoder_body, decoder_layers, linear_groups
from persona_core.models.loading import LoadedModel

log = logging.getLogger(__name__)

RESIDUAL = "residual"  # group name of the residual stream entering a decoder layer


class StatsRecorder:
    """Forward pre-hooks that accumulate `GroupStats` for every linear group of a model.

    Use as a context manager (hooks are removed on exit), feed batches with `run_batch`.
    """

    def __init__(self, loaded: LoadedModel, residual: bool = True):
        self.loaded = loaded
        self.groups = linear_groups(loaded.model)
        device = loaded.device
        self.acc = {(g.layer, g.name): torch.zeros(4, g.in_features, dtype=torch.float64, device=device)
                    for g in self.groups}  # rows: sum, sumabs, norm_sum, sumsq
        self.layers = decoder_layers(loaded.model)[1] if residual else []
        width = loaded.model.get_input_embeddings().weight.shape[1]
        for i in range(len(self.layers)):
            self.acc[(i, RESIDUAL)] = torch.zeros(4, width, dtype=torch.float64, device=device)
        self.calls = {k: 0 for k in self.acc}
        self.tokens = 0
        self.samples = 0
        self._weights: torch.Tensor | None = None  # (B, 1, T) float32 token weights of the current batch
        self._handles: list = []

    def __enter__(self) -> "StatsRecorder":
        for g in self.groups:
            module = self.loaded.model.get_submodule(g.modules[0])
            self._handles.append(module.register_forward_pre_hook(self._hook((g.layer, g.name))))
        for i, layer in enumerate(self.layers):  # the residual stream entering each decoder layer
            reduce = self._hook((i, RESIDUAL))
            self._handles.append(layer.register_forward_pre_hook(
                lambda m, args, kwargs, r=reduce: r(m, args or (kwargs["hidden_states"],)), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, key: GroupKey):
        acc, calls = self.acc[key], self.calls

        def hook(module, args):
            x = args[0]
            if x.dtype != torch.float32:
                x = x.float()  # bf16/fp16 inputs are reduced in float32
            w = self._weights  # (B, 1, T): 1 for real tokens, 0 for padding
            # Three batched matmuls give per-sample sums over real tokens only (BLAS-fast, no masking pass).
            sq = torch.bmm(w, x * x).squeeze(1).double()  # (B, D): per-sample ||x||^2
            acc[0] += torch.bmm(w, x).sum(dim=(0, 1)).double()
            acc[1] += torch.bmm(w, x.abs()).sum(dim=(0, 1)).double()
            acc[2] += sq.sqrt().sum(0)
            acc[3] += sq.sum(0)
            calls[key] += 1

        return hook

    @torch.inference_mode()
    def run_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        mask = attention_mask.bool()
        self._weights = mask.to(torch.float32).unsqueeze(1)
        # Positions count real tokens only, so left and right padding give the same activations.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        try:
            decoder_body(self.loaded.model)(input_ids=input_ids, attention_mask=attention_mask,
                                            position_ids=position_ids, use_cache=False)
        finally:
            self._weights = None
        self.tokens += int(mask.sum())
        self.samples += int(mask.any(-1).sum())

    def result(self) -> dict[GroupKey, GroupStats]:
        for k, a in self.acc.items():
            if not bool(torch.isfinite(a).all()):
                raise ValueError(f"non-finite activation statistics at layer {k[0]} group {k[1]} "
                                 "(overflow in the model's dtype, or NaN at padded positions)")
        return {k: GroupStats(self.tokens, a[0].clone(), a[3].clone(), a[1].clone(), self.samples,
                              a[2].clone(), a[3].clone())
                for k, a in self.acc.items()}


def calibrate_persona(loaded: LoadedModel, persona: Persona, config: CalibConfig = CalibConfig(),
                      shard: Shard = Shard()) -> tuple[PersonaStats, list[dict[str, str]]]:
    """Statistics of one shard of a persona (on CPU), and the generated samples they came from."""
    texts, generated = shard_texts(loaded, persona, config, shard)
    if not texts:
        raise ValueError(f"persona {persona.id!r}: shard {shard.index} of {shard.count} holds no texts")
    groups = {k: g.to("cpu") for k, g in calibrate(loaded, texts, config).items()}
    return PersonaStats(loaded.key, persona.id, persona.content_hash, groups, config.hash), generated


def calibrate(loaded: LoadedModel, texts: Sequence[str], config: CalibConfig = CalibConfig(),
              *, residual: bool = True) -> dict[GroupKey, GroupStats]:
    """Statistics of every linear group's input (and of the residual stream entering each
    decoder layer, group ``residual``) over `texts` (float64, on the model's device)."""
    if not texts:
        raise ValueError("calibrate: no calibration texts")
    with StatsRecorder(loaded, residual=residual) as rec:
        for input_ids, attention_mask in batches(loaded, texts, config):
            rec.run_batch(input_ids, attention_mask)
    if rec.tokens == 0:
        raise ValueError("calibrate: the texts tokenised to nothing")
    log.debug("calibrated %d texts, %d tokens", rec.samples, rec.tokens)
    groups = rec.result()
    if config.attribution:
        groups.update(attribution(loaded, texts, config))
    return groups
