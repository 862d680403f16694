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
from persona_jobs.calibrate import FAIL_ONCE_ENV, run
from persona_jobs.cli import main as cli_main
from persona_core.calib.config import CalibConfig
from persona_core.calib.recorder import calibrate_persona
from persona_core.catalog import REFERENCE_PERSONA_ID, reference_persona
from persona_core.models import model_key
from persona_core.calib.parts import write_stats
from persona_core.calib.stored import list_parts, read_generated, read_persona_stats
from persona_core.store.store import open_store

PERSONAS = ["introvert", "extrovert", "optimist", "pessimist"]
CALIB = CalibConfig(max_length=64, batch_size=8)


def test_bad_input_fails_before_work(tmp_path, builtin_catalog):
    store = str(tmp_path / "store")
    with pytest.raises(UserError, match="nobody"):
        run(builtin_catalog, "tiny-random-llama", store, personas=["introvert", "nobody"])
    with pytest.raises(UserError, match="no such file"):
        run(str(tmp_path / "missing.yaml"), "tiny-random-llama", store)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot be written"):
        run(builtin_catalog, "tiny-random-llama", str(blocker / "store"), personas=["introvert"])
    with pytest.raises(UserError, match="cannot be loaded"):
        run(builtin_catalog, str(tmp_path / "no-model"), store, personas=["introvert"])
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
    summary = run(builtin_catalog, "tiny-random-llama", store, personas=PERSONAS, shard_size=16,
                  calib=CALIB, include_general=True, num_actors=2)
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
    again = run(builtin_catalog, "tiny-random-llama", store, personas=PERSONAS, shard_size=16, calib=CALIB,
                include_general=True, num_actors=2)
    assert (again.done, again.skipped, again.failed) == (0, len(units), 0)
    assert not store.exists(stale) and store.exists(other_config)
    store.delete(other_config)
    assert {k: os.path.getmtime(store.path(k)) for k in list_parts(store, key)} == mtimes
    assert read_generated(store, key, "introvert") == []


def summary_tokens(store, key, pid) -> int:
    return sum(store.read_parquet(k, columns=["tokens"]).column("tokens")[0].as_py()
               for k in list_parts(store, key, pid))
