"""``tiny-random-llama``: a small random Llama built from a config, seeded (its revision is its
seed), with a byte-level tokenizer built in code. For tests and smoke runs; no files needed."""

from __future__ import annotations

import torch
from torch import nn

from persona_core.store.hashing import content_hash

TINY_ALIASES = ("tiny-random-llama",)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tiny_config_dict() -> dict:
    return dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 bytes + specials), with a chat template.

    A BPE without merges over GPT-2's byte alphabet: every byte is one token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # heavy: only when the tokenizer is built
    from transformers import PreTrainedTokenizerFast  # heavy: only when the tokenizer is built

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


def tiny_key(spec: str, revision: str | None = None) -> str:
    """The tiny random model's key: its config and seed (its revision) hashed."""
    return f"{spec}-{content_hash(_tiny_config_dict(), f'seed={_tiny_seed(revision)}')[:8]}"


def tiny_random_llama(revision: str | None = None) -> tuple[nn.Module, object, int]:
    """(model, tokenizer, seed): the tiny random Llama, seeded by its revision."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: only when the tiny model is built

    cfg = _tiny_config_dict()
    tok = byte_tokenizer()
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed := _tiny_seed(revision))
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model, tok, seed
