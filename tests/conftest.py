"""Shared fixtures: one local Ray cluster and one S3 server (moto) per test session.

Every test that uses the Ray cluster (directly or through a fixture built on it) is marked
``ray`` at collection, so ``pytest -m "not ray and not slow"`` is the fast inner loop (`make
check`); a test that starts Ray some other way without the mark fails, naming itself. With
pytest-xdist (`-n 2 --dist loadgroup`, `make test`) every ``ray`` test runs on one worker, so
the session starts one Ray cluster, not one per worker.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("PERSONA_PROGRESS", "0")
os.environ.setdefault("PERSONA_LOG_TO_DRIVER", "0")  # actors' output stays in the worker logs (users get it: on by default)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests run on Ray clusters of their own: a RAY_ADDRESS of the shell would send the CLI processes they
# start to another cluster. Tests that need an address set it (tests/test_multinode.py, tests/test_submit.py).
os.environ.pop("RAY_ADDRESS", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core (-n 2): one torch (OpenMP) thread each, for them and the CLI
    # processes they start; two workers of two threads each on two cores spin-wait on each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

SHARED_PERSONAS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "anthropic-persona")
SHARED_WIKITEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2")
# Where WikiText-2 is absent (a clone outside the workspace), `wikitext-2-valid` / `-test` resolve to the
# project's own stand-in texts (tests/data/wikitext-stand-in), so the learner and budget tests still run;
# figures measured on them are not WikiText-2 figures, and no test reports them as such.
if not os.path.isdir(SHARED_WIKITEXT):
    os.environ.setdefault("PERSONA_WIKITEXT2", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                           "data", "wikitext-stand-in"))


RAY_FIXTURES = {"ray_cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def _ray_needs_the_marker(request):
    """A test that starts Ray without the `ray` marker would slip into the fast loop: refuse it."""
    import sys

    was = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if not was and request.node.get_closest_marker("ray") is None and "ray" in sys.modules \
            and sys.modules["ray"].is_initialized():
        pytest.fail(f"{request.node.nodeid} started Ray without the ray_cluster fixture (or a ray marker)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# While this folder exists, every evaluation unit on the session's Ray cluster first writes a marker
# (node.pid.ns) into it and waits (60 s at most) until the folder is removed (persona_jobs.dispatch.HOLD_ENV).
EVAL_HOLD = Path(tempfile.gettempdir()) / f"persona-test-eval-hold-{os.getpid()}"


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the whole session (2 CPUs, small object store)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from persona_jobs.dispatch import HOLD_ENV  # inert until EVAL_HOLD exists (a test creates it)

        # "local": a new cluster even where RAY_ADDRESS or Ray's current-cluster file (ray start) names one
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
                 log_to_driver=False, runtime_env={"env_vars": {"PERSONA_PROGRESS": "0",
                                                                HOLD_ENV: f"evaluation:{EVAL_HOLD}:60"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server (moto) on 127.0.0.1; returns its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_url(s3_endpoint):
    """A fresh, empty bucket on the moto server, as an s3:// store URL."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/store"


@pytest.fixture(scope="session")
def tiny():
    """tiny-random-llama, loaded once per session (treat as read-only)."""
    from persona_core.models.loading import load_model

    return load_model("tiny-random-llama", device="cpu")


@pytest.fixture(scope="session")
def builtin_catalog():
    from persona_core.catalog import load_catalog

    return load_catalog("builtin")


# ---------------------------------------------------------------------------- a calibrated pair (learners, budgets, masks)


def river_text(words: int) -> str:
    """General text for validation perplexity in tests: `words` numbered phrases."""
    return " ".join(f"the {w} of a river is long and the sea" for w in range(words))


@pytest.fixture(scope="session")
def pair_calibration(tiny, builtin_catalog):
    """(CalibConfig(max_length=64), {persona id: PersonaStats}): real statistics of introvert, extrovert
    and the general reference persona on tiny-random-llama, computed once per session (treat as read-only)."""
    from persona_core.calib.config import CalibConfig
    from persona_core.calib.recorder import calibrate_persona
    from persona_core.catalog import reference_persona

    cc = CalibConfig(max_length=64)
    people = (builtin_catalog["introvert"], builtin_catalog["extrovert"], reference_persona())
    return cc, {p.id: calibrate_persona(tiny, p, cc)[0] for p in people}


@pytest.fixture
def calibrated_store(tmp_path, pair_calibration):
    """A local store (tmp_path / "store") holding `pair_calibration`'s statistics, as `calibrate` writes them."""
    from persona_core.calib.parts import write_stats
    from persona_core.store.store import open_store

    cc, stats = pair_calibration
    store = open_store(str(tmp_path / "store"))
    for s in stats.values():
        write_stats(store, s, calib_config=cc.to_dict())
    return store


@pytest.fixture
def budget_text(tmp_path):
    """A validation text file for a budget's ``ppl_text`` (tmp_path / "valid.txt")."""
    text = tmp_path / "valid.txt"
    text.write_text(river_text(300))
    return text


@pytest.fixture(scope="module")
def pair_setup(tmp_path_factory, builtin_catalog, pair_calibration):
    """(evaluator, weights, introvert, extrovert, stats, calib config, folder), a test module's own:
    tiny-random-llama in an Evaluator (its own model: masks may be applied), a copy of its linear
    weights (never the live ones), `pair_calibration`'s statistics, and a WikiText-2 stand-in folder
    (valid.txt, test.txt) that the module may rewrite; point $PERSONA_WIKITEXT2 at it to read it."""
    from persona_core.eval.engine import Evaluator
    from persona_core.masks.inputs import LinearWeights
    from persona_core.models.loading import load_model

    loaded = load_model("tiny-random-llama", device="cpu")
    lw = LinearWeights.from_model(loaded)
    lw = LinearWeights(lw.groups, {k: v.clone() for k, v in lw.tensors.items()})
    cc, stats = pair_calibration
    folder = tmp_path_factory.mktemp("wikitext")
    (folder / "valid.txt").write_text(river_text(400))
    (folder / "test.txt").write_text("completely different test text " * 200)
    return (Evaluator(loaded), lw, builtin_catalog["introvert"], builtin_catalog["extrovert"], dict(stats), cc,
            folder)


@pytest.fixture
def shared_personas():
    if not os.path.isdir(SHARED_PERSONAS):
        pytest.skip("../shared/data/anthropic-persona is absent")
    return os.path.abspath(SHARED_PERSONAS)


# ---------------------------------------------------------------------------- operations (issue 6)

TINY_PIPELINE = {
    "catalog": "builtin",
    "model": "tiny-random-llama",
    "personas": ["introvert"],  # its opposite comes along
    "calibrate": {"shard_size": 16, "include_general": True, "options": {"max_length": 64}},
    "masks": {"methods": ["contrastive-wanda"], "sparsities": [0.5]},
    "evaluate": {"conditions": ["dense", "masked"],
                 "options": {"metrics": ["statement-preference"], "max_statements": 4, "actors": 1}},
}


def tiny_pipeline_config(store: str, **changes):
    """A PipelineConfig for tiny-random-llama on 2 personas (+ general), with `changes` on top."""
    import copy

    from persona_core.run.config import NightlyConfig, from_dict

    raw = copy.deepcopy(TINY_PIPELINE) | {"store": store}
    for dotted, value in changes.items():
        cur = raw
        *head, last = dotted.split("__")
        for h in head:
            cur = cur.setdefault(h, {})
        cur[last] = value
    return from_dict(NightlyConfig, raw)


@pytest.fixture(scope="session")
def pipeline_store(ray_cluster, tmp_path_factory):
    """One finished tiny pipeline run in a local store (copy it before changing anything)."""
    from persona_core.run.plan import make_plan
    from persona_jobs import pipeline

    root = tmp_path_factory.mktemp("pipeline") / "store"
    plan = make_plan(tiny_pipeline_config(str(root)))
    out = pipeline.execute(plan)
    assert out.ok, out.manifest.error
    return root, plan.run_id


@pytest.fixture
def stored(pipeline_store, tmp_path):
    """(root, run id): a copy of `pipeline_store` at tmp_path / "store", free to change."""
    import shutil

    root = tmp_path / "store"
    shutil.copytree(pipeline_store[0], root)
    return root, pipeline_store[1]


OLD_STORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "store-v1")


@pytest.fixture
def old_store(tmp_path):
    """A copy of tests/data/store-v1 (a tiny pipeline run as an earlier release stored it) at
    tmp_path / "store", free to change."""
    import shutil

    dst = tmp_path / "store"
    shutil.copytree(OLD_STORE, dst)
    return dst
