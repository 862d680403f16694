"""The typed config (issue 11, issue 12 item 14): every problem at load time, with file:line and field."""

from __future__ import annotations

import pytest

from persona_core.run.config import ConfigError, NightlyConfig, PipelineConfig, describe, parse_config


def problems(text: str, cls=PipelineConfig) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "c.yaml", cls)
    return exc.value.problems


# ---------------------------------------------------------------------------- issue 11: the three config bugs


def test_unlisted_nm_granularity_is_a_load_time_error():
    """`granularities: ["1:4"]` passed the old check and failed later in plan(), without file:line."""
    got = problems("model: tiny-random-llama\nmasks:\n  granularities: ['1:4']\n")
    assert len(got) == 1 and got[0].startswith("c.yaml:3: masks.granularities: expected granularities among")
    assert "1:4" in got[0]


def test_misspelled_masks_option_is_a_load_time_error():
    """`masks.options: {delte: true}` was silently dropped, yet changed the run id."""
    got = problems("masks:\n  options:\n    delte: true\n")
    assert got == ["c.yaml:3: masks.options.delte: unknown key (did you mean 'delta'?)"]


def test_misspelled_evaluate_option_is_a_load_time_error():
    """`evaluate.options: {actorz: 3}` was silently dropped, yet changed the run id."""
    got = problems("evaluate:\n  options: {actorz: 3}\n")
    assert got == ["c.yaml:2: evaluate.options.actorz: unknown key (did you mean 'actors'?)"]


def test_calibrate_options_are_typed_from_calibconfig():
    got = problems("calibrate:\n  options:\n    max_lenght: 64\n    batch_size: many\n")
    assert "c.yaml:3: calibrate.options.max_lenght: unknown key (did you mean 'max_length'?)" in got
    assert any(p.startswith("c.yaml:4: calibrate.options.batch_size: expected an integer") for p in got)


def test_registries_are_checked_at_load():
    got = problems("masks:\n  methods: [wandaa]\n  baselines: [magnitud]\n  options:\n    params:\n"
                   "      contrastive-wanda: {ff: softplus}\n"
                   "evaluate:\n  conditions: [masked, maskd]\n  options:\n    metrics: [perplexty]\n")
    text = "\n".join(got)
    assert "c.yaml:2: masks.methods: unknown method 'wandaa' (did you mean 'wanda'?)" in got
    assert "c.yaml:3: masks.baselines: unknown method 'magnitud' (did you mean 'magnitude'?)" in got
    assert "c.yaml:5: masks.options.params: contrastive-wanda: unknown parameter 'ff' (did you mean 'f'?)" in got
    assert "c.yaml:8: evaluate.conditions: unknown condition 'maskd' (did you mean 'masked'?)" in got
    assert "perplexty" in text and "did you mean 'perplexity'" in text


def test_typed_options_keep_the_run_id_of_untyped_configs():
    """Options count as given: `{max_length: 64}` hashes as it did when options were a plain dict."""
    cfg = parse_config("calibrate: {options: {max_length: 64}}\nevaluate: {options: {metrics: [perplexity]}}\n")
    work = cfg.work_dict()
    assert work["calibrate"]["options"] == {"max_length": 64}
    assert work["evaluate"]["options"] == {"metrics": ["perplexity"]}
    assert work["masks"]["options"] == {}
    assert "resources" not in work and "store" not in work


# ---------------------------------------------------------------------------- issue 12 item 14


def test_empty_values_are_located_errors_or_defaults_not_tracebacks():
    cfg = parse_config("revision:\nmasks:\nevaluate:\n", "c.yaml")
    assert cfg.revision is None and cfg.masks.methods == ["wanda", "contrastive-wanda"]
    assert problems("model:\n") == ["c.yaml:1: model: expected a string, got None"]


def test_negative_or_zero_caps_are_refused():
    assert problems("split:\n  max_calibration: -3\n") == [
        "c.yaml:2: split.max_calibration: expected a number >= 1, got -3"]
    assert problems("split: {max_evaluation: 0}\n")[0].startswith("c.yaml:1: split.max_evaluation: expected")


def test_renewal_slower_than_the_lease_is_refused():
    got = problems("nightly:\n  lease_ttl_s: 30\n  renew_every_s: 60\n", NightlyConfig)
    assert len(got) == 1 and got[0].startswith("c.yaml:1: nightly: renew_every_s (60) must be less than lease_ttl_s")


def test_duplicate_keys_are_refused():
    got = problems("model: a\nmasks:\n  sparsities: [0.5]\n  sparsities: [0.3]\nmodel: b\n")
    assert "c.yaml:4: masks.sparsities: key given twice (first at line 3)" in got
    assert "c.yaml:5: model: key given twice (first at line 1)" in got


def test_strict_scalars():
    assert problems("calibrate: {include_general: 'yes'}\n")[0].startswith(
        "c.yaml:1: calibrate.include_general: expected true or false")
    assert problems("calibrate: {shard_size: '5'}\n")[0].startswith("c.yaml:1: calibrate.shard_size: expected an integer")
    assert parse_config("revision: 1234\n").revision == "1234"  # numbers where text is meant stay text


def test_describe_lists_resources_and_options_once():
    keys = [k for k, _, _ in describe(NightlyConfig)]
    assert "resources.schedule_timeout_s" in keys and "calibrate.options" in keys
    assert not any(k.startswith("calibrate.options.") for k in keys)


# ---------------------------------------------------------------------------- issue 12 item 14: catalogs


def _catalog_problems(tmp_path, name: str, text: str) -> list[str]:
    from persona_core.catalog import CatalogError, load_catalog

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CatalogError) as exc:
        load_catalog(str(path))
    return exc.value.problems


def test_catalog_with_no_personas_is_refused_at_load(tmp_path):
    got = _catalog_problems(tmp_path, "empty.yaml", "format: persona-catalog/v1\npersonas: []\n")
    assert got == [f"{tmp_path / 'empty.yaml'}: no personas (a catalog needs at least one)"]


def test_catalog_duplicate_keys_are_refused(tmp_path):
    got = _catalog_problems(tmp_path, "dup.yaml", "personas:\n- id: a\n  description: x\n  description: y\n"
                                                   "  statements: [one, two, three]\n")
    assert len(got) == 1 and got[0].startswith(f"{tmp_path / 'dup.yaml'}:4: malformed YAML (key 'description' "
                                               f"given twice (first at line 3))")
    got = _catalog_problems(tmp_path, "dup.jsonl", '{"id": "a", "id": "b", "description": "x"}\n')
    assert len(got) == 1 and "dup.jsonl:1: malformed JSON" in got[0] and "'id' given twice" in got[0]


def test_overlong_statement_is_refused_at_load(tmp_path):
    from persona_core.catalog.personas import MAX_TEXT_CHARS

    huge = "word " * (MAX_TEXT_CHARS // 5 + 10)
    got = _catalog_problems(tmp_path, "big.yaml", f"personas:\n- id: a\n  description: x\n"
                                                   f"  statements: [short one, another, '{huge}']\n")
    assert len(got) == 1 and f"longer than {MAX_TEXT_CHARS} characters" in got[0] and ":2: persona 'a'" in got[0]
