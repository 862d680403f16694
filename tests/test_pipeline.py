"""The pipeline, nightly and submit/status on tiny-random-llama (2 personas + general) and a local Ray."""

from __future__ import annotations

import shutil
import threading
from types import SimpleNamespace

import pytest
from conftest import tiny_pipeline_config

from persona_jobs import common, jobs_api, nightly, pipeline, submit
from persona_jobs.cli import UserError, build_parser, main as cli_main
from persona_jobs.flags import config_from_args
from persona_jobs.stages import STAGES
from persona_core.report.results import read_results_index
from persona_core.run import runs
from persona_core.store.lease import Lease
from persona_core.store.store import open_store
from persona_core.run.plan import make_plan


def copy_store(src, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst


def forbid(monkeypatch, *stages):
    """Make these stages fail loudly if the pipeline calls them."""
    for s in stages:
        def boom(p, s=s):
            raise AssertionError(f"stage {s} must not run")
        monkeypatch.setitem(STAGES, s, SimpleNamespace(run=boom))


def test_run_writes_manifest_results_and_report(pipeline_store):
    root, rid = pipeline_store
    store = open_store(str(root))
    m = runs.read_manifest(store, rid)
    assert m.ok and m.kind == "pipeline" and m.error is None
    assert set(m.stages) == {"calibrate", "masks", "evaluate", "report"}
    assert set(m.inputs["personas"]) == {"introvert", "extrovert", "general"}
    assert store.exists(f"runs/{rid}/report.html")
    page = store.read_bytes(f"runs/{rid}/report.html").decode()
    for text in ("class='headline'", "Inputs", "catalog", "general text (reported)", "perplexity budget"):
        assert text in page, text  # the report names the run's inputs
    assert read_results_index(store, rid)  # the run's results: the parts its index names
    assert store.list("masks/", suffix=".safetensors")


def test_rerun_with_nothing_changed_does_no_work(pipeline_store, monkeypatch, capsys):
    root, rid = pipeline_store
    forbid(monkeypatch, *STAGES)
    monkeypatch.setattr(common, "ensure_ray", lambda *a, **k: pytest.fail("no Ray needed"))
    p = make_plan(tiny_pipeline_config(str(root)))
    assert p.run_id == rid  # the same inputs give the same id
    out = pipeline.execute(p)
    assert out.ok and out.skipped
    assert "nothing changed" in capsys.readouterr().out


def test_run_id_follows_content(tmp_path):
    base = make_plan(tiny_pipeline_config(str(tmp_path / "a"))).run_id
    assert make_plan(tiny_pipeline_config(str(tmp_path / "b"))).run_id == base  # the store is not content
    assert make_plan(tiny_pipeline_config(str(tmp_path), masks__sparsities=[0.3])).run_id != base
    assert make_plan(tiny_pipeline_config(str(tmp_path), personas=["optimist"])).run_id != base


def test_interrupted_run_resumes_after_its_last_finished_stage(pipeline_store, tmp_path, monkeypatch):
    root = copy_store(pipeline_store[0], tmp_path)
    cfg = tiny_pipeline_config(str(root), evaluate__conditions=["dense"])  # a new run over stored masks
    p = make_plan(cfg)

    def interrupted(p):
        raise KeyboardInterrupt  # the operator's Ctrl-C, or a killed driver, between stages

    monkeypatch.setitem(STAGES, "evaluate", SimpleNamespace(run=interrupted))
    with pytest.raises(KeyboardInterrupt):
        pipeline.execute(p)
    store = p.store
    assert runs.read_manifest(store, p.run_id) is None  # the run does not exist yet
    assert runs.run_state(store, p.run_id)["status"] == "incomplete"
    assert {"calibrate", "masks"} <= set(runs.run_state(store, p.run_id)["stages"])

    monkeypatch.undo()
    forbid(monkeypatch, "calibrate", "masks")
    out = pipeline.execute(p)
    assert out.ok and runs.read_manifest(store, p.run_id).ok


def test_status_command(pipeline_store, capsys):
    root, rid = pipeline_store
    assert cli_main(["status", rid, "--store", str(root)]) == 0
    text = capsys.readouterr().out
    assert f"run {rid}: succeeded" in text and "report:" in text
    assert cli_main(["status", "--store", str(root)]) == 0
    assert rid in capsys.readouterr().out
    assert cli_main(["status", "run-0000000000000000", "--store", str(root)]) == 2


# ---------------------------------------------------------------------------- nightly


def test_nightly_regenerates_only_what_changed(pipeline_store, tmp_path, monkeypatch, capsys):
    root = copy_store(pipeline_store[0], tmp_path)
    cfg = tiny_pipeline_config(str(root))
    assert nightly.run(cfg) == 0  # first nightly: same inputs as the stored run -> no stage work
    store = open_store(str(root))
    assert runs.read_latest(store, "nightly") == pipeline_store[1]

    forbid(monkeypatch, *STAGES)
    assert nightly.run(cfg) == 0
    assert "nothing changed" in capsys.readouterr().out
    monkeypatch.undo()

    # A changed method config: calibration is reused (no calibrate work), masks and evaluation redone.
    changed = tiny_pipeline_config(str(root), masks__sparsities=[0.5, 0.3])
    calls = []
    real = STAGES["calibrate"]
    monkeypatch.setitem(STAGES, "calibrate", SimpleNamespace(run=lambda p: calls.append(s := real.run(p)) or s))
    assert nightly.run(changed) == 0
    assert calls[0].done == 0 and calls[0].skipped > 0
    m = runs.read_manifest(store, runs.read_latest(store, "nightly"))
    assert m.kind == "nightly" and m.changes["config_changed"] == ["masks"]
    assert not store.exists("leases/nightly-nightly.json")  # released


def test_overlapping_nightly_exits_cleanly_and_touches_nothing(tmp_path, capsys):
    cfg = tiny_pipeline_config(str(tmp_path / "store"))
    store = open_store(cfg.store)
    with Lease(store, "nightly-nightly", ttl_s=60, owner="the-other-run"):
        before = sorted(store.list())
        assert nightly.run(cfg) == 0
        assert sorted(store.list()) == before
    assert "the-other-run" in capsys.readouterr().out


def test_two_concurrent_nightly_runs_one_proceeds(pipeline_store, tmp_path, monkeypatch, capsys):
    """Both start together on one store; exactly one runs the pipeline, the other exits 0."""
    root = copy_store(pipeline_store[0], tmp_path)
    cfg = tiny_pipeline_config(str(root))
    inside, release = threading.Event(), threading.Event()
    real_execute = nightly.execute
    executed = []

    def slow_execute(p, **kw):
        executed.append(threading.current_thread().name)
        inside.set()
        release.wait(30)
        return real_execute(p, **kw)

    monkeypatch.setattr(nightly, "execute", slow_execute)
    codes = {}
    first = threading.Thread(target=lambda: codes.setdefault("first", nightly.run(cfg)), name="first")
    first.start()
    assert inside.wait(30)
    codes["second"] = nightly.run(cfg)  # overlaps the first one's lease
    release.set()
    first.join(60)
    assert codes == {"first": 0, "second": 0}
    assert executed == ["first"]
    assert "another run is in progress" in capsys.readouterr().out
    store = open_store(str(root))
    assert runs.read_latest(store, "nightly") == pipeline_store[1]
    assert not store.list("leases/")


# ---------------------------------------------------------------------------- submit


class FakeJobs:
    """The part of JobSubmissionClient that `submit` uses, in memory."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}

    def get_job_info(self, sid):
        if sid not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {sid} does not exist.")
        return type("Info", (), {"status": self.jobs[sid]["status"]})

    def submit_job(self, **kw):
        if kw["submission_id"] in self.jobs:
            raise RuntimeError("Job with submission_id already exists")
        self.jobs[kw["submission_id"]] = {"status": "PENDING", **kw}
        return kw["submission_id"]


def test_submit_derives_id_from_run_and_never_runs_a_run_twice(tmp_path, capsys):
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text("catalog: builtin\nmodel: tiny-random-llama\npersonas: [introvert]\n"
                        f"store: {tmp_path / 'store'}\nmasks: {{methods: [wanda], sparsities: [0.5]}}\n")
    command = ["run", "--config", str(cfg_path)]
    rid = make_plan(config_from_args(build_parser().parse_args(command))).run_id
    fake = FakeJobs()
    sid, new = submit.submit(command, jobs_client=fake, working_dir=False, shared_store=True)
    assert new and sid.startswith(f"persona-run-{rid.removeprefix('run-')}-")  # + the store's context hash
    job = fake.jobs[sid]
    assert job["entrypoint"] == "python -m persona_jobs run --config inputs/p.yaml"  # the config travels along
    assert job["entrypoint_num_cpus"] == 0 and "AWS_SECRET_ACCESS_KEY" not in job["runtime_env"]["env_vars"]

    assert submit.submit(command, jobs_client=fake, working_dir=False, shared_store=True) == (sid, False)  # pending: not again
    fake.jobs[sid]["status"] = "SUCCEEDED"
    assert submit.submit(command, jobs_client=fake, working_dir=False, shared_store=True) == (sid, False)
    fake.jobs[sid]["status"] = "FAILED"
    sid2, new = submit.submit(command, jobs_client=fake, working_dir=False, shared_store=True)
    assert new and sid2 == f"{sid}-a2"
    assert "already submitted" in capsys.readouterr().out


def test_submit_working_dir_paths_and_token(tmp_path, monkeypatch):
    rel = submit.ship_files(["run", "--config", str(submit.ROOT / "configs" / "demo.yaml")], submit.ROOT)
    assert rel == ["run", "--config", "configs/demo.yaml"]
    outside = tmp_path / "x.yaml"
    outside.write_text("{}")
    with pytest.raises(UserError, match="outside the project folder"):
        submit.ship_files(["run", "--config", str(outside)], submit.ROOT)

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-env")
    assert jobs_api.find_token() == ("tok-env", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "t").write_text("tok-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert jobs_api.find_token()[0] == "tok-file"
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert jobs_api.find_token() == (None, "none")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("tok-default")
    assert jobs_api.find_token()[0] == "tok-default"
    assert jobs_api.find_token(str(tmp_path / "t"))[0] == "tok-file"


def test_submit_to_unreachable_cluster_is_a_clear_error(capsys):
    from conftest import free_port

    code = cli_main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--", "catalog", "show", "builtin"])
    assert code == 2
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err
