"""The public API (persona_core.api, re-exported by persona_core): list and read stored masks, apply one
to a loaded model and take it off bit-exactly, and the runnable example of docs/using-masks.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import persona_core
from persona_core.masks.build import build_masks
from persona_core.masks.codec import write_mask
from persona_core.masks.spec import MaskSpec, spec_key
from persona_core.store import layout

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 99, 3, 42, 7]])


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def loaded():
    from persona_core.models.loading import load_model

    return load_model("tiny-random-llama", device="cpu")  # a fresh one: these tests mask it in place


def stored_masks(store, loaded) -> dict[str, str]:
    """Two persona masks (stored as a per-persona method's would be) and a shared one; persona -> key."""
    keys = {}
    for owner, spec in (("introvert", MaskSpec("magnitude", 0.5)), ("extrovert", MaskSpec("magnitude", 0.25)),
                        ("general", MaskSpec("magnitude", 0.5, "ffn-channels"))):
        key = (spec_key(loaded.key, spec, owner) if owner == "general" else
               layout.mask(loaded.key, layout.method_segment("wanda"), spec.sparsity, owner))
        write_mask(store, key, build_masks(loaded, spec=spec), {"method": spec.method, **spec.to_dict()})
        keys[owner] = key
    return keys


def test_the_package_exports_the_api_lazily():
    assert persona_core.apply_mask is persona_core.api.apply_mask
    assert {"open_store", "list_masks", "read_mask", "apply_mask", "export_mask", "Conversation"} <= set(dir(persona_core))
    with pytest.raises(AttributeError):
        persona_core.no_such_thing  # noqa: B018


def test_list_find_and_read_masks(tmp_path, loaded):
    store = persona_core.open_store(str(tmp_path / "store"))
    keys = stored_masks(store, loaded)
    refs = persona_core.list_masks(store, loaded, persona="introvert")
    assert [r.owner for r in refs] == ["introvert", "general"]  # its own first, then the shared one
    assert persona_core.list_masks(store, loaded.key, sparsity=0.25)[0].owner == "extrovert"
    assert persona_core.list_masks(store, "tiny-random-llama", persona="extrovert", method="wan*")
    assert persona_core.find_mask(store, loaded, "introvert").key == keys["introvert"]
    assert persona_core.find_mask(store, loaded, "extrovert", sparsity=0.5).owner == "general"  # the shared one
    second = layout.mask(loaded.key, layout.method_segment("wanda"), 0.25, "introvert")
    write_mask(store, second, build_masks(loaded, spec=MaskSpec("magnitude", 0.25)), {"method": "magnitude"})
    with pytest.raises(persona_core.api.UserError, match="pick one with") as err:
        persona_core.find_mask(store, loaded, "introvert")  # two of its own
    assert second in str(err.value)  # each candidate is listed with its key
    assert persona_core.find_mask(store, loaded, "introvert", sparsity=0.25).key == second
    with pytest.raises(persona_core.api.UserError, match="no mask of persona"):
        persona_core.find_mask(store, loaded, "formal", method="wanda")
    mask = persona_core.read_mask(store, keys["introvert"])
    assert mask.ref.owner == "introvert" and len(mask.digest) == 32
    assert abs(mask.sparsity - 0.5) < 0.01


def test_apply_mask_swaps_and_restores_bit_exactly(tmp_path, loaded):
    store = persona_core.open_store(str(tmp_path / "store"))
    keys = stored_masks(store, loaded)
    a, b = (persona_core.read_mask(store, keys[p]) for p in ("introvert", "extrovert"))
    dense = snapshot(loaded.model)
    with torch.no_grad():
        dense_logits = loaded.model(IDS).logits
        with persona_core.apply_mask(loaded, a):
            logits_a = loaded.model(IDS).logits
            assert not torch.equal(logits_a, dense_logits)
            with persona_core.apply_mask(loaded, b):  # nested: b swaps in over a
                logits_b = loaded.model(IDS).logits
            assert torch.equal(loaded.model(IDS).logits, logits_a)  # a is back
        assert same(snapshot(loaded.model), dense)
        handle = persona_core.apply_mask(loaded.model, b)  # the reversible call
        assert handle.applied and torch.equal(loaded.model(IDS).logits, logits_b)
        handle.restore()
        handle.restore()  # twice is harmless
        assert same(snapshot(loaded.model), dense) and not handle.applied
    # what the evaluator scores under its masked conditions is exactly this model
    from persona_core.eval.engine import Evaluator

    ev = Evaluator(loaded, device="cpu")
    with ev.masked(a.masks), torch.no_grad():
        assert torch.equal(ev.model(IDS).logits, logits_a)
    with persona_core.apply_mask(ev, a), torch.no_grad():  # an evaluator: its own MaskedModel
        assert torch.equal(ev.model(IDS).logits, logits_a)
    assert same(snapshot(loaded.model), dense)


def test_restoring_an_outer_mask_first_is_refused(tmp_path, loaded):
    store = persona_core.open_store(str(tmp_path / "store"))
    keys = stored_masks(store, loaded)
    outer = persona_core.apply_mask(loaded, persona_core.read_mask(store, keys["introvert"]))
    inner = persona_core.apply_mask(loaded, persona_core.read_mask(store, keys["extrovert"]))
    with pytest.raises(RuntimeError, match="restore that one first"):
        outer.restore()
    inner.restore()
    outer.restore()


def test_a_mask_that_does_not_fit_changes_nothing(loaded):
    dense = snapshot(loaded.model)
    bad = {"model.layers.0.mlp.up_proj": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="mask shape"):
        persona_core.apply_mask(loaded, bad)
    assert same(snapshot(loaded.model), dense)


def example_block(doc: str, word: str) -> str:
    """The ```python <word>``` block of a doc page (the blocks these tests run)."""
    text = (ROOT / doc).read_text()
    found = re.findall(rf"^```python {word}\n(.*?)^```$", text, re.M | re.S)
    assert len(found) == 1, f"{doc}: expected one ```python {word} block"
    return found[0]


def test_using_masks_example_runs(tmp_path, loaded, monkeypatch, capsys):
    """docs/using-masks.md's example, on tiny-random-llama and a store holding its masks."""
    store = persona_core.open_store(str(tmp_path / "persona-store"))
    stored_masks(store, loaded)
    monkeypatch.chdir(tmp_path)
    body = example_block("docs/using-masks.md", "example")
    assert 'load_model("smollm2-135m")' in body
    body = body.replace('load_model("smollm2-135m")', 'load_model("tiny-random-llama", device="cpu")')
    scope: dict = {"__name__": "__doc__"}
    exec(compile(body, "docs/using-masks.md", "exec"), scope)
    out = capsys.readouterr().out
    assert "introvert" in out and scope["restored"]


def test_an_evaluators_masks_are_the_ones_apply_mask_shares(tmp_path, loaded):
    """User code masking an evaluator's model goes through the evaluator's MaskedModel, and a second
    MaskedModel never snapshots masked weights as if they were dense."""
    from persona_core.eval.engine import Evaluator
    from persona_core.eval.masked import MaskedModel

    store = persona_core.open_store(str(tmp_path / "store"))
    keys = stored_masks(store, loaded)
    a = persona_core.read_mask(store, keys["introvert"])
    dense = snapshot(loaded.model)
    ev = Evaluator(loaded, device="cpu")
    with persona_core.apply_mask(loaded, a) as handle:
        assert handle.owner is ev.masks and ev.masks.active is not None
        with pytest.raises(RuntimeError, match="another MaskedModel"):
            MaskedModel(loaded.model).apply(a.masks)
    assert same(snapshot(loaded.model), dense)
