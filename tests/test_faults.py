"""Faults and bad input: killed actors, corrupt artifacts, bad configs and stores, S3."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from conftest import free_port, tiny_pipeline_config

from persona_jobs import calibrate, pipeline
from persona_jobs.cli import main as cli_main
import torch

from persona_core.report.results import read_results_index
from persona_core.run import runs
from persona_core.masks.codec import read_mask
from persona_core.catalog import reference_persona
from persona_core.calib.stored import list_parts
from persona_core.run.units import calibration_units
from persona_core.store.store import open_store
from persona_core.run.plan import make_plan
from persona_core.run.execution import verify_artifacts


def snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- a killed actor


def test_calibration_actor_killed_mid_run(ray_cluster, tmp_path, monkeypatch):
    ray = ray_cluster
    cfg = tiny_pipeline_config(str(tmp_path / "store"), personas=["introvert", "optimist"],
                               calibrate__shard_size=4, evaluate__enabled=False)
    p = make_plan(cfg)
    handles, real_remote = [], ray.remote

    def spy_remote(*args, **kwargs):  # record the calibration actors' handles as they are created
        deco = real_remote(*args, **kwargs)
        if args or not kwargs.get("max_restarts"):
            return deco

        def wrap(cls):
            actor_cls = deco(cls)
            if not (isinstance(cls, type) and issubclass(cls, calibrate.CalibrationWorker)):
                return actor_cls

            class Spy:
                def remote(self, *a, **k):
                    h = actor_cls.remote(*a, **k)
                    handles.append(h)
                    return h
            return Spy()
        return wrap

    monkeypatch.setattr(ray, "remote", spy_remote)
    killed = threading.Event()

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline:
            if handles and list_parts(p.store, p.inputs.model_key):  # mid-run: some parts written
                ray.kill(handles[0], no_restart=False)  # the actor restarts; its task is retried
                killed.set()
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = pipeline.execute(p)
    t.join(5)
    assert killed.is_set(), "the actor was never killed mid-run"
    assert out.ok, out.manifest.error

    planned = calibration_units(list(p.catalog) + [reference_persona()], p.inputs.model_key, p.calib,
                                cfg.calibrate.shard_size)
    parts = list_parts(p.store, p.inputs.model_key)
    assert sorted(parts) == sorted(u.key for u in planned)  # complete, and not one part twice
    assert len(parts) == len(set(parts)) > 10


# ---------------------------------------------------------------------------- corrupt artifacts


def test_corrupt_stats_part_is_named_and_repair_regenerates_only_it(stored, capsys):
    root, rid = stored
    cfg = tiny_pipeline_config(str(root), masks__sparsities=[0.3], evaluate__enabled=False)  # needs the stats
    p = make_plan(cfg)
    parts = list_parts(p.store, p.inputs.model_key)
    victim = next(k for k in parts if "persona=introvert" in k)
    p.store.write_bytes(victim, b"PAR1 this is not parquet")
    others = {k: p.store.read_bytes(k) for k in parts if k != victim}

    out = pipeline.execute(p)
    assert not out.ok
    assert f"corrupt artifact: {p.store.uri(victim)}" in out.manifest.error
    assert "--repair" in out.manifest.error

    out = pipeline.execute(p, do_repair=True)
    assert out.ok, out.manifest.error
    calib = next(s for s in out.summaries if s["stage"] == "calibrate")
    assert calib["done"] == 1  # only the corrupt part was recomputed
    assert {k: p.store.read_bytes(k) for k in others} == others
    p.store.read_parquet(victim)  # whole again
    assert "removing corrupt" in capsys.readouterr().out


def test_corrupt_mask_is_repaired_alone(stored, tmp_path, capsys):
    root, rid = stored
    p = make_plan(tiny_pipeline_config(str(root)))
    masks = p.store.list("masks/", suffix=".safetensors")
    victim = masks[0]
    p.store.write_bytes(victim, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    others = [k for k in masks if k != victim]
    shutil.copytree(root, tmp_path / "before")
    assert verify_artifacts(p) == [victim]

    out = pipeline.execute(p, do_repair=True)
    assert out.ok, out.manifest.error
    assert verify_artifacts(p) == []
    stage = next(s for s in out.summaries if s["stage"] == "build-masks")
    assert stage["done"] == 2  # the one unit holding it: an opposing pair's two masks come from one task
    for k in others:  # its partner is rebuilt with it, bit for bit the same mask
        before, _ = read_mask(open_store(str(tmp_path / "before")), k)
        after, _ = read_mask(p.store, k)
        assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    calib = next(s for s in out.summaries if s["stage"] == "calibrate")
    assert calib["done"] == 0


# ---------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_work_and_loses_nothing(stored, tmp_path, capsys):
    root, rid = stored
    before = snapshot(root)

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"store: {root}\nmodel: tiny-random-llama\nmasks:\n  sparsity: 0.5\n")
    assert cli_main(["run", "--config", str(bad)]) == 2
    assert f"{bad}:4: masks.sparsity: unknown key" in capsys.readouterr().err

    assert cli_main(["run", "--store", str(root), "--model", "tiny-random-llama", "--personas", "nobody"]) == 2
    assert "unknown persona id(s): nobody" in capsys.readouterr().err

    assert cli_main(["run", "--store", str(root), "--model", "tiny-random-llama", "--methods", "wandah"]) == 2
    assert "masks.methods: unknown method 'wandah' (did you mean 'wanda'?)" in capsys.readouterr().err

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli_main(["run", "--store", str(blocker / "store"), "--model", "tiny-random-llama",
                     "--personas", "introvert"]) == 2
    assert f"store {blocker / 'store'} cannot be" in capsys.readouterr().err

    address = f"127.0.0.1:{free_port()}"
    assert cli_main(["run", "--store", str(root), "--model", "tiny-random-llama", "--personas", "introvert",
                     "--sparsities", "0.2", "--address", address]) == 2
    assert f"cannot reach Ray at {address}" in capsys.readouterr().err

    assert snapshot(root) == before  # nothing stored was touched, let alone lost


# ---------------------------------------------------------------------------- S3


def run_cli_pipeline(tmp_path, store_url: str, env: dict) -> str:
    """`persona-jobs run` in a fresh process (its own local Ray, whose workers inherit `env`); the run id."""
    import os
    import subprocess
    import sys

    import yaml
    from conftest import TINY_PIPELINE

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY_PIPELINE, "store": store_url}))
    full_env = {**os.environ, **env, "PERSONA_PROGRESS": "0", "RAY_ADDRESS": ""}
    full_env.pop("RAY_ADDRESS")
    cmd = [sys.executable, "-m", "persona_jobs", "run", "--config", str(cfg)]
    rid = subprocess.run([*cmd, "--plan"], env=full_env, capture_output=True, text=True, check=True)
    run_id = yaml.safe_load(rid.stdout)["run_id"]
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"run {run_id} succeeded" in done.stdout
    again = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing changed" in again.stdout
    return run_id


@pytest.mark.ray  # `persona-jobs run` in a subprocess starts its own local Ray
def test_whole_pipeline_on_s3(s3_endpoint, s3_url, tmp_path, capsys):
    run_id = run_cli_pipeline(tmp_path, s3_url, {"AWS_ENDPOINT_URL": s3_endpoint})
    store = open_store(s3_url)
    assert runs.read_manifest(store, run_id).ok
    assert store.exists(f"runs/{run_id}/report.html")
    assert read_results_index(store, run_id)  # the run's results: the parts its index names
    assert cli_main(["status", run_id, "--store", s3_url]) == 0
    assert "succeeded" in capsys.readouterr().out
