"""Loading a causal LM and its tokenizer, and the key that names its weights in the store.

`load_model(spec)` understands these specs:

* ``smollm2-135m`` (the default) and ``gemma3-270m``: built-in GGUF models, converted once and
  cached (`persona_core.models.builtin`);
* ``tiny-random-llama``: a small random Llama for tests and smoke runs (`persona_core.models.tiny`);
* anything else: a Hugging Face model id (``<id>@<revision>`` pins one) or a local folder
  (offline when ``HF_HUB_OFFLINE`` is set; nothing is ever downloaded by this project itself).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from persona_core.models.builtin import GEMMA3_ALIAS, SMOLLM2_ALIAS, cached_digest, gemma3_folder, smollm2_folder
from persona_core.models.tiny import TINY_ALIASES, tiny_key, tiny_random_llama
from persona_core.store.hashing import content_hash

log = logging.getLogger(__name__)

DEFAULT_MODEL = SMOLLM2_ALIAS


@dataclass
class LoadedModel:
    """A model, its tokenizer, and the key that names its weights in the store."""

    spec: str
    key: str
    model: nn.Module
    tokenizer: object
    source: str = ""  # where the weights came from (folder or description)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on `device` (cuda if present).

    A hub spec may carry its revision as ``<id>@<revision>`` (what a pipeline hands every stage,
    so a config's `revision` reaches each one's model key and weights)."""
    spec, revision = split_revision(spec, revision)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if spec in TINY_ALIASES:
        model, tok, seed = tiny_random_llama(revision)
        loaded = LoadedModel(spec=spec, key=tiny_key(spec, revision), model=model, tokenizer=tok,
                             source=f"random:seed={seed}")
    else:
        if spec == DEFAULT_MODEL:
            folder, ident = smollm2_folder()
            name = spec
        elif spec == GEMMA3_ALIAS:
            folder, ident = gemma3_folder()
            name = spec
        else:
            folder, ident = _resolve_hf(spec, revision)
            name = _slug(spec)
        loaded = _load_folder(spec, folder, name, ident, trust_remote_code, revision)
    loaded.model.to(device=dev, dtype=dt).eval()
    loaded.model.requires_grad_(False)
    _ensure_pad_token(loaded.tokenizer)
    log.info("loaded %s as %s on %s (%s)", spec, loaded.key, dev, dt)
    return loaded


def model_key(spec: str, *, revision: str | None = None) -> str:
    """The key of a model's weights without loading them (cheap after the first call)."""
    spec, revision = split_revision(spec, revision)
    if spec in TINY_ALIASES:
        return tiny_key(spec, revision)
    if spec == DEFAULT_MODEL:
        return _key(spec, smollm2_folder(convert=False)[1])  # the key names the GGUF: the cache is not needed
    if spec == GEMMA3_ALIAS:
        return _key(spec, gemma3_folder(convert=False)[1])
    return _key(_slug(spec), _resolve_hf(spec, revision)[1])


def model_folder(spec: str, *, revision: str | None = None) -> Path | None:
    """The folder on this node that `load_model(spec)` reads (a built-in model converted and checked in
    the model cache first, as a load does); None for the tiny random model, which has no files."""
    spec, revision = split_revision(spec, revision)
    if spec in TINY_ALIASES:
        return None
    if spec == DEFAULT_MODEL:
        return Path(smollm2_folder()[0])
    if spec == GEMMA3_ALIAS:
        return Path(gemma3_folder()[0])
    return Path(_resolve_hf(spec, revision)[0])


def with_revision(spec: str, revision: str | None) -> str:
    """The spec every stage gets: ``<id>@<revision>`` when a revision is pinned."""
    return f"{spec}@{revision}" if revision else spec


def split_revision(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """(spec, revision) from ``<id>@<revision>``; a local folder is never split. Two different
    revisions (in the spec and given apart), or one for a built-in alias, are a ValueError."""
    if "@" in spec and not os.path.isdir(spec):
        spec, _, pinned = spec.rpartition("@")
        if revision and revision != pinned:
            raise ValueError(f"model {spec!r}: revision {pinned!r} in the spec and {revision!r} given")
        revision = pinned or revision
    if revision and spec in TINY_ALIASES and not str(revision).isdigit():
        raise ValueError(f"model {spec!r}: a revision applies to hub models only (the tiny random model takes "
                         f"its seed, a non-negative integer, as its revision), got {revision!r}")
    if revision and (spec in (DEFAULT_MODEL, GEMMA3_ALIAS) or os.path.isdir(spec)):
        raise ValueError(f"model {spec!r}: a revision applies to hub models only, not a built-in alias or folder")
    return spec, revision


def _key(name: str, ident: str) -> str:
    return f"{name}-{content_hash(ident)[:8]}"


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.strip("/").split("/")[-1] if os.path.isdir(spec) else spec).strip("-").lower()


def _load_folder(spec, folder, name, ident, trust_remote_code, revision) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when a model loads

    kwargs = dict(trust_remote_code=trust_remote_code)
    if revision and not os.path.isdir(spec):
        kwargs["revision"] = revision
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except OSError as err:
        raise ValueError(f"cannot load model {spec!r}: {err}") from err
    return LoadedModel(spec=spec, key=_key(name, ident), model=model, tokenizer=tok, source=str(folder))


def _resolve_hf(spec: str, revision: str | None) -> tuple[str, str]:
    """A local folder or a hub id (from the local HF cache) and its weights' identity."""
    if os.path.isdir(spec):
        weights = sorted(p for p in Path(spec).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
        if not weights:
            raise ValueError(f"cannot load model {spec!r}: no weight files in that folder")
        return spec, "files:" + ",".join(f"{p.name}:{cached_digest(p)}" for p in weights)
    try:
        from huggingface_hub import snapshot_download  # only for a hub id

        folder = snapshot_download(spec, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as err:  # offline and not cached, unknown id, ...
        raise ValueError(f"cannot load model {spec!r}: {err}") from err
    return folder, f"hub:{spec}@{Path(folder).name}"  # the snapshot folder name is the commit hash


def _ensure_pad_token(tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
