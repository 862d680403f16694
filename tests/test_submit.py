"""submit / status against Ray's own JobSubmissionClient talking HTTP to a Jobs API on 127.0.0.1
(issue 12 items 7, 8, 9, 11): submission ids that name the work, an explicit resubmit, stores the
cluster can see, Ray's state winning over an older manifest, and one-line errors for addresses
that are not Ray and for temporary failures."""

from __future__ import annotations

import json
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
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if fake.fail_submit:
                    return self._send(fake.fail_submit, b"Service Unavailable: the head is restarting")
                sid = body["submission_id"]
                if sid in fake.jobs:
                    return self._send(400, f"Job with submission_id {sid} already exists.".encode())
                fake.jobs[sid] = {"type": "SUBMISSION", "job_id": None, "submission_id": sid, "status": "PENDING",
                                  "entrypoint": body["entrypoint"], "message": "Job is pending.",
                                  "metadata": body.get("metadata") or {}, "runtime_env": body.get("runtime_env"),
                                  "start_time": int(time.time() * 1000) + len(fake.jobs)}
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
    assert f"ray job {sid}: FAILED (Job entrypoint command failed" in out
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
