"""The calibrate job: bad input caught early; on a local Ray cluster, exactly the expected parts,
a rerun that writes nothing, a failing unit retried without duplicates, stale parts pruned."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from persona_core.errors import UserError
from persona_core.run.units import calibration_personas as resolve
from persona_core.run.units import calibration_units as plan
from persona_jobs.calibrate import FAIL_ONCE_ENV, plan_from_args, run
from persona_jobs.cli import build_parser
from persona_jobs.cli import main as cli_main
from persona_jobs.common import preflight
from persona_core.calib.config import CalibConfig
from persona_core.calib.recorder import calibrate_persona
from persona_core.catalog import REFERENCE_PERSONA_ID, reference_persona
from persona_core.models.loading import model_key
from persona_core.calib.parts import write_stats
from persona_core.calib.stored import list_parts, read_generated, read_persona_stats
from persona_core.store.store import open_store

PERSONAS = ["introvert", "extrovert", "optimist", "pessimist"]
CALIB = CalibConfig(max_length=64, batch_size=8)
CALIB_FLAGS = ["--max-length", "64", "--batch-size", "8"]


def plan_of(catalog: str, store: str, *flags: str, model: str = "tiny-random-llama"):
    """The plan `persona-jobs calibrate` makes of these flags."""
    return plan_from_args(build_parser().parse_args(["calibrate", "--catalog", catalog, "--model", model,
                                                     "--store", store, *flags]))


def test_bad_input_fails_before_work(tmp_path, builtin_catalog):
    store = str(tmp_path / "store")
    with pytest.raises(UserError, match="nobody"):
        run(plan_of("builtin", store, "--personas", "introvert,nobody"))
    with pytest.raises(UserError, match="no such file"):
        plan_of(str(tmp_path / "missing.yaml"), store)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot be written"):
        preflight(plan_of("builtin", str(blocker / "store"), "--personas", "introvert"), need_ray=False)
    with pytest.raises(UserError, match="no-model"):
        plan_of("builtin", store, "--personas", "introvert", model=str(tmp_path / "no-model"))
    with pytest.raises(UserError, match="--shard-size must be >= 1"):
        plan_of("builtin", store, "--shard-size", "0")
    assert not os.path.exists(os.path.join(store, "stats"))
    assert cli_main(["calibrate", "--catalog", "builtin", "--model", "tiny-random-llama", "--store", store,
                     "--personas", "nobody"]) == 2


def test_resolve_general(builtin_catalog):
    assert [p.id for p in resolve(builtin_catalog, ["introvert"], True)] == ["introvert", REFERENCE_PERSONA_ID]
    assert [p.id for p in resolve(builtin_catalog, [REFERENCE_PERSONA_ID], False)] == [REFERENCE_PERSONA_ID]
    assert len(reference_persona().calibration) > 0


def test_job_on_local_cluster(ray_cluster, tiny, builtin_catalog, tmp_path, monkeypatch):
    store = open_store(str(tmp_path / "store"))
    key = model_key("tiny-random-llama")
    chosen = resolve(builtin_catalog, PERSONAS, True)
    units = plan(chosen, key, CALIB, 16)
    expected = sorted(u.key for u in units)
    assert len(expected) == len(set(expected)) > len(chosen)  # several shards per persona

    # The second shard of introvert raises once, after writing its part; Ray retries it.
    monkeypatch.setenv(FAIL_ONCE_ENV, f"introvert:1:{tmp_path / 'markers'}")
    p = plan_of("builtin", store.url, "--personas", *PERSONAS, "--shard-size", "16", *CALIB_FLAGS, "--general",
                "--actors", "2")
    assert p.calib == CALIB and p.persona_ids == list(builtin_catalog.personas)  # named personas: no opposites added
    summary = run(p)
    assert (summary.done, summary.skipped, summary.failed) == (len(units), 0, 0), summary.errors
    assert (tmp_path / "markers" / "introvert-1.failed").exists()  # the failure did happen
    assert list_parts(store, key) == expected  # exactly the planned parts, none duplicated
    stats = read_persona_stats(store, key, "introvert")  # shards complete, each once
    assert stats.tokens == summary_tokens(store, key, "introvert")

    # Sharded statistics equal one pass over all texts.
    whole, _ = calibrate_persona(tiny, builtin_catalog["introvert"], CALIB)
    for k, g in whole.groups.items():
        assert stats[k].tokens == g.tokens and stats[k].samples == g.samples
        torch.testing.assert_close(stats[k].sumsq, g.sumsq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats[k].norm_sum, g.norm_sum, rtol=1e-5, atol=1e-6)

    # A second run finds everything stored and writes nothing; a stale part (an older version of the
    # persona) is pruned, while another calibration config's part of this version stays (issue 12 item 4).
    monkeypatch.delenv(FAIL_ONCE_ENV)
    mtimes = {k: os.path.getmtime(store.path(k)) for k in expected}
    stale = write_stats(store, dataclasses.replace(stats, persona_hash="old-version"))
    other_config = write_stats(store, dataclasses.replace(stats, calib_hash="other-config"))
    again = run(p)
    assert (again.done, again.skipped, again.failed) == (0, len(units), 0)
    assert not store.exists(stale) and store.exists(other_config)
    store.delete(other_config)
    assert {k: os.path.getmtime(store.path(k)) for k in list_parts(store, key)} == mtimes
    assert read_generated(store, key, "introvert") == []


def summary_tokens(store, key, pid) -> int:
    return sum(store.read_parquet(k, columns=["tokens"]).column("tokens")[0].as_py()
               for k in list_parts(store, key, pid))
