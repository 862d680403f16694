"""A store written before the redesign (tests/data/store-v1, by the code of commit 65813b5) is found done.

The store holds one finished run of the tiny pipeline (conftest.TINY_PIPELINE): statistics of
introvert, extrovert and general, contrastive-wanda masks and the two baselines, results and report.
The same inputs must give the same run id, the same keys and the same mask identities, so a rerun
does no work, even when forced to walk every stage.
"""

from __future__ import annotations

import json
from pathlib import Path


from conftest import tiny_pipeline_config

from persona_core.run.plan import make_plan

OLD_STORE = Path(__file__).parent / "data" / "store-v1"
RUN_ID = "run-d0eca91bdd3a0f74"
MODEL_KEY = "tiny-random-llama-cf1551e6"
MASK_IDENTITIES = {  # key -> (identity, digest of the decoded mask), as written by the old code
    f"masks/model={MODEL_KEY}/method=contrastive-wanda/sparsity=0.5/extrovert.safetensors":
        ("539e4c703c0b2d9c", "c730fe81d393865374831946c024fd6c"),
    f"masks/model={MODEL_KEY}/method=contrastive-wanda/sparsity=0.5/introvert.safetensors":
        ("539e4c703c0b2d9c", "9906939a8a0a4273519c613a5ec04160"),
}


def _keys(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _mask_header(path: Path) -> tuple[str, str]:
    """(identity, digest) from a mask file's header, read raw: masks of this age carry no payload
    digest, so the verified reader refuses them (by design, issue 12 item 3); their keys and
    identities are what a rerun must still agree with."""
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    return json.loads(header["meta"])["identity"], header["digest"]


def test_old_store_pinned_content():
    keys = _keys(OLD_STORE)
    assert len([k for k in keys if k.startswith("stats/")]) == 9
    assert len([k for k in keys if k.startswith("masks/")]) == 4
    assert len([k for k in keys if k.startswith(f"results/run={RUN_ID}/")]) == 6
    for key, pinned in MASK_IDENTITIES.items():
        assert _mask_header(OLD_STORE / key) == pinned


def test_same_inputs_give_the_old_run_id_and_model_key(old_store):
    p = make_plan(tiny_pipeline_config(str(old_store)))
    assert (p.run_id, p.inputs.model_key) == (RUN_ID, MODEL_KEY)
    manifest = json.loads((old_store / "runs" / RUN_ID / "manifest.json").read_text())
    assert p.inputs.to_dict()["personas"] == manifest["inputs"]["personas"]
    assert p.inputs.to_dict()["work"] == manifest["inputs"]["work"]


def test_rerun_of_the_old_store_finds_its_work_done(old_store, monkeypatch, capsys):
    from persona_jobs import pipeline

    p = make_plan(tiny_pipeline_config(str(old_store)))
    out = pipeline.execute(p)
    assert out.ok and out.skipped and "nothing changed" in capsys.readouterr().out


def test_every_planned_key_and_identity_is_the_old_one(old_store):
    """Each stage's units, planned by today's code, name the stored artifacts: the same stats part keys,
    the same mask identities (keys now carry calib=), the same result part names."""
    from persona_core.catalog import reference_persona
    from persona_core.run.units import calibration_units, evaluation_tasks, mask_units, stats_fingerprints

    p = make_plan(tiny_pipeline_config(str(old_store)))
    store = p.store
    stored = set(_keys(old_store))

    calib = calibration_units([*p.catalog, reference_persona()], p.model_key, p.calib, p.config.calibrate.shard_size)
    assert {u.key for u in calib} == {k for k in stored if k.startswith("stats/")}

    # Masks: the same identities (what they derive from); their keys now name the calibration config
    # (calib=<hash>/, issue 12 item 4, a deliberate change: old masks are rebuilt, never reused for a config).
    ids = p.persona_ids
    units, problems = mask_units(p.model_key, p.specs, ids, {q.id: q.opposite for q in p.catalog},
                                 stats_fingerprints(store, p.model_key, p.calib.hash), p.calib.hash)
    assert not problems
    planned = {key: u.identity for u in units for _, key in u.outputs}
    old_keys = {k for k in stored if k.startswith("masks/")}
    in_old_layout = {k.replace(f"/calib={p.calib.hash}/", "/"): v for k, v in planned.items()}
    assert set(in_old_layout) == old_keys
    assert sum(f"/calib={p.calib.hash}/" in k for k in planned) == 3  # magnitude reads no statistics
    for key, (identity, _) in MASK_IDENTITIES.items():
        assert in_old_layout[key] == identity

    # Result parts: keyed by content since issue 25 item 3 (results/model=<k>/persona=<id>/part-<what>-<hash>,
    # shared by every run that asks for the same unit), so an old run's parts (results/run=<id>/part-...) are
    # never reused by a new evaluation; they stay readable as that run's results (below). The units are the
    # same: one per persona and method/sparsity.
    tasks = evaluation_tasks(store, p.catalog, p.model_key, p.eval, list(p.config.masks.methods),
                             list(p.config.masks.sparsities), ids)  # no config named: the stored masks
    from persona_core.store import layout

    planned = sorted(f"{r.persona_id}-{r.what}" for r in (layout.parse_result_part(u.part) for t in tasks
                                                           for u in t.units))
    old_parts = sorted(k for k in stored if k.startswith("results/"))
    assert all(layout.is_legacy_result_part(k) for k in old_parts)
    assert planned == sorted(k.removeprefix(f"results/run={RUN_ID}/part-").rsplit("-", 1)[0] for k in old_parts)


def test_old_results_without_an_index_are_still_the_runs_results(old_store):
    """A run written before results indexes: its results are the parts in its own folder (as before)."""
    from persona_core.report.results import load_results

    rows = load_results(str(old_store), RUN_ID)
    assert rows.num_rows > 0 and set(rows.column("persona").to_pylist()) == {"introvert", "extrovert"}
