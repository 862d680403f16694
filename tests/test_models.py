import pytest
import torch

from persona_core.models import builtin
from persona_core.models.layers import linear_groups
from persona_core.models.loading import load_model, model_key, pick_dtype


def test_tiny_random_llama_is_seeded_and_keyed(tiny):
    again = load_model("tiny-random-llama")
    for (n, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert tiny.key == again.key == model_key("tiny-random-llama")
    assert tiny.key.startswith("tiny-random-llama-")


def test_byte_tokenizer_round_trips_and_templates(tiny):
    tok = tiny.tokenizer
    text = "héllo, wörld!"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert tok.pad_token_id is not None


def test_layer_groups_on_tiny_llama(tiny):
    groups = linear_groups(tiny.model)
    assert [g.name for g in groups[:4]] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    assert len(groups) == 4 * tiny.model.config.num_hidden_layers
    attn_in = groups[0]
    assert attn_in.modules == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert groups[2].modules == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert groups[3].in_features == tiny.model.config.intermediate_size
    names = {m for g in groups for m in g.modules}
    assert not any("embed" in n or "lm_head" in n for n in names)
    linears = {n for n, m in tiny.model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    assert names == linears


def _tiny(config_cls, model_cls, **kw):
    cfg = config_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, **kw)
    return model_cls(cfg)


@pytest.mark.parametrize("arch", ["qwen2", "gemma", "mistral", "gpt_neox"])
def test_layer_groups_other_architectures(arch):
    import transformers as tf

    if arch == "gpt_neox":
        model = _tiny(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM)
        expect = {"attn_in": ["query_key_value"], "attn_out": ["dense"], "mlp_in": ["dense_h_to_4h"],
                  "mlp_out": ["dense_4h_to_h"]}
    else:
        cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
        model = _tiny(*cls, num_key_value_heads=2, head_dim=8)
        expect = {"attn_in": ["q_proj", "k_proj", "v_proj"], "attn_out": ["o_proj"],
                  "mlp_in": ["gate_proj", "up_proj"], "mlp_out": ["down_proj"]}
    groups = linear_groups(model)
    assert len(groups) == 8
    for g in groups[:4]:
        assert [m.rsplit(".", 1)[-1] for m in g.modules] == expect[g.name]
        widths = {model.get_submodule(m).in_features for m in g.modules}
        assert widths == {g.in_features}


def test_local_folder_model_key_follows_weights(tmp_path, tiny):
    folder = tmp_path / "m"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    loaded = load_model(str(folder))
    assert loaded.key == model_key(str(folder)) and loaded.key.startswith("m-")
    x = torch.tensor([[1, 2, 3]])
    assert torch.allclose(loaded.model(x).logits, tiny.model(x).logits)
    with torch.no_grad():
        loaded.model.lm_head.weight[0, 0] += 1
    loaded.model.save_pretrained(folder)
    assert model_key(str(folder)) != loaded.key


def test_unknown_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


def test_dtype_choice():
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("int3", torch.device("cpu"))


@pytest.mark.slow
def test_default_model_loads_from_cache_the_second_time(monkeypatch):
    first = load_model()
    monkeypatch.setattr(builtin, "convert_gguf", lambda *a: pytest.fail("converted again"))
    second = load_model()
    assert first.key == second.key and first.key.startswith("smollm2-135m-")
    groups = linear_groups(second.model)
    assert len(groups) == 4 * 30 and groups[3].in_features == 1536
    assert not any(p.requires_grad for p in second.model.parameters())
    ids = second.tokenizer("The capital of France is", return_tensors="pt")
    out = second.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in second.tokenizer.decode(out[0])
