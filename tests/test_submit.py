"""submit / status against Ray's own JobSubmissionClient talking HTTP to a Jobs API on 127.0.0.1
(issue 12 items 7, 8, 9, 11): submission ids that name the work, an explicit resubmit, stores the
cluster can see, Ray's state winning over an older manifest, and one-line errors for addresses
that are not Ray and for temporary failures."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from persona_jobs import jobs_api, submit
from persona_jobs.cli import UserError
from persona_jobs.cli import main as cli_main
from persona_core.run import runs
from persona_core.store.store import open_store


class FakeRayJobs:
    """The REST endpoints of Ray's Jobs API that JobSubmissionClient calls, in memory."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.packages: dict[str, bytes] = {}
        self.logs: dict[str, str] = {}
        self.nodes: list[dict] | None = None  # GET /api/v0/nodes rows; None: the endpoint answers 404
        self.fail_submit: int | None = None  # answer POST /api/jobs/ with this HTTP status
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def set_status(self, sid: str, status: str, message: str = ""):
        self.jobs[sid].update(status=status, message=message or f"Job {status.lower()}.")

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body):
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/api/version":
                    return self._send(200, {"version": "4", "ray_version": "2.59.0", "ray_commit": "x"})
                if self.path.startswith("/api/packages/"):
                    return self._send(200, b"{}") if self.path in fake.packages else self._send(404, b"no")
                if self.path.rstrip("/") == "/api/jobs":
                    return self._send(200, list(fake.jobs.values()))
                if self.path.startswith("/api/v0/nodes"):
                    if fake.nodes is None:
                        return self._send(404, b"no such endpoint")
                    return self._send(200, {"result": True, "msg": "", "data": {"result": {
                        "total": len(fake.nodes), "result": fake.nodes}}})
                if self.path.startswith("/api/jobs/") and self.path.endswith("/logs"):
                    sid = self.path.split("/")[3]
                    if sid in fake.jobs:
                        return self._send(200, {"logs": fake.logs.get(sid, "")})
                    return self._send(404, b"Job does not exist")
                if self.path.startswith("/api/jobs/"):
                    sid = self.path.rsplit("/", 1)[1]
                    if sid in fake.jobs:
                        return self._send(200, fake.jobs[sid])
                    return self._send(404, b"Job does not exist")
                self._send(404, b"no such endpoint")

            def do_PUT(self):
                fake.packages[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
                self._send(200, b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                if self.path.startswith("/api/jobs/") and self.path.endswith("/stop"):
                    sid = self.path.split("/")[3]
                    if sid not in fake.jobs:
                        return self._send(404, b"Job does not exist")
                    stopped = fake.jobs[sid]["status"] in ("PENDING", "RUNNING")
                    if stopped:
                        fake.set_status(sid, "STOPPED")
                    return self._send(200, {"stopped": stopped})
                if fake.fail_submit:
                    return self._send(fake.fail_submit, b"Service Unavailable: the head is restarting")
                sid = body["submission_id"]
                if sid in fake.jobs:
                    return self._send(400, f"Job with submission_id {sid} already exists.".encode())
                fake.jobs[sid] = {"type": "SUBMISSION", "job_id": None, "submission_id": sid, "status": "PENDING",
                                  "entrypoint": body["entrypoint"], "message": "Job is pending.",
                                  "metadata": body.get("metadata") or {}, "runtime_env": body.get("runtime_env"),
                                  "start_time": int(time.time() * 1000) + len(fake.jobs),
                                  "entrypoint_num_cpus": body.get("entrypoint_num_cpus"),
                                  "entrypoint_resources": body.get("entrypoint_resources")}
                self._send(200, {"job_id": sid, "submission_id": sid})

        return Handler


@pytest.fixture(autouse=True)
def _fresh_logging(monkeypatch):
    """cli.main configures logging once per process; drop handlers bound to an earlier test's stderr."""
    import logging

    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture
def ray_jobs():
    fake = FakeRayJobs()
    yield fake
    fake.close()


def run_config(tmp_path, store: str, name: str = "p.yaml"):
    path = tmp_path / name
    path.write_text("catalog: builtin\nmodel: tiny-random-llama\npersonas: [introvert]\n"
                    f"store: {store}\nmasks: {{methods: [wanda], sparsities: [0.5]}}\n")
    return path


# ---------------------------------------------------------------------------- item 7


def test_submission_id_covers_store_and_flags_and_resubmit_is_explicit(ray_jobs, tmp_path, capsys):
    cfg = run_config(tmp_path, "s3://bucket-a/store")
    command = ["run", "--config", str(cfg)]
    sid, new = submit.submit(command, address=ray_jobs.url, working_dir=False)
    assert new and ray_jobs.jobs[sid]["metadata"]["persona.store"] == "s3://bucket-a/store"
    rid = ray_jobs.jobs[sid]["metadata"]["persona.run_id"]
    assert rid.startswith("run-") and sid.startswith(f"persona-run-{rid.removeprefix('run-')}-")
    assert submit.parse_submission_id(sid)["run_id"] == rid
    ray_jobs.set_status(sid, "SUCCEEDED")
    assert submit.submit(command, address=ray_jobs.url, working_dir=False) == (sid, False)

    # The same config against another store is other work: submitted, not "already submitted".
    other, new = submit.submit([*command, "--store", "s3://bucket-b/store"], address=ray_jobs.url, working_dir=False)
    assert new and other != sid and ray_jobs.jobs[other]["metadata"]["persona.store"] == "s3://bucket-b/store"
    assert ray_jobs.jobs[other]["metadata"]["persona.run_id"] == rid  # the same run, elsewhere
    forced, new = submit.submit([*command, "--force"], address=ray_jobs.url, working_dir=False)
    assert new and forced not in (sid, other)

    # --resubmit runs succeeded work again as a new attempt, never while an attempt runs.
    again, new = submit.submit(command, address=ray_jobs.url, working_dir=False, resubmit=True)
    assert new and again == f"{sid}-a2"
    assert submit.submit(command, address=ray_jobs.url, working_dir=False, resubmit=True) == (again, False)
    assert "while it runs" in capsys.readouterr().out


# ---------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("store", ["./persona-store", "persona-store", "memory://x", None])
def test_submit_refuses_a_store_the_cluster_cannot_see(ray_jobs, tmp_path, capsys, store):
    args = ["run", "--catalog", "builtin", "--model", "tiny-random-llama"]
    if store:
        args += ["--store", store]
    code = cli_main(["submit", "--address", ray_jobs.url, "--no-working-dir", "--", *args])
    assert code == 2 and not ray_jobs.jobs
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: store ")
    assert "memory://" in line if store == "memory://x" else "relative folder" in line


def test_a_local_folder_store_needs_shared_store(ray_jobs, tmp_path, capsys):
    cfg = run_config(tmp_path, str(tmp_path / "store"))
    base = ["submit", "--address", ray_jobs.url, "--no-working-dir"]
    assert cli_main([*base, "--", "run", "--config", str(cfg)]) == 2
    assert "--shared-store" in capsys.readouterr().err and not ray_jobs.jobs
    assert cli_main([*base, "--shared-store", "--", "run", "--config", str(cfg)]) == 0
    assert len(ray_jobs.jobs) == 1
    # Other subcommands: their --store decides (the default is relative, so refused).
    assert cli_main([*base, "--", "calibrate", "--catalog", "builtin"]) == 2
    assert cli_main([*base, "--", "calibrate", "--catalog", "builtin", "--store", "s3://b/s"]) == 0
    assert cli_main([*base, "--", "catalog", "validate", "builtin"]) == 0  # no store at all


# ---------------------------------------------------------------------------- item 9


def test_status_of_a_failed_job_exits_non_zero_despite_an_older_manifest(ray_jobs, tmp_path, capsys):
    store_dir = tmp_path / "shared-store"
    cfg = run_config(tmp_path, str(store_dir))
    sid, _ = submit.submit(["run", "--config", str(cfg)], address=ray_jobs.url, working_dir=False,
                           shared_store=True)
    rid = ray_jobs.jobs[sid]["metadata"]["persona.run_id"]
    store = open_store(str(store_dir))  # an older, successful manifest of the same run id
    runs.write_manifest(store, runs.Manifest(run_id=rid, kind="pipeline", status=runs.SUCCEEDED, inputs={},
                                             started=1.0, finished=2.0))
    ray_jobs.set_status(sid, "FAILED", "Job entrypoint command failed with exit code 1")
    capsys.readouterr()
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 1
    out = capsys.readouterr().out
    assert f"ray job {sid}: FAILED\n  ray: Job entrypoint command failed" in out
    assert f"run {rid}: succeeded" in out  # shown from the job's own store, but Ray's FAILED decides
    # The default address is asked when none is given (RAY_ADDRESS here).
    assert subprocess_status(sid, ray_jobs.url) == 1
    ray_jobs.set_status(sid, "RUNNING")
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 3
    ray_jobs.set_status(sid, "SUCCEEDED")
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 0
    assert cli_main(["status", rid, "--store", str(store_dir), "--address", ray_jobs.url]) == 0  # found by metadata
    ray_jobs.set_status(sid, "FAILED")
    assert cli_main(["status", rid, "--store", str(store_dir), "--address", ray_jobs.url]) == 1
    assert cli_main(["status", rid, "--store", str(store_dir)]) == 0  # the store alone: its manifest
    assert cli_main(["status", sid, "--no-ray"]) == 2  # no store named: the default store has no such run


def subprocess_status(sid: str, url: str) -> int:
    env = {**__import__("os").environ, "RAY_ADDRESS": url}
    return subprocess.run([sys.executable, "-m", "persona_jobs", "status", sid], env=env,
                          capture_output=True, timeout=120).returncode


# ---------------------------------------------------------------------------- item 11


@pytest.mark.slow  # waits out the client's read timeout
def test_an_open_port_that_is_not_ray_fails_fast_with_one_line(capsys):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    port = silent.getsockname()[1]
    try:
        t0 = time.monotonic()
        code = cli_main(["submit", "--address", f"http://127.0.0.1:{port}", "--", "catalog", "show", "builtin"])
        assert code == 2 and time.monotonic() - t0 < 30
        (line,) = error_lines(capsys.readouterr().err)
        assert "not a Ray dashboard" in line
    finally:
        silent.close()


def test_a_web_server_that_is_not_ray_is_named(capsys):
    class NotRay(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = cli_main(["status", "persona-run-0123456789abcdef", "--address",
                         f"http://127.0.0.1:{server.server_address[1]}"])
        assert code == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert "not a Ray dashboard" in line and "HTTP 404" in line
    finally:
        server.shutdown()
        server.server_close()


def test_a_temporary_ray_error_on_submit_is_one_line(ray_jobs, capsys):
    ray_jobs.fail_submit = 503
    code = cli_main(["submit", "--address", ray_jobs.url, "--no-working-dir", "--", "calibrate", "--catalog",
                     "builtin", "--store", "s3://b/s"])
    assert code == jobs_api.EXIT_TEMPORARY
    (line,) = error_lines(capsys.readouterr().err)
    assert "503" in line and "temporary" in line
    with pytest.raises(UserError):
        submit.submit(["calibrate", "--catalog", "builtin", "--store", "s3://b/s"], address=ray_jobs.url)


def test_status_lists_standalone_evaluate_runs(ray_cluster, tmp_path, capsys):
    import torch

    from persona_core.masks.codec import write_mask
    from persona_core.masks.spec import mask_key
    from persona_core.models.layers import linear_groups
    from persona_core.models.loading import load_model, model_key

    store = open_store(str(tmp_path / "st"))
    model = load_model("tiny-random-llama", device="cpu").model
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(model.get_submodule(n).weight.shape, generator=g) > 0.5
             for grp in linear_groups(model) for n in grp.modules}
    write_mask(store, mask_key(model_key("tiny-random-llama"), "contrastive-wanda", 0.5, "introvert"), masks, {})
    code = cli_main(["evaluate", "--store", store.url, "--model", "tiny-random-llama", "--personas", "introvert",
                     "--conditions", "dense", "masked", "--metrics", "statement-preference",
                     "--max-statements", "2", "--actors", "1", "--cpus-per-actor", "1", "--no-report"])
    assert code == 0
    capsys.readouterr()
    assert cli_main(["status", "--store", store.url]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    rid = line.split()[0]
    assert rid.startswith("eval-") and line.split()[1:3] == ["evaluate", "succeeded"]
    assert cli_main(["status", rid, "--store", store.url]) == 0
    assert f"run {rid}: succeeded (evaluate)" in capsys.readouterr().out


# ---------------------------------------------------------------------------- item 11: drivers and S3


def test_a_driver_address_that_is_not_ray_fails_fast(ray_cluster, tmp_path):
    """`--address` for a driver (calibrate, run, ...): a silent port and a web server fail in seconds
    with one line (today ray.init retries for minutes); the session's real GCS passes the check."""
    from persona_jobs.common import check_ray_address

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError, match="does not answer like Ray"):
            check_ray_address(f"127.0.0.1:{silent.getsockname()[1]}", timeout=3)
        assert time.monotonic() - t0 < 15
        out = subprocess.run([sys.executable, "-m", "persona_jobs", "calibrate", "--catalog", "builtin", "--model",
                              "tiny-random-llama", "--store", str(tmp_path / "st"), "--address",
                              f"127.0.0.1:{silent.getsockname()[1]}"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2
        assert len(error_lines(out.stderr)) == 1 and "does not answer like Ray" in out.stderr
    finally:
        silent.close()
    with pytest.raises(UserError, match="dashboard URL"):
        check_ray_address("http://127.0.0.1:8265")
    check_ray_address(ray_cluster.get_runtime_context().gcs_address, timeout=10)  # a real GCS: fine


def test_an_unreachable_s3_endpoint_is_one_line_and_exit_2(s3_endpoint, monkeypatch, capsys):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for command in (["status", "--store", "s3://bucket/x"], ["stats", "list", "--store", "s3://bucket/x"],
                    ["calibrate", "--catalog", "builtin", "--model", "tiny-random-llama", "--store", "s3://bucket/x"]):
        assert cli_main(command) == 2, command
        (line,) = error_lines(capsys.readouterr().err)
        assert "cannot reach the store s3://bucket/x (endpoint http://127.0.0.1:" in line, line


def test_status_without_a_reachable_ray_says_how_to_read_the_store_alone(capsys):
    from conftest import free_port

    assert cli_main(["status", "persona-run-0123456789abcdef-01234567", "--address",
                     f"http://127.0.0.1:{free_port()}"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "cannot reach the Ray Jobs API" in line and "--no-ray" in line


# ---------------------------------------------------------------------------- issue 25 items 1, 5: submit


def run_job_here(fake: FakeRayJobs, sid: str, gcs_address: str, tmp_path, timeout: float = 900) -> int:
    """Run a submitted job as Ray's job manager would: its working_dir package unpacked, its runtime
    env's variables set, its driver joining the session's Ray (RAY_ADDRESS). The environment passes
    through unchanged, so the driver uses the session's token-auth mode (RAY_AUTH_MODE) and token."""
    import io
    import os
    import zipfile

    job = fake.jobs[sid]
    env_ = job["runtime_env"] or {}
    cwd = tmp_path / f"job-{sid}"
    cwd.mkdir()
    working_dir = env_.get("working_dir")
    if working_dir:  # gcs://_ray_pkg_<hash>.zip, uploaded with PUT /api/packages/gcs/_ray_pkg_<hash>.zip
        (key,) = [k for k in fake.packages if k.endswith(working_dir.rsplit("/", 1)[1])]
        zipfile.ZipFile(io.BytesIO(fake.packages[key])).extractall(cwd)
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "persona_jobs"]
    environ = {**os.environ, **env_.get("env_vars", {}), "RAY_ADDRESS": gcs_address}
    fake.set_status(sid, "RUNNING")
    out = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=environ, capture_output=True, text=True,
                         timeout=timeout)
    fake.logs[sid] = out.stdout + out.stderr
    fake.set_status(sid, "SUCCEEDED" if out.returncode == 0 else "FAILED",
                    f"Job entrypoint command failed with exit code {out.returncode}" if out.returncode else "")
    return out.returncode


@pytest.mark.slow  # a whole tiny nightly run (calibrate, build masks, evaluate) in a driver process
def test_submit_nightly_runs_on_the_local_ray(ray_jobs, ray_cluster, tmp_path, capsys, monkeypatch):
    """`persona-jobs submit -- nightly --config ...` (what cluster/cronjob.yaml runs) crashed before
    contacting Ray (dataclasses.asdict on the pydantic nightly section). Now it submits, and the job
    it submitted runs to success on the session's Ray, and a second nightly submit is recognised."""
    import yaml

    from conftest import TINY_PIPELINE

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # `local` (a session run beside other clusters) is not for the SDK
    store = tmp_path / "shared-store"
    cfg = tmp_path / "nightly.yaml"
    cfg.write_text(yaml.safe_dump({**TINY_PIPELINE, "store": str(store),
                                   "nightly": {"name": "ci", "lease_ttl_s": 600, "renew_every_s": 30}}))
    code = cli_main(["submit", "--address", ray_jobs.url, "--no-working-dir", "--shared-store", "--",
                     "nightly", "--config", str(cfg)])
    assert code == 0, capsys.readouterr().err
    (sid,) = ray_jobs.jobs
    job = ray_jobs.jobs[sid]
    assert sid.startswith("persona-nightly-") and job["entrypoint"].endswith("nightly --config inputs/nightly.yaml")
    assert job["metadata"]["persona.run_id"].startswith("run-")
    gcs = ray_cluster.get_runtime_context().gcs_address
    assert run_job_here(ray_jobs, sid, gcs, tmp_path) == 0, ray_jobs.logs[sid][-3000:]
    rid = job["metadata"]["persona.run_id"]
    assert runs.read_latest(open_store(str(store)), "ci") == rid  # the run the submitter named is the one done
    capsys.readouterr()
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 0
    assert f"run {rid}: succeeded (nightly)" in capsys.readouterr().out
    # The same nightly again: the same work, already succeeded: not submitted twice.
    assert cli_main(["submit", "--address", ray_jobs.url, "--no-working-dir", "--shared-store", "--",
                     "nightly", "--config", str(cfg)]) == 0
    assert list(ray_jobs.jobs) == [sid] and "already submitted (SUCCEEDED)" in capsys.readouterr().out
    # Another schedule name is other work (the nightly section is part of the submission id).
    other = tmp_path / "other.yaml"
    other.write_text(cfg.read_text().replace("name: ci", "name: other"))
    sid2, new = submit.submit(["nightly", "--config", str(other)], address=ray_jobs.url, working_dir=False,
                              shared_store=True)
    assert new and sid2 != sid and sid2.startswith(f"persona-nightly-{rid.removeprefix('run-')}-")


def test_the_driver_asks_for_no_cpu_and_for_the_driver_resource_where_there_is_one(ray_jobs, tmp_path):
    """Ray's default for a driver is 0 CPUs (submit asked for 1: on a 2-CPU head, half the cluster);
    on a cluster whose head advertises `persona-driver` the driver asks for one of those."""
    command = ["calibrate", "--catalog", "builtin", "--store", "s3://b/s"]
    sid, _ = submit.submit(command, address=ray_jobs.url, working_dir=False)  # no /api/v0/nodes: assume nothing
    assert ray_jobs.jobs[sid]["entrypoint_num_cpus"] == 0 and ray_jobs.jobs[sid]["entrypoint_resources"] is None
    ray_jobs.nodes = [{"node_id": "h", "state": "ALIVE", "resources_total": {"CPU": 0.0, "persona-driver": 4.0}},
                      {"node_id": "w", "state": "ALIVE", "resources_total": {"CPU": 8.0, "GPU": 1.0}}]
    sid, _ = submit.submit([*command, "--store", "s3://b/2"], address=ray_jobs.url, working_dir=False)
    assert ray_jobs.jobs[sid]["entrypoint_num_cpus"] == 0
    assert ray_jobs.jobs[sid]["entrypoint_resources"] == {"persona-driver": 1}
    ray_jobs.nodes[0]["state"] = "DEAD"  # a dead head's resource does not count
    sid, _ = submit.submit([*command, "--store", "s3://b/3"], address=ray_jobs.url, working_dir=False)
    assert ray_jobs.jobs[sid]["entrypoint_resources"] is None
    # Asked explicitly: exactly that, nothing added.
    ray_jobs.nodes[0]["state"] = "ALIVE"
    code = cli_main(["submit", "--address", ray_jobs.url, "--no-working-dir", "--entrypoint-num-cpus", "2", "--",
                     *command, "--store", "s3://b/other"])
    assert code == 0
    (job,) = [j for j in ray_jobs.jobs.values() if j["metadata"]["persona.store"] == "s3://b/other"]
    assert job["entrypoint_num_cpus"] == 2 and job["entrypoint_resources"] is None


def test_submit_leaves_progress_on_and_takes_runtime_env_working_dir_and_submission_id(ray_jobs, tmp_path,
                                                                                      monkeypatch, capsys):
    """Progress is not forced off (PERSONA_PROGRESS=0 hid a 116 s evaluation behind one line); the
    flags of `ray job submit`: --runtime-env-json, --working-dir, --submission-id."""
    monkeypatch.delenv("PERSONA_PROGRESS", raising=False)
    command = ["calibrate", "--catalog", "builtin", "--store", "s3://b/s"]
    sid, _ = submit.submit(command, address=ray_jobs.url, working_dir=False)
    assert "PERSONA_PROGRESS" not in ray_jobs.jobs[sid]["runtime_env"]["env_vars"]

    folder = tmp_path / "code"
    folder.mkdir()
    cfg = run_config(folder, "s3://b/s")
    code = cli_main(["submit", "--address", ray_jobs.url, "--working-dir", str(folder), "--submission-id", "my-run-1",
                     "--runtime-env-json", json.dumps({"env_vars": {"A": "1"}, "pip": ["rich"]}), "--env", "B=2",
                     "--", "run", "--config", str(cfg)])
    assert code == 0, capsys.readouterr().err
    job = ray_jobs.jobs["my-run-1"]
    env = job["runtime_env"]
    assert env["env_vars"]["A"] == "1" and env["env_vars"]["B"] == "2" and env["pip"]["packages"] == ["rich"]
    assert env["working_dir"].startswith("gcs://") and job["entrypoint"].endswith("run --config p.yaml")
    assert job["metadata"]["persona.run_id"].startswith("run-")
    assert cli_main(["status", "my-run-1", "--address", ray_jobs.url]) == 3  # an id of one's own: Ray's PENDING
    assert "ray job my-run-1: PENDING" in capsys.readouterr().out
    # The same explicit id again: Ray has it (pending): reported, not submitted.
    assert cli_main(["submit", "--address", ray_jobs.url, "--working-dir", str(folder), "--submission-id",
                     "my-run-1", "--", "run", "--config", str(cfg)]) == 0
    assert "already submitted (PENDING)" in capsys.readouterr().out
    ray_jobs.set_status("my-run-1", "FAILED")
    assert cli_main(["submit", "--address", ray_jobs.url, "--working-dir", str(folder), "--submission-id",
                     "my-run-1", "--", "run", "--config", str(cfg)]) == 2
    assert "choose another" in error_lines(capsys.readouterr().err)[0]
    # A remote package is used as it is.
    sid, _ = submit.submit(["calibrate", "--catalog", "builtin", "--store", "s3://b/r"], address=ray_jobs.url,
                           working_dir="s3://bucket/pkg.zip")
    assert ray_jobs.jobs[sid]["runtime_env"]["working_dir"] == "s3://bucket/pkg.zip"
    # Bad input: one line, exit 2, nothing submitted.
    before = len(ray_jobs.jobs)
    for bad in (["--runtime-env-json", "[1]"], ["--runtime-env-json", "{"], ["--submission-id", "../x"],
                ["--submission-id", "run-0123"], ["--working-dir", str(tmp_path / "missing")],
                ["--working-dir", str(folder), "--no-working-dir"]):
        assert exit_code(["submit", "--address", ray_jobs.url, *bad, "--", "calibrate", "--catalog", "builtin",
                          "--store", "s3://b/bad"]) == 2, bad
        assert len(ray_jobs.jobs) == before, bad
        capsys.readouterr()


def exit_code(argv: list[str]) -> int:
    """cli_main's exit code, usage errors (argparse's SystemExit) included."""
    try:
        return cli_main(argv)
    except SystemExit as err:
        return int(err.code)


def test_stop_logs_and_list_mirror_ray_job(ray_jobs, capsys):
    command = ["calibrate", "--catalog", "builtin", "--store", "s3://b/s"]
    sid, _ = submit.submit(command, address=ray_jobs.url, working_dir=False)
    ray_jobs.set_status(sid, "FAILED")
    again, _ = submit.submit(command, address=ray_jobs.url, working_dir=False)
    assert again == f"{sid}-a2"
    ray_jobs.set_status(again, "RUNNING")
    ray_jobs.logs[again] = "calibration: 3/8 units\n"
    ray_jobs.jobs["other"] = {**ray_jobs.jobs[sid], "submission_id": "other", "metadata": {}}
    capsys.readouterr()

    assert cli_main(["list", "--address", ray_jobs.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in out] == [[sid, "FAILED", "calibrate"], [again, "RUNNING", "calibrate"]]
    assert cli_main(["list", "--address", ray_jobs.url, "--all", "--json"]) == 0
    assert {j["submission_id"] for j in json.loads(capsys.readouterr().out)} == {sid, again, "other"}

    assert cli_main(["logs", sid, "--address", ray_jobs.url]) == 0  # the first id: its newest attempt
    assert capsys.readouterr().out == "calibration: 3/8 units\n"
    assert cli_main(["stop", sid, "--address", ray_jobs.url]) == 0
    assert f"{again}: STOPPED" in capsys.readouterr().out and ray_jobs.jobs[again]["status"] == "STOPPED"
    assert cli_main(["stop", again, "--address", ray_jobs.url]) == 0
    assert "already ended (STOPPED)" in capsys.readouterr().out
    assert cli_main(["stop", "persona-run-0123456789abcdef", "--address", ray_jobs.url]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "Ray has no job" in line
    with pytest.raises(UserError, match="runs on this machine"):
        submit._submit_cmd(build_args(["submit", "--", "logs", sid]))


def build_args(argv: list[str]):
    from persona_jobs.cli import build_parser

    return build_parser().parse_args(argv)


# ---------------------------------------------------------------------------- issue 25 item 5: status


def test_status_of_a_failed_job_shows_the_real_error(ray_jobs, tmp_path, capsys):
    """Ray's message ("Job entrypoint command failed with exit code 1") says nothing; status shows the
    error from the job's log (its `error:` line, or the exception ending its traceback), and a failed
    manifest's error first."""
    store_dir = tmp_path / "store"
    cfg = run_config(tmp_path, str(store_dir))
    sid, _ = submit.submit(["run", "--config", str(cfg)], address=ray_jobs.url, working_dir=False, shared_store=True)
    rid = ray_jobs.jobs[sid]["metadata"]["persona.run_id"]
    ray_jobs.set_status(sid, "FAILED", "Job entrypoint command failed with exit code 1\nmore lines")
    ray_jobs.logs[sid] = ("loading model\nTraceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
                          "    raise KeyError('layers.3.mlp')\nKeyError: 'layers.3.mlp'\n")
    capsys.readouterr()
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 1
    out = capsys.readouterr().out
    assert "  error: KeyError: 'layers.3.mlp'" in out and "  ray: Job entrypoint command failed" in out
    # What Ray 2.60 logs when the entrypoint's python lacks the package (seen on a real local cluster).
    ray_jobs.logs[sid] = ("2026-12-05 06:02:00,170\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
                          f"Running entrypoint for job {sid}: python -m persona_jobs run --config p.yaml\n"
                          "/usr/bin/python: No module named persona_jobs\n"
                          "06:02:14 INFO persona_jobs.status: nothing\n"
                          "\x1b[36m(CalibrationWorkerActor pid=19476)\x1b[0m INFO:persona_core.models.loading:loaded\n")
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 1
    assert "  error: /usr/bin/python: No module named persona_jobs" in capsys.readouterr().out
    ray_jobs.logs[sid] += "error: cannot reach the store s3://b/s (endpoint http://x)\n"
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 1
    assert "  error: cannot reach the store s3://b/s" in capsys.readouterr().out
    runs.write_manifest(open_store(str(store_dir)), runs.Manifest(
        run_id=rid, kind="pipeline", status=runs.FAILED, inputs={}, error="evaluate: 2 units failed: OOM"))
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 1
    assert "  error: evaluate: 2 units failed: OOM" in capsys.readouterr().out
    assert cli_main(["status", sid, "--address", ray_jobs.url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["job"]["error"] == "cannot reach the store s3://b/s (endpoint http://x)"
    ray_jobs.set_status(sid, "STOPPED", "Job was intentionally stopped.")  # stopped: Ray's word is the reason
    assert cli_main(["status", sid, "--address", ray_jobs.url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["job"]["error"] is None


def test_status_of_a_running_job_shows_live_unit_counts(ray_jobs, tmp_path, capsys):
    store_dir = tmp_path / "store"
    cfg = run_config(tmp_path, str(store_dir))
    sid, _ = submit.submit(["run", "--config", str(cfg)], address=ray_jobs.url, working_dir=False, shared_store=True)
    rid = ray_jobs.jobs[sid]["metadata"]["persona.run_id"]
    ray_jobs.set_status(sid, "RUNNING")
    runs.mark_stage(open_store(str(store_dir)), rid, "calibrate",
                    runs.Summary("calibrate", done=12, skipped=2).finish().to_dict())
    ray_jobs.logs[sid] = ("calibrate: 12 done, 2 skipped, 0 failed\n"
                          "masks:  40%|####      | 4/10 [00:04<00:06]\rmasks:  60%|######    | 6/10 [00:06<00:04]\n")
    capsys.readouterr()
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 3
    out = capsys.readouterr().out
    assert "  progress: masks:  60%|######    | 6/10" in out
    assert "  stages finished: calibrate" in out and "calibrate  12 done, 2 skipped, 0 failed" in out
    assert f"run {rid}: incomplete" in out
    ray_jobs.logs[sid] += "evaluation: 3/8 units, 12 s elapsed, ETA 20 s\n"  # the lines off a terminal
    assert cli_main(["status", sid, "--address", ray_jobs.url]) == 3
    assert "  progress: evaluation: 3/8 units, 12 s elapsed, ETA 20 s" in capsys.readouterr().out


def test_status_rejects_bad_ids_and_manifests_that_are_not_objects(tmp_path, capsys):
    """Issue 24 item 11: an invalid id was a LayoutError traceback (exit 1); a manifest that is valid
    JSON but not an object crashed `status` and `status <id>`."""
    store = tmp_path / "st"
    for bad in ("../x", "run-../../etc", "a/b", "", "x" * 200, "run-ü", "a b"):
        assert cli_main(["status", bad, "--store", str(store)]) == 2, bad
        (line,) = error_lines(capsys.readouterr().err)
        assert "not a run id" in line, line
    rid = "run-0123456789abcdef"
    folder = store / "runs" / rid
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("[1, 2]")
    assert cli_main(["status", rid, "--store", str(store)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "manifest.json: not a run manifest" in line
    assert cli_main(["status", "--store", str(store)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out.startswith("no runs in")
    good = open_store(str(store))
    runs.write_manifest(good, runs.Manifest(run_id="run-00000000000000aa", kind="pipeline", status=runs.SUCCEEDED,
                                            inputs={}, started=1.0, finished=2.0))
    assert cli_main(["status", "--store", str(store)]) == 0
    assert capsys.readouterr().out.split()[:3] == ["run-00000000000000aa", "pipeline", "succeeded"]
