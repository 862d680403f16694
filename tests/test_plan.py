"""The resolved Plan every stage receives (issue 11): typed stage settings, and the model revision
reaching every stage."""

from __future__ import annotations

import pytest

from conftest import tiny_pipeline_config
from persona_core.errors import UserError
from persona_core.models.loading import model_key
from persona_core.run.plan import make_plan
from persona_core.store.store import open_store

OLD_KEY = "tiny-random-llama-cf1551e6"


def test_plan_resolves_typed_stage_settings(tmp_path):
    p = make_plan(tiny_pipeline_config(str(tmp_path)))
    assert p.model_key == OLD_KEY and p.revision is None
    assert set(p.persona_ids) == {"introvert", "extrovert"} and p.pairs == [("extrovert", "introvert")] or \
        p.pairs == [("introvert", "extrovert")]
    assert p.calib.max_length == 64  # calibrate.options, typed
    assert p.eval.metrics == ("statement-preference",) and p.eval.conditions == ("dense", "masked")
    assert p.eval_pool == {"actors": 1, "cpus_per_actor": None, "device_map": None}
    assert {s.method for s in p.specs} == {"contrastive-wanda", "magnitude", "wanda-general"}
    assert p.mask_methods == ["contrastive-wanda", "magnitude", "wanda-general"]


def test_revision_changes_the_model_key_and_the_run_id(tmp_path):
    a = make_plan(tiny_pipeline_config(str(tmp_path)))
    b = make_plan(tiny_pipeline_config(str(tmp_path), revision="1"))
    assert b.model_key == model_key("tiny-random-llama", revision="1") != a.model_key
    assert b.run_id != a.run_id
    assert b.inputs.to_dict()["model_key"] == b.model_key


def test_revision_where_a_model_has_none_is_refused(tmp_path):
    with pytest.raises(UserError, match="revision"):
        make_plan(tiny_pipeline_config(str(tmp_path), model="smollm2-135m", revision="main"))
    with pytest.raises(UserError, match="seed"):
        make_plan(tiny_pipeline_config(str(tmp_path), revision="main"))


def test_two_revisions_never_share_a_model_key_anywhere(ray_cluster, old_store):
    """Revision 1 of the tiny model run next to a store of revision 0 (the default): every stage
    works under revision 1's key, nothing of revision 0 is touched or reused."""
    from persona_core.masks.codec import MaskFile
    from persona_core.report.results import load_results
    from persona_jobs import pipeline

    root = old_store
    before = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    p = make_plan(tiny_pipeline_config(str(root), revision="1"))
    new_key = p.model_key
    assert new_key != OLD_KEY
    out = pipeline.execute(p)
    assert out.ok, out.manifest.error
    by_stage = {s["stage"]: s for s in out.summaries}
    assert by_stage["calibrate"]["done"] == 9 and by_stage["calibrate"]["skipped"] == 0
    assert by_stage["build-masks"]["done"] == 4 and by_stage["evaluate"]["done"] == 6

    after = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert {k: after[k] for k in before} == before  # revision 0's artifacts untouched
    new = [k for k in after if k not in before]
    for k in new:
        if k.startswith(("stats/", "masks/")):
            assert f"model={new_key}/" in k, k
    store = open_store(str(root))
    for k in new:
        if k.endswith(".safetensors"):
            meta = MaskFile(store, k).metadata
            assert meta["model_key"] == new_key
    rows = load_results(store, p.run_id)
    assert set(rows.column("model").to_pylist()) == {new_key}


def test_channel_attribution_methods_need_attribution_statistics(tmp_path):
    changes = {"masks__methods": ["contrastive-attribution"], "masks__granularities": ["ffn-channels"]}
    with pytest.raises(UserError, match="calibrate.options.attribution: true"):
        make_plan(tiny_pipeline_config(str(tmp_path), **changes))
    p = make_plan(tiny_pipeline_config(str(tmp_path), **changes, calibrate__options__attribution=True))
    assert p.calib.attribution and {(s.method, s.granularity) for s in p.specs} >= {
        ("contrastive-attribution", "ffn-channels")}
