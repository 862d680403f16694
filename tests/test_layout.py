"""Every store key is built and parsed by persona_core.store.layout, and nothing else parses keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from persona_core.store import layout

ROOT = Path(__file__).resolve().parents[1]


def test_stats_part_round_trip():
    key = layout.stats_part("tiny-random-llama-cf1551e6", "introvert", "b813f283c5a78406")
    assert key == "stats/model=tiny-random-llama-cf1551e6/persona=introvert/part-b813f283c5a78406.parquet"
    ref = layout.parse_stats_part(key)
    assert (ref.model_key, ref.persona_id, ref.name) == ("tiny-random-llama-cf1551e6", "introvert",
                                                         "part-b813f283c5a78406.parquet")
    assert layout.stats_prefix() == "stats"
    assert layout.stats_prefix("m") == "stats/model=m"
    assert key.startswith(layout.stats_prefix("tiny-random-llama-cf1551e6", "introvert") + "/")
    assert layout.parse_stats_part("stats/model=m/persona=p/other.parquet") is None


@pytest.mark.parametrize("method,gran,alloc,params", [
    ("wanda", "unstructured", "uniform", None),
    ("contrastive-wanda", "2:4", "uniform", "1a2b3c4d"),
    ("wanda", "ffn-channels", "owl", "1a2b3c4d"),
    ("magnitude", "unstructured", "owl", None),
    ("wanda", "4:8", "uniform", None),
])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.125])
def test_mask_round_trip(method, gran, alloc, params, sparsity):
    seg = layout.method_segment(method, gran, alloc, params)
    key = layout.mask("m-1234", seg, sparsity, "introvert")
    ref = layout.parse_mask(key)
    assert (ref.key, ref.model_key, ref.method, ref.base, ref.sparsity, ref.owner) == (
        key, "m-1234", seg, method, sparsity, "introvert")
    assert (ref.granularity, ref.allocation, ref.params_hash) == (gran, alloc, params)
    assert key.startswith(layout.masks_prefix("m-1234") + "/")


def test_mask_key_of_today_unchanged():
    """The exact key shapes written before the layout module existed."""
    assert layout.mask("m", layout.method_segment("contrastive-wanda", "2:4", "uniform", "1a2b3c4d"), 0.5, "p") == \
        "masks/model=m/method=contrastive-wanda@2of4+1a2b3c4d/sparsity=0.5/p.safetensors"
    assert layout.mask("m", layout.method_segment("wanda", allocation="owl"), 0.3, "general") == \
        "masks/model=m/method=wanda~owl/sparsity=0.3/general.safetensors"


def test_non_mask_keys_do_not_parse():
    assert layout.parse_mask("masks/model=m/method=wanda/sparsity=half/p.safetensors") is None
    assert layout.parse_mask("masks/model=m/method=wanda/p.safetensors") is None
    assert layout.parse_mask("stats/model=m/persona=p/part-1.parquet") is None


def test_run_keys_round_trip():
    rid = "run-d0eca91bdd3a0f74"
    assert layout.manifest(rid) == f"runs/{rid}/manifest.json" and layout.is_manifest(layout.manifest(rid))
    assert layout.parse_stage(layout.stage(rid, "masks")) == (rid, "masks")
    assert layout.stage(rid, "masks").startswith(layout.stages_prefix(rid) + "/")
    assert layout.report(rid) == f"runs/{rid}/report.html"
    assert layout.latest("nightly") == "runs/_latest/nightly.json"
    assert layout.lease("nightly-x") == "leases/nightly-x.json"
    assert layout.results_prefix(rid) == f"results/run={rid}"
    assert layout.results_index(rid) == f"results/run={rid}/parts.json"
    part = layout.result_part("m", "introvert", layout.result_what("contrastive-wanda@2of4", 0.5), "ab8724b48d0e1f23")
    assert part == "results/model=m/persona=introvert/part-contrastive-wanda_2of4-s0.5-ab8724b48d0e1f23.parquet"
    assert layout.parse_result_part(part) == layout.ResultPartRef(part, "m", "introvert", "contrastive-wanda_2of4-s0.5",
                                                                  "ab8724b48d0e1f23")
    assert layout.result_what(None, None) == "dense"
    assert layout.probe("abc") == "_probe/abc"


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", "a\\b", "x\ny"])
def test_every_builder_refuses_ids_that_are_not_one_segment(bad):
    for build in (lambda: layout.stats_part("m", bad, "h"), lambda: layout.stats_part(bad, "p", "h"),
                  lambda: layout.mask("m", "wanda", 0.5, bad), lambda: layout.manifest(bad),
                  lambda: layout.lease(bad), lambda: layout.latest(bad), lambda: layout.results_prefix(bad)):
        with pytest.raises(layout.LayoutError):
            build()


def test_no_key_parsing_outside_the_layout_module():
    """`grep -rn "re.compile|split('/')|split("/")" persona_jobs/` finds no store-key parsing (its one
    hit is submit.py's submission-id grammar, not a key), and no module outside layout.py spells a
    key prefix followed by '/'."""
    splits = re.compile(r"split\('/'\)|split\(\"/\"\)")
    key_regex = re.compile(r"re\.compile\([^)]*(?:model=|persona=|run=|method=|sparsity=|stats/|masks/|results/|"
                           r"runs/|leases/)")
    for path in (ROOT / "persona_jobs").rglob("*.py"):
        text = path.read_text()
        assert not splits.search(text), f"{path.name} splits keys itself"
        assert not key_regex.search(text), f"{path.name} parses store keys with a regex"
    spelled = re.compile(r"f[\"'](?:stats|masks|results|runs|leases|learned|exports)/")
    for pkg in ("persona_core", "persona_jobs"):
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name != "layout.py":
                assert not spelled.search(path.read_text()), f"{path.relative_to(ROOT)} formats a store key"
