"""Pipeline / nightly configs: defaults, located errors, overrides, and the documented knob table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from persona_core.run.config import (ConfigError, NightlyConfig, PipelineConfig, describe, from_dict, load_config,
                                 parse_config)

ROOT = Path(__file__).resolve().parent.parent


def test_empty_config_is_all_defaults():
    cfg = parse_config("", "empty.yaml")
    assert cfg == PipelineConfig()
    assert cfg.model == "smollm2-135m" and cfg.store == "./persona-store" and cfg.masks.sparsities == [0.3, 0.5]


def test_values_are_read_and_coerced():
    cfg = parse_config("model: tiny-random-llama\nmasks:\n  methods: wanda\n  sparsities: [0.5]\n"
                       "personas: [introvert]\nnightly:\n  lease_ttl_s: 30\n  renew_every_s: 10\n", "x.yaml", NightlyConfig)
    assert cfg.masks.methods == ["wanda"]  # a single value stands for a list of one
    assert cfg.personas == ["introvert"]
    assert cfg.nightly.lease_ttl_s == 30


def test_allocations_are_checked():
    assert parse_config("masks:\n  allocations: [uniform, owl]\n", "x.yaml").masks.allocations == ["uniform", "owl"]
    with pytest.raises(ConfigError, match=r"x.yaml:2: masks.allocations: .*tilted"):
        parse_config("masks:\n  allocations: [tilted]\n", "x.yaml")


def test_every_problem_is_reported_with_file_line_and_key():
    text = ("model: tiny-random-llama\n"       # 1
            "masks:\n"                          # 2
            "  sparsity: 0.5\n"                 # 3  unknown key, with a suggestion
            "  sparsities: [0.5, 1.5]\n"        # 4  out of range
            "calibrate:\n"                      # 5
            "  shard_size: many\n"              # 6  wrong type
            "evaluate:\n"                       # 7
            "  enabled: maybe\n"                # 8  not a bool
            "storee: /tmp/x\n")                 # 9  unknown top-level key
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "bad.yaml")
    problems = exc.value.problems
    assert len(problems) == 5
    assert "bad.yaml:3: masks.sparsity: unknown key (did you mean 'sparsities'?)" in problems
    assert any(p.startswith("bad.yaml:4: masks.sparsities:") and "1.5" in p for p in problems)
    assert any(p.startswith("bad.yaml:6: calibrate.shard_size: expected an integer") for p in problems)
    assert any(p.startswith("bad.yaml:8: evaluate.enabled: expected true or false") for p in problems)
    assert any(p.startswith("bad.yaml:9: storee: unknown key (did you mean 'store'?)") for p in problems)


def test_malformed_yaml_and_wrong_shapes():
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d: not valid YAML .*flow sequence at line 2"):
        parse_config("model: x\nmasks: [a\n", "bad.yaml")
    with pytest.raises(ConfigError, match="a config is a mapping"):
        parse_config("- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match=r"s\.yaml:1: masks: expected a mapping"):
        parse_config("masks: 3\n", "s.yaml")
    with pytest.raises(ConfigError, match="granularities among"):
        parse_config("masks: {granularities: [blocky]}", "g.yaml")
    with pytest.raises(ConfigError, match="nightly: unknown key"):
        parse_config("nightly: {name: x}", "p.yaml", PipelineConfig)  # only nightly configs have it


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_win_and_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: smollm2-135m\nmasks: {sparsities: [0.3]}\n")
    cfg = load_config(path, overrides={"model": "tiny-random-llama", "masks.sparsities": [0.7]})
    assert cfg.model == "tiny-random-llama" and cfg.masks.sparsities == [0.7]
    with pytest.raises(ConfigError, match="masks.sparsities"):
        load_config(path, overrides={"masks.sparsities": [2.0]})


def test_hash_ignores_where_not_what():
    a = from_dict(PipelineConfig, {"store": "/a", "address": "ray://x:10001"})
    b = from_dict(PipelineConfig, {"store": "s3://b/c"})
    c = from_dict(PipelineConfig, {"masks": {"sparsities": [0.4]}})
    assert a.hash == b.hash != c.hash


PIPELINE_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml")
                          if p.name != "study-pruner.yaml")  # that one is benchmarks/study_pruner.py's


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    from persona_core.eval.config import EvalConfig

    if "../shared/data" in path.read_text() and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip(f"{path.name} reads ../shared/data, absent here")
    if path.name.startswith("nightly"):
        load_config(path, NightlyConfig)
        return
    options = load_config(path).evaluate.options  # typed: checked at load
    EvalConfig(**options.eval_fields())  # the evaluation options too


def test_readme_documents_every_knob_with_its_default():
    """The config reference (docs/operations.md, linked from README.md) lists every knob with its default."""
    text = (ROOT / "docs" / "operations.md").read_text()
    rows = dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", text, flags=re.M))
    for key, default, _ in describe(NightlyConfig):
        assert key in rows, f"docs/operations.md does not list {key}"
        assert rows[key] == default, f"docs/operations.md says {key} defaults to {rows[key]}, the code says {default}"
