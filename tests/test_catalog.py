import json
import subprocess
import sys

import pytest

from persona_core.catalog import (
    Catalog, CatalogError, SplitConfig, generic_questions, load_catalog, reference_persona,
)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def persona(pid, opposite=None, cal=("a one", "a two"), ev=("a three",), **extra):
    d = {"id": pid, "description": f"You are {pid}.", "calibration": list(cal), "evaluation": list(ev), **extra}
    if opposite:
        d["opposite"] = opposite
    return d


def jsonl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def problems_of(path, **kw):
    with pytest.raises(CatalogError) as err:
        load_catalog(path, **kw)
    return err.value.problems


# ---------------------------------------------------------------- built-in catalog


def test_builtin_catalog_is_complete(builtin_catalog):
    assert len(builtin_catalog) >= 16
    pairs = builtin_catalog.pairs()
    assert len(pairs) >= 8 and ("introvert", "extrovert") in pairs
    for p in builtin_catalog:
        assert p.description and p.opposite
        assert len(p.calibration) + len(p.evaluation) >= 40
        assert len(p.evaluation) >= 10
        assert not set(p.calibration) & set(p.evaluation)
    assert len(reference_persona().calibration) >= 40
    assert len(generic_questions()) >= 40
    cal, held = generic_questions("calibration"), generic_questions("evaluation")
    assert cal + held == generic_questions() and not set(cal) & set(held) and len(held) >= 20


def test_round_trip_yaml_and_jsonl(tmp_path, builtin_catalog):
    for name, text in (("c.yaml", builtin_catalog.to_yaml()), ("c.jsonl", builtin_catalog.to_jsonl())):
        again = load_catalog(write(tmp_path, name, text))
        assert [p.id for p in again] == [p.id for p in builtin_catalog]
        assert [p.content_hash for p in again] == [p.content_hash for p in builtin_catalog]
        assert again["introvert"].evaluation == builtin_catalog["introvert"].evaluation


def test_content_hash_tracks_spec_and_calibration_only(builtin_catalog):
    from dataclasses import replace

    p = builtin_catalog["introvert"]
    assert replace(p, evaluation=p.evaluation[:-1]).content_hash == p.content_hash
    assert replace(p, calibration=p.calibration[:-1]).content_hash != p.content_hash
    assert replace(p, description=p.description + "!").content_hash != p.content_hash
    assert replace(p, source="elsewhere:3").content_hash == p.content_hash


def test_statements_split_deterministically_without_overlap(tmp_path):
    statements = [f"statement number {i}" for i in range(50)]
    path = write(tmp_path, "s.jsonl", jsonl({"id": "x", "description": "d", "statements": statements}))
    a, b = load_catalog(path)["x"], load_catalog(path)["x"]
    assert a.calibration == b.calibration and a.evaluation == b.evaluation
    assert 8 <= len(a.evaluation) <= 22 and len(a.calibration) + len(a.evaluation) == 50
    assert not set(a.calibration) & set(a.evaluation)
    # Adding statements never moves an existing one to the other side.
    path2 = write(tmp_path, "s2.jsonl", jsonl({"id": "x", "description": "d", "statements": statements + ["new one"]}))
    c = load_catalog(path2)["x"]
    assert set(a.evaluation) <= set(c.evaluation) | {"new one"} and set(a.calibration) <= set(c.calibration)


def test_description_only_persona_is_generated(tmp_path):
    cat = load_catalog(write(tmp_path, "g.jsonl", jsonl({"id": "pirate", "description": "You are a pirate."})))
    assert cat["pirate"].generate and cat["pirate"].calibration == ()


def test_texts_loaded_from_referenced_files(tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(jsonl({"text": "first text"}, {"text": "second text"}))
    plain = tmp_path / "held.txt"
    plain.write_text("held one\nheld two\n")
    rec = {"id": "x", "description": "d", "calibration": {"path": str(texts)}, "evaluation": {"path": str(plain)}}
    p = load_catalog(write(tmp_path, "r.jsonl", jsonl(rec)))["x"]
    assert p.calibration == ("first text", "second text") and p.evaluation == ("held one", "held two")


def test_select_unknown_ids(builtin_catalog):
    assert list(builtin_catalog.select(["extrovert"]).personas) == ["extrovert"]
    with pytest.raises(CatalogError, match="unknown persona id.*nobody"):
        builtin_catalog.select(["introvert", "nobody"])


# ---------------------------------------------------------------- validation errors


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", jsonl(persona("a")) + "{not json\n")
    (problem,) = problems_of(path)
    assert f"{path}:2: malformed JSON" in problem


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, "bad.yaml", "personas:\n  - id: a\n    description: [unclosed\n")
    (problem,) = problems_of(path)
    assert f"{path}:" in problem and "malformed YAML" in problem


def test_missing_and_empty_fields(tmp_path):
    path = write(tmp_path, "m.jsonl", jsonl(
        {"description": "no id", "calibration": ["x"]},
        {"id": "b", "description": "  ", "calibration": ["x"]},
        {"id": "c", "description": "d", "calibration": ["ok", ""]},
        {"id": "d", "description": "d", "calibration": ["x"], "colour": "red"},
    ))
    problems = problems_of(path)
    assert any(f"{path}:1: field 'id': missing or empty" in p for p in problems)
    assert any(f"{path}:2: persona 'b': field 'description': missing or empty" in p for p in problems)
    assert any(f"{path}:3: persona 'c': field 'calibration': empty text at item(s) [1]" in p for p in problems)
    assert any(f"{path}:4: field 'colour': unknown field" in p for p in problems)


def test_duplicate_ids(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl(persona("a"), persona("a")))
    (problem,) = problems_of(path)
    assert f"{path}:2: persona 'a': field 'id': duplicate (first at {path}:1)" == problem


def test_opposite_missing_or_not_mutual(tmp_path):
    path = write(tmp_path, "o.jsonl", jsonl(persona("a", "b"), persona("b", "c"), persona("c"), persona("z", "nobody")))
    problems = problems_of(path)
    assert any(f"{path}:1: persona 'a': field 'opposite': 'b' is not mutual" in p for p in problems)
    assert any(f"{path}:2: persona 'b': field 'opposite': 'c' is not mutual" in p for p in problems)
    assert any(f"{path}:4: persona 'z': field 'opposite': 'nobody' does not exist" in p for p in problems)


def test_empty_calibration_set(tmp_path):
    path = write(tmp_path, "e.jsonl", jsonl(persona("a", cal=())))
    assert problems_of(path) == [f"{path}:1: persona 'a': field 'calibration': empty calibration set"]


def test_calibration_evaluation_overlap(tmp_path):
    path = write(tmp_path, "v.yaml", "personas:\n  - id: a\n    description: d\n    calibration: [same, other]\n"
                                     "    evaluation: [same]\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:2: persona 'a': field 'evaluation': 1 text(s) also in calibration")


def test_cli_validate_exits_non_zero_with_messages(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl(persona("a"), persona("a")))
    bad = subprocess.run([sys.executable, "-m", "persona_jobs", "catalog", "validate", str(path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "field 'id': duplicate" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "persona_jobs", "catalog", "show", "builtin"], capture_output=True, text=True)
    assert good.returncode == 0 and "introvert" in good.stdout and "8 opposing pairs" in good.stdout


# ---------------------------------------------------------------- Anthropic persona format


def test_anthropic_file_format(tmp_path):
    lines = [{"statement": f"I like thing {i}", "answer_matching_behavior": " Yes" if i % 2 else " No"} for i in range(20)]
    path = write(tmp_path, "liking-things.jsonl", jsonl(*lines))
    cat = load_catalog(path, SplitConfig(eval_fraction=0.25))
    assert set(cat.personas) == {"liking-things", "not-liking-things"}
    yes, no = cat["liking-things"], cat["not-liking-things"]
    assert yes.opposite == no.id and no.opposite == yes.id
    assert len(yes.calibration) + len(yes.evaluation) == 10 and yes.calibration and yes.evaluation
    assert all(int(s.split()[-1]) % 2 for s in yes.calibration + yes.evaluation)


def test_anthropic_bad_answer_names_line(tmp_path):
    path = write(tmp_path, "x.jsonl", jsonl({"statement": "s", "answer_matching_behavior": " Maybe"}))
    assert any(f"{path}:1: field 'answer_matching_behavior'" in p for p in problems_of(path))


def test_anthropic_shared_catalog(shared_personas):
    cat = load_catalog(shared_personas)
    assert len(cat) == 216 and len(cat.pairs()) == 108
    for p in cat:
        assert p.calibration and p.evaluation
        assert not set(p.calibration) & set(p.evaluation)
    capped = load_catalog(shared_personas, SplitConfig(max_calibration=16, max_evaluation=8))
    assert all(len(p.calibration) == 16 and len(p.evaluation) <= 8 for p in capped)
    assert isinstance(capped, Catalog)


# ---------------------------------------------------------------------------- the format registry


def test_builtin_formats_are_registered():
    from persona_core.catalog import CATALOG_FORMATS

    assert sorted(CATALOG_FORMATS) == ["anthropic-persona-evals", "persona-catalog/v1", "persona-pruner-eval"]
    with pytest.raises(ValueError, match="registered twice"):
        CATALOG_FORMATS.add("persona-catalog/v1", CATALOG_FORMATS["persona-catalog/v1"])
    with pytest.raises(KeyError, match=r"did you mean 'persona-catalog/v1'.*available: .*persona-pruner-eval"):
        CATALOG_FORMATS["persona-catalog/v2"]


def test_importing_the_library_registers_nothing_by_side_effect():
    code = "import sys, persona_core; print(sorted(m for m in sys.modules if m.startswith('persona_core.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_registered_format_is_read_by_load_catalog(tmp_path, monkeypatch):
    from persona_core.catalog import Persona, catalog_format, formats, loader
    from persona_core.registry import Registry

    registry = Registry("catalog format")
    for name, fmt in formats.CATALOG_FORMATS.items():
        registry.add(name, fmt)
    monkeypatch.setattr(formats, "CATALOG_FORMATS", registry)
    monkeypatch.setattr(loader, "CATALOG_FORMATS", registry)

    @catalog_format("one-line-per-persona", detect=lambda source: source.path.endswith(".personas"))
    def load_lines(source, split):
        personas = {line.split(":")[0]: Persona(line.split(":")[0], line.split(":")[1].strip(), ("a text",))
                    for line in source.text.splitlines()}
        return Catalog("lines", personas, source.shown)

    cat = load_catalog(write(tmp_path, "x.personas", "pirate: You are a pirate.\nsage: You are a sage.\n"))
    assert [p.id for p in cat] == ["pirate", "sage"] and cat["sage"].description == "You are a sage."


def test_a_folder_two_formats_claim_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "rolebench_specific_user_0.json").write_text("{}")
    (folder / "liking-things.jsonl").write_text(jsonl({"statement": "s", "answer_matching_behavior": " Yes"}))
    (problem,) = problems_of(folder)
    assert "read by more than one catalog format" in problem and "persona-pruner-eval" in problem


def test_nothing_reads_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    assert problems_of(tmp_path / "empty") == [f"{tmp_path / 'empty'}: folder holds no catalog (no .jsonl files, "
                                               "nor persona-pruner-eval .json files)"]
    assert problems_of(write(tmp_path, "x.txt", "hello")) == [
        f"{tmp_path / 'x.txt'}: unknown catalog format (use .yaml, .yml, .jsonl or a folder)"]
