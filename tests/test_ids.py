"""Identifier safety (issue 12 items 1, 2): persona ids and schedule names follow one grammar,
checked at load with file:line and again by every key builder; `general` is reserved; stale-part
cleanup deletes only parts it provably wrote, inside the persona's own partition."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from persona_core.catalog import CatalogError, load_catalog, persona_id_problem
from persona_core.store.ids import check_id, id_problem
from persona_core.run.config import ConfigError, NightlyConfig, parse_config
from persona_core.calib.parts import part_key, write_stats
from persona_core.calib.stats import GroupStats, PersonaStats
from persona_core.calib.stored import list_parts, stale_parts
from persona_core.store import layout
from persona_core.store.store import open_store

HOSTILE = ["../../../../../../tmp/x/victim", "a/b", "..", "a..b", ".hidden", "-flag", "_x", "x" * 129, "with space",
           "tab\there", "ünï", "a\\b", "x/../y", "c:d", "new\nline"]
GOOD = ["introvert", "not-risk-seeking", "A1", "v1.2_x-y", "x" * 128, "0"]


def persona(pid, **extra):
    return {"id": pid, "description": f"You are {pid}.", "calibration": ["a one", "a two"],
            "evaluation": ["a three"], **extra}


def write_jsonl(tmp_path, *records, name="c.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def problems_of(path):
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    return err.value.problems


@pytest.mark.parametrize("pid", HOSTILE)
def test_hostile_ids_are_refused_at_load_with_file_and_line(tmp_path, pid):
    path = write_jsonl(tmp_path, persona("ok"), persona(pid))
    problems = problems_of(path)
    assert any(p.startswith(f"{path}:2: field 'id':") and "not a valid identifier" in p for p in problems), problems
    assert id_problem(pid) is not None
    with pytest.raises(ValueError):
        check_id(pid)


@pytest.mark.parametrize("pid", GOOD)
def test_the_grammar_accepts_ordinary_ids(tmp_path, pid):
    assert id_problem(pid) is None and check_id(pid) == pid
    assert pid in load_catalog(write_jsonl(tmp_path, persona(pid)))


def test_yaml_catalog_names_the_line_and_opposites_are_checked_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("format: persona-catalog/v1\npersonas:\n"
                    "  - id: a\n    description: A.\n    calibration: [x one]\n"
                    "  - id: a/b\n    description: B.\n    calibration: [x two]\n"
                    "  - id: c\n    description: C.\n    calibration: [x three]\n    opposite: ../c\n")
    problems = problems_of(path)
    assert any(p.startswith(f"{path}:6: field 'id': persona id 'a/b'") for p in problems), problems
    assert any(p.startswith(f"{path}:9: persona 'c': field 'opposite'") and "'../c'" in p for p in problems)


@pytest.mark.parametrize("pid", ["general", "General", "GENERAL"])
def test_general_is_reserved(tmp_path, pid):
    path = write_jsonl(tmp_path, persona("a"), persona(pid))
    problems = problems_of(path)
    assert any(p.startswith(f"{path}:2: field 'id'") and "reserved" in p for p in problems), problems
    assert "reserved" in persona_id_problem(pid)
    # Anthropic behaviour files name their personas after the file: general.jsonl is refused too.
    folder = tmp_path / "anthropic"
    folder.mkdir()
    (folder / "general.jsonl").write_text(
        json.dumps({"statement": "I like people.", "answer_matching_behavior": " Yes"}) + "\n"
        + json.dumps({"statement": "I avoid people.", "answer_matching_behavior": " No"}) + "\n"
        + json.dumps({"statement": "People are fine.", "answer_matching_behavior": " Yes"}) + "\n"
        + json.dumps({"statement": "People are not fine.", "answer_matching_behavior": " No"}) + "\n")
    assert any("reserved" in p for p in problems_of(folder))


def test_ids_differing_only_in_case_collide(tmp_path):
    path = write_jsonl(tmp_path, persona("Formal"), persona("formal"))
    problems = problems_of(path)
    assert any(p.startswith(f"{path}:2:") and "only in case" in p for p in problems), problems


def test_catalog_validate_command_lists_bad_ids(tmp_path, capsys):
    from persona_jobs.cli import main

    path = write_jsonl(tmp_path, persona("fine"), persona("../../x/victim"), persona("general"))
    assert main(["catalog", "validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: field 'id'" in err and f"{path}:3: field 'id'" in err and "2 problem(s)" in err


def test_calibrate_with_a_hostile_catalog_touches_nothing(tmp_path, capsys):
    """Today's code deleted files outside the store; now the catalog is refused (exit 2) before any work."""
    from persona_jobs.cli import main

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "part-2025-sales.parquet").write_bytes(b"precious")
    (victim / "sub").mkdir()
    (victim / "sub" / "part-x.parquet").write_bytes(b"precious too")
    store = tmp_path / "deep" / "er" / "st"
    rel = "../" * 8 + str(victim).lstrip("/")
    path = write_jsonl(tmp_path, persona(rel))
    code = main(["calibrate", "--catalog", str(path), "--model", "tiny-random-llama", "--store", str(store)])
    assert code == 2
    assert "not a valid identifier" in capsys.readouterr().err
    assert (victim / "part-2025-sales.parquet").read_bytes() == b"precious"
    assert (victim / "sub" / "part-x.parquet").read_bytes() == b"precious too"
    assert not (store / "stats").exists()


# ---------------------------------------------------------------------------- key builders


def small_stats(pid="a", calib_hash="c1", persona_hash="p1", model="m-k") -> PersonaStats:
    g = GroupStats(3, torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                   torch.ones(4, dtype=torch.float64), 1, torch.ones(4, dtype=torch.float64),
                   torch.ones(4, dtype=torch.float64))
    return PersonaStats(model, pid, persona_hash, {(0, "mlp_in"): g}, calib_hash)


@pytest.mark.parametrize("pid", HOSTILE)
def test_key_builders_refuse_bad_ids(tmp_path, pid):
    store = open_store(str(tmp_path / "st"))
    with pytest.raises(ValueError, match="identifier|must be"):
        layout.stats_prefix("m-k", pid)
    with pytest.raises(ValueError):
        part_key("m-k", pid, "p", "c")
    with pytest.raises(ValueError):  # a Persona built in code, bypassing the catalog, writes nothing
        write_stats(store, small_stats(pid))
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").rglob("*.parquet"))
    with pytest.raises(ValueError):
        layout.stats_prefix("../m", "a")


def test_nightly_name_is_checked_with_file_and_line():
    with pytest.raises(ConfigError) as err:
        parse_config("catalog: builtin\nnightly:\n  name: ../../x/ESC\n", "n.yaml", NightlyConfig)
    assert any(p.startswith("n.yaml:3: nightly.name: expected a name matching") for p in err.value.problems)
    assert parse_config("nightly: {name: team-a.v2}\n", "n.yaml", NightlyConfig).nightly.name == "team-a.v2"
    from persona_core.run import runs
    from persona_core.store.lease import Lease

    with pytest.raises(ValueError):
        runs.latest_key("../../x/ESC")
    with pytest.raises(ValueError):
        Lease(open_store("memory://ids-lease"), "nightly-../../x/ESC")


# ---------------------------------------------------------------------------- stale-part cleanup


def test_stale_parts_are_only_parts_this_code_wrote(tmp_path):
    store = open_store(str(tmp_path / "st"))
    current = write_stats(store, small_stats("a", "c2"))
    old = write_stats(store, small_stats("a", "c1"))
    prefix = layout.stats_prefix("m-k", "a")
    foreign = f"{prefix}/part-2025-sales.parquet"  # a stranger's file with a similar name
    store.write_bytes(foreign, b"not ours")
    nested = f"{prefix}/b/{old.rsplit('/', 1)[1]}"  # a folder below the partition (today: persona "a/b")
    store.write_bytes(nested, store.read_bytes(old))
    lookalike = f"{prefix}/part-{'0' * 16}.parquet"  # our name pattern, but another persona's metadata
    store.write_bytes(lookalike, store.read_bytes(write_stats(store, small_stats("z", "c1"))))
    assert stale_parts(store, "m-k", "a", {current}) == [old]
    assert list_parts(store, "m-k", "a") == sorted([current, old, lookalike])


def test_calibrate_prunes_only_its_own_parts(ray_cluster, builtin_catalog, tmp_path):
    """End to end: the files planted in a persona's partition survive the job's stale-part cleanup."""
    from persona_core.models.loading import model_key
    from persona_jobs.calibrate import plan_from_args, run
    from persona_jobs.cli import build_parser

    store = open_store(str(tmp_path / "st"))
    key = model_key("tiny-random-llama")
    prefix = layout.stats_prefix(key, "introvert")
    planted = {f"{prefix}/part-2025-sales.parquet": b"theirs", f"{prefix}/b/part-{'1' * 16}.parquet": b"theirs",
               f"{prefix}/notes.txt": b"theirs"}
    for k, v in planted.items():
        store.write_bytes(k, v)
    stale = write_stats(store, dataclasses.replace(small_stats("introvert", "old"), model_key=key))
    summary = run(plan_from_args(build_parser().parse_args([  # one shard: the persona's texts in one part
        "calibrate", "--catalog", "builtin", "--model", "tiny-random-llama", "--store", store.url, "--personas",
        "introvert", "--max-length", "32", "--batch-size", "8", "--actors", "1", "--shard-size", "100000"])))
    assert summary.ok and summary.done == 1, summary.errors
    assert not store.exists(stale)  # ours, stale: removed
    for k, v in planted.items():
        assert store.read_bytes(k) == v
    assert len(list_parts(store, key, "introvert")) == 1


def test_mask_keys_refuse_bad_ids():
    from persona_core.masks.spec import mask_key

    with pytest.raises(ValueError, match="not a valid identifier"):
        mask_key("m-k", "wanda", 0.5, "../../x")
    assert mask_key("m-k", "wanda", 0.5, "a.b").endswith("/a.b.safetensors")
