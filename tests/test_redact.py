"""Credentials never reach a message (issue 12 item 16): store URLs, endpoints, AWS SDK debug lines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from persona_core.store.redact import redact
from persona_core.store.store import StoreError, open_store

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"


@pytest.mark.parametrize("text, gone", [
    (f"s3://AKIDEXAMPLE:{SECRET}@bucket/store", SECRET),
    ("http://minio:s3cr3t-pass@127.0.0.1:9000/", "s3cr3t-pass"),
    ("https://tok3n-abcdef@host/x", "tok3n-abcdef"),
    ("s3://bucket/p?aws_secret_access_key=abcd1234&x=1", "abcd1234"),
    ("{'aws_secret_access_key': 'zzzz9999', 'tokens': 5}", "zzzz9999"),
    ("Authorization: AWS4-HMAC-SHA256 Credential=AKID/2026/us-east-1/s3, Signature=deadbeef", "deadbeef"),
    ("X-Amz-Signature=cafebabe1234", "cafebabe1234"),
])
def test_redact_removes_credentials(text, gone):
    out = redact(text)
    assert gone not in out and "***" in out


@pytest.mark.parametrize("text", [
    "s3://bucket/store/masks/model=m/method=wanda@2of4/sparsity=0.5/a.safetensors",
    "calibrate: 9 done, 9074 tokens, 517 tokens/s", "file:///tmp/a@b", "key stats/model=x/persona=y",
])
def test_redact_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def test_secret_env_values_are_redacted_verbatim(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert redact(f"signing with {SECRET} failed") == "signing with *** failed"


def test_store_uri_and_repr_hide_credentials():
    store = open_store(f"s3://AKIDEXAMPLE:{SECRET}@bucket/store", key="AKIDEXAMPLE", secret=SECRET)
    assert SECRET not in repr(store)
    with pytest.raises(StoreError) as err:  # refused at first use (issue 24 item 2), the key never echoed
        store.uri("runs/x")
    assert SECRET not in str(err.value) and "AKIDEXAMPLE" not in str(err.value)


def _cli(args, env):
    full = {**os.environ, "PERSONA_PROGRESS": "0", **env}
    return subprocess.run([sys.executable, "-m", "persona_jobs", *args], capture_output=True, text=True,
                          timeout=180, env=full)


def test_verbose_does_not_print_aws_sdk_debug_lines_or_secrets(s3_url, s3_endpoint):
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE12345", "AWS_ENDPOINT_URL": s3_endpoint}
    done = _cli(["-v", "stats", "list", "--store", s3_url], env)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in done.stderr.splitlines():
        assert not any(f" {name}" in line and ("DEBUG" in line or "INFO" in line)
                       for name in ("aiobotocore", "botocore", "boto3", "s3fs", "urllib3", "aiohttp")), line
    assert SECRET not in done.stdout + done.stderr and "AKIDEXAMPLE12345" not in done.stderr


def test_credentials_in_endpoint_and_store_url_never_echoed(tmp_path):
    with __import__("socket").socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://minio:{SECRET}@127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    for store in ("s3://bucket/store", f"s3://AKIDEXAMPLE:{SECRET}@bucket/store"):
        done = _cli(["-v", "stats", "list", "--store", store], env)
        assert done.returncode != 0
        assert SECRET not in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
        assert "error" in done.stderr.lower()


def test_everything_the_cli_prints_is_redacted(monkeypatch, capsys):
    """Results, errors and unexpected tracebacks: whatever a job prints passes through redact()."""
    from persona_jobs import stats as stats_job
    from persona_jobs.cli import main as cli_main

    url = f"s3://AKIDEXAMPLE:{SECRET}@bucket/store"

    def leaky(args):
        print(f"reading {url}")
        raise RuntimeError(f"failed at {url}/stats")

    monkeypatch.setattr(stats_job, "_list", leaky)
    assert cli_main(["stats", "list", "--store", "x"]) == 1
    out, err = capsys.readouterr()
    assert "reading s3://***@bucket/store" in out and "RuntimeError: failed at s3://***@bucket" in err
    assert SECRET not in out + err
    import sys
    assert type(sys.stdout).__name__ != "RedactingStream"  # restored after the command
