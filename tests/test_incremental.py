"""Incremental work end to end (issue 25 items 2 and 3; issue 24 items 9 and 11, result parts).

* "Nothing changed" means every artifact the run's manifest names is still there and unchanged; a
  finished run that lost statistics, or whose masks were rebuilt for another version of its personas,
  runs again and regenerates exactly those (25.2).
* Evaluation results are keyed by content and reused across runs: a nightly run after one persona
  changed scores only the units that depend on it (25.3).
* A result part is verified on read (owner, row count, digest); a corrupt or edited one is scored
  again, by a plain rerun, --force or --repair (24.9). Result part keys refuse ids the grammar refuses (24.11).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import tiny_pipeline_config

from persona_core.catalog import Catalog, load_catalog
from persona_core.eval.config import EvalConfig
from persona_core.eval.result_parts import ResultPartError, read_result_part, rows_digest, write_result_part
from persona_core.eval.schema import result_table
from persona_core.run import runs
from persona_core.run.artifacts import PRESENT, STATS_PART, artifact_problems
from persona_core.run.plan import make_plan
from persona_core.run.units import MaskVersion, result_part_key
from persona_core.store import layout
from persona_core.store.store import open_store

OLD_STORE = Path(__file__).parent / "data" / "store-v1"
OLD_RUN_ID = "run-d0eca91bdd3a0f74"
KEY = "tiny-random-llama-cf1551e6"
CONFIG = EvalConfig(metrics=("statement-preference",), max_statements=4)


def _rows(persona: str = "introvert", value: float = 0.25) -> pa.Table:
    unit = {"model": KEY, "persona": persona, "opposite": "extrovert", "method": "magnitude", "sparsity": 0.5,
            "granularity": "unstructured", "mask_hash": "abc", "config_hash": "c", "eval_hash": "e",
            "code_version": "evaluate-v1"}
    return result_table(unit, [{"condition": "masked", "metric": "statement-preference", "value": value, "n": 4,
                                "stderr": 0.1, "items": [0.1, 0.2], "items_own": 1, "texts": None}])


def _part(persona: str = "introvert") -> str:
    return layout.result_part(KEY, persona, layout.result_what("magnitude", 0.5), "0123456789abcdef")


# ---------------------------------------------------------------------------- 24.11: keys


@pytest.mark.parametrize("bad", ["_latest", ".hidden", "a b", "-x", "x" * 129, "a..b", "../x", "a/b", ""])
def test_result_part_refuses_ids_the_grammar_refuses(bad):
    with pytest.raises(layout.LayoutError):
        layout.result_part(KEY, bad, "dense", "0123456789abcdef")
    with pytest.raises(layout.LayoutError):
        layout.results_prefix(bad)


@pytest.mark.parametrize("ident", ["", "../x", "0123456789ABCDEF", "0123", "0123456789abcdef0"])
def test_result_part_refuses_a_hash_that_is_not_16_hex(ident):
    with pytest.raises(layout.LayoutError):
        layout.result_part(KEY, "introvert", "dense", ident)


# ---------------------------------------------------------------------------- 24.9: verified parts


def test_result_part_round_trips_and_names_its_owner(tmp_path):
    store = open_store(str(tmp_path))
    digest = write_result_part(store, _part(), _rows())
    assert digest == rows_digest(_rows())
    back = read_result_part(store, _part(), digest)
    assert back.equals(_rows()) and back.schema.metadata is None
    with pytest.raises(ValueError, match="rows name persona"):  # rows of another persona are never written there
        write_result_part(store, _part("extrovert"), _rows("introvert"))


def test_truncated_edited_or_foreign_result_parts_are_refused(tmp_path):
    store = open_store(str(tmp_path))
    key = _part()
    path = tmp_path / key
    write_result_part(store, key, _rows())
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ResultPartError, match="unreadable result part"):
        read_result_part(store, key)

    table = pq.read_table(pa.BufferReader(data))  # a valid file, one value edited
    edited = table.set_column(table.schema.get_field_index("value"), "value", pa.array([0.99]))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ResultPartError, match="fail their digest"):
        read_result_part(store, key)

    pq.write_table(_rows(), path)  # a plain Parquet file of the right schema, no footer
    with pytest.raises(ResultPartError, match="no result part footer"):
        read_result_part(store, key)

    other = _part("extrovert")  # a whole, valid part of another persona copied over this one
    write_result_part(store, other, _rows("extrovert"))
    shutil.copy(tmp_path / other, path)
    with pytest.raises(ResultPartError, match="names persona"):
        read_result_part(store, key)

    write_result_part(store, key, _rows(value=0.5))  # whole, but not the rows the run recorded
    with pytest.raises(ResultPartError, match="the run recorded"):
        read_result_part(store, key, rows_digest(_rows()))


def test_the_worker_and_the_driver_score_a_bad_part_again(tmp_path, caplog):
    from persona_jobs.evaluate import stored_part

    store = open_store(str(tmp_path))
    key = _part()
    assert stored_part(store, key) is None  # absent
    write_result_part(store, key, _rows())
    assert stored_part(store, key).equals(_rows())
    (tmp_path / key).write_bytes((tmp_path / key).read_bytes()[:-40])
    assert stored_part(store, key) is None and "scoring the unit again" in caplog.text


# ---------------------------------------------------------------------------- 25.3: keys by content


def test_result_keys_depend_on_content_not_on_the_run():
    """The key of a unit hashes what its rows depend on: editing a persona changes its units' keys and its
    opposite's (whose metrics read the persona's statements), nobody else's; another mask digest or other
    evaluation settings change them too. No run id enters it, so every run finds the same parts."""
    cat = load_catalog("builtin")
    mask = layout.parse_mask(f"masks/model={KEY}/method=magnitude/sparsity=0.5/general.safetensors")
    version = MaskVersion("d" * 32, "i", "x")

    def keys(catalog: Catalog, config=CONFIG, v=version) -> dict[str, str]:
        return {p.id: result_part_key(KEY, p, catalog.personas.get(p.opposite), mask, v, config, "calib")
                for p in catalog}

    before = keys(cat)
    assert keys(cat) == before
    edited = Catalog(cat.name, {**cat.personas, "introvert": replace(cat["introvert"], description="Quiet.")},
                     cat.source)
    after = keys(edited)
    assert {p for p in before if before[p] != after[p]} == {"introvert", "extrovert"}
    assert keys(cat, replace(CONFIG, max_statements=5)) != before
    assert all(a != b for a, b in zip(keys(cat, v=MaskVersion("e" * 32, "i", "x")).values(), before.values()))
    assert all(layout.parse_result_part(k).persona_id == p for p, k in before.items())


# ---------------------------------------------------------------------------- 25.2: what "nothing changed" checks


def test_an_old_run_that_lost_a_statistics_part_is_run_again(old_store, monkeypatch, capsys):
    """The store of an older version (its manifest names no artifacts) with one statistics part gone:
    the run is not "done"; its stages run again (each regenerates what is missing)."""
    from persona_jobs import execute as ex
    from persona_jobs.stages import STAGES

    p = make_plan(tiny_pipeline_config(str(old_store)))
    lost = sorted(old_store.glob("stats/*/persona=extrovert/*.parquet"))[0]
    lost.unlink()
    ran = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, plan):
            ran.append(self.name)
            return runs.Summary(self.name).finish()

    monkeypatch.setattr(ex, "preflight", lambda plan: None)
    out = ex.execute(p, {name: Fake(name) for name in STAGES})
    text = capsys.readouterr().out
    assert "nothing changed" not in text and "missing or changed" in text and lost.name in text
    assert ran == list(STAGES) and out.ok and not out.skipped


def test_artifact_problems_name_what_is_missing_or_changed(old_store):
    """A manifest's artifacts, checked: a removed statistics part, a mask rebuilt under the same key
    (another digest), a result part with other rows, a missing report."""
    from persona_core.masks.codec import write_mask
    import torch

    store_dir = old_store
    p = make_plan(tiny_pipeline_config(str(store_dir)))
    store = p.store
    stats = sorted(k for k in store.list("stats", suffix=".parquet"))
    mask_key = f"masks/model={KEY}/calib={p.calib.hash}/method=contrastive-wanda/sparsity=0.5/introvert.safetensors"
    write_mask(store, mask_key, {"m": torch.ones(4, 4, dtype=torch.bool)}, {"identity": "v1"})
    from persona_core.run.artifacts import _mask_expectation

    part = _part()
    artifacts = {stats[0]: STATS_PART, stats[1]: STATS_PART, mask_key: _mask_expectation(store, mask_key),
                 part: write_result_part(store, part, _rows()), layout.report(p.run_id): PRESENT}
    (store_dir / layout.report(p.run_id)).parent.mkdir(parents=True, exist_ok=True)
    (store_dir / layout.report(p.run_id)).write_text("<html/>")
    manifest = runs.Manifest(p.run_id, "nightly", runs.SUCCEEDED, p.inputs.to_dict(), artifacts=artifacts)
    assert artifact_problems(p, manifest) == []

    (store_dir / stats[0]).unlink()
    write_mask(store, mask_key, {"m": torch.zeros(4, 4, dtype=torch.bool)}, {"identity": "v2"})
    write_result_part(store, part, _rows(value=0.75))
    (store_dir / layout.report(p.run_id)).unlink()
    problems = artifact_problems(p, manifest)
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert f"{stats[0]}: missing" in text and "rebuilt since the run" in text
    assert "holds other rows" in text and "report.html: missing" in text


def test_a_manifest_with_artifacts_that_are_not_a_map_is_corrupt(tmp_path):
    store = open_store(str(tmp_path))
    m = runs.Manifest("run-x", "pipeline", runs.SUCCEEDED, {}, artifacts={"a": "b"})
    runs.write_manifest(store, m)
    assert runs.read_manifest(store, "run-x").artifacts == {"a": "b"}
    store.write_json(layout.manifest("run-x"), {**m.to_dict(), "artifacts": ["a"]})
    with pytest.raises(Exception, match="artifacts"):
        runs.read_manifest(store, "run-x")


# ---------------------------------------------------------------------------- end to end (Ray)


def _catalog_file(path: Path, edit: bool = False) -> None:
    cat = load_catalog("builtin").select(["introvert", "extrovert", "optimist", "pessimist"])
    personas = [p.to_dict() for p in cat]
    if edit:
        personas[0]["description"] += " Edited."
    path.write_text(yaml.safe_dump({"format": "persona-catalog/v1", "name": "four", "personas": personas}))


def _nightly(cfg) -> dict:
    from persona_jobs import nightly

    assert nightly.run(cfg) == 0
    p = make_plan(cfg)
    m = runs.read_manifest(p.store, p.run_id)
    return {"finished": m.finished, **{s: (m.stages[s].get("done", 0), m.stages[s].get("skipped", 0))
                                       for s in ("calibrate", "masks", "evaluate")}}


@pytest.mark.slow
def test_nightly_over_an_edit_and_back_does_only_what_depends_on_it(ray_cluster, tmp_path, capsys):
    catalog = tmp_path / "catalog.yaml"
    _catalog_file(catalog)
    cfg = tiny_pipeline_config(str(tmp_path / "store"), catalog=str(catalog), personas=["introvert", "optimist"],
                               nightly={"name": "t"})
    p = make_plan(cfg)
    first = _nightly(cfg)
    assert first["evaluate"] == (12, 0)  # 4 personas x (contrastive-wanda, magnitude, wanda-general)

    _catalog_file(catalog, edit=True)  # introvert changes; its opposite's units read it too
    edited = _nightly(cfg)
    assert 0 < edited["masks"][0] < first["masks"][0]  # the units that read introvert's statistics
    assert edited["evaluate"] == (6, 6)  # introvert's and extrovert's units; optimist/pessimist reused

    _catalog_file(catalog)  # back to the first catalog: its run is done, but its artifacts are not all there
    capsys.readouterr()
    back = _nightly(cfg)
    out = capsys.readouterr().out
    assert "missing or changed" in out and back["finished"] != first["finished"]
    assert back["calibrate"] == edited["calibrate"] and back["masks"] == edited["masks"]  # introvert's, again
    assert back["evaluate"] == (0, 12)  # every result of the first version is still stored: reused
    m = runs.read_manifest(p.store, p.run_id)
    assert artifact_problems(p, m) == []
    assert _nightly(cfg)["finished"] == back["finished"]  # and now nothing changed, truly
    assert "nothing changed" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["rerun", "force", "repair"])
def test_a_corrupt_result_part_is_regenerated(pipeline_store, tmp_path, how, capsys):
    from persona_jobs import pipeline

    src, rid = pipeline_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    p = make_plan(tiny_pipeline_config(str(root)))
    index = json.loads((root / layout.results_index(rid)).read_text())["parts"]
    victim = root / sorted(index)[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    out = pipeline.execute(p, force=how == "force", do_repair=how == "repair")
    assert out.ok, out.manifest.error
    evaluated = {s["stage"]: s for s in out.summaries}["evaluate"]
    assert evaluated["done"] == 1  # that unit alone, scored again
    back = read_result_part(open_store(str(root)), sorted(index)[0], index[sorted(index)[0]])
    assert back.num_rows > 0  # the same rows as before (deterministic scoring)
