"""The anatomy of a decoder LM: its decoder blocks, the prunable linear layers grouped by the input
they share, and the split into decoder body and LM head."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body, LM head) of a causal LM: the body gives the final hidden states, the head
    turns them into logits (so a scorer can run the head on scored positions only).
    ValueError for a model that does not split so."""
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    out = getattr(model, "get_output_embeddings", None)
    head = out() if callable(out) else None
    if not isinstance(body, nn.Module) or body is model or not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__}: cannot split into decoder body and LM head")
    return body, head


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (statistics never need logits); the model itself when it
    does not split (`body_and_head`)."""
    try:
        return body_and_head(model)[0]
    except ValueError:
        return model
