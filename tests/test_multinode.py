"""A two-node Ray cluster, an S3 store, a worker node killed mid-evaluation (issue 25).

The test session already holds one local Ray cluster (`ray_cluster`), and a second cannot live
in the same process, so the scenario runs in a subprocess: this file run as a script builds a
`ray.cluster_utils.Cluster` (a 1-CPU head and a 2-CPU worker node), runs `persona-jobs` against
its address the way `ray job submit` would (a driver holding no CPU), and reports what happened
as one JSON line on stdout:

1. a local store on that cluster is refused up front (issue 25 item 6);
2. a clean `persona-jobs run` on both nodes;
3. the same run into another store prefix, with each evaluation unit held (`dispatch.HOLD_ENV`)
   until a unit is held on the worker node; that node is then removed and the holds released.
   The driver names the node loss, puts the units back in the queue and finishes on the head.

The test then checks that both runs succeeded with identical results.

Isolation from the rest of the session (and the machine). `Cluster` records its head as the
machine's "current" Ray cluster (`ray_current_cluster` in Ray's default temp dir, read by every
`ray.init()` / `ray.init("auto")` that has no RAY_ADDRESS) and deletes that file on shutdown
(`ray/cluster_utils.py`: `write_ray_address` / `reset_ray_address`, both on the default temp dir,
`ray/_common/utils.py`: `get_default_ray_temp_dir` = `$RAY_TMPDIR/ray`). So the subprocess gets a
private RAY_TMPDIR (and the same folder as the nodes' `temp_dir`): the file, the sessions, logs and
sockets all live there, /tmp/ray is neither written nor cleared. RAY_ADDRESS is removed from its
environment; its CLI processes get the cluster's GCS address explicitly. After the subprocess, every
process still running from that folder is killed (on failure and timeout too) and the test checks
that none is left.

A Ray system process that crashes under load (a raylet SIGSEGV was seen once with 8 sessions on 2
cores) fails the attempt; the scenario is then run once more, with the crash named in a warning, and
a second crash fails the test naming both. A failure without a crash is never retried.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

HOLD_S = 120.0  # the longest an evaluation unit of the killed run waits (released once the worker node is gone)
PERSONAS = ["introvert", "optimist"]  # with their opposites: two pairs, two evaluation tasks (one per pair), more than the head node's one actor takes at once
ATTEMPTS = 2  # a second attempt only after a crash of a Ray system process (see the module's docstring)
ATTEMPT_TIMEOUT_S = 480  # one scenario: ~100 s on 2 idle cores
RAY_SYSTEM_LOGS = re.compile(r"^(raylet|gcs_server|log_monitor|dashboard_agent|runtime_env_agent)[.\w-]*\.(out|err|log)$")
CRASH_LINE = re.compile(r"\*\*\* (SIG[A-Z]+) received|Segmentation fault|Check failed:|SIGSEGV|SIGABRT")


def _config(store: str) -> dict:
    return {
        "catalog": "builtin",
        "model": "tiny-random-llama",
        "personas": PERSONAS,
        "store": store,
        "calibrate": {"shard_size": 16, "include_general": True, "options": {"max_length": 32}},
        "masks": {"methods": ["contrastive-wanda"], "sparsities": [0.5], "baselines": []},
        "evaluate": {"conditions": ["masked"], "options": {"metrics": ["statement-preference"], "max_statements": 4}},
        "resources": {"schedule_timeout_s": 120},
    }


def _cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "persona_jobs", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=log.parent)


def _rows(store: str, run_id: str) -> list[tuple]:
    """The run's results, sorted, without what may differ between two runs of the same inputs."""
    from persona_core.report.results import load_results

    table = load_results(store, run_id)
    volatile = {c for c in table.column_names if c in ("worker", "seconds", "created", "written", "finished")}
    keep = [c for c in table.column_names if c not in volatile]
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in table.select(keep).to_pylist())


def _dead(cluster, removed) -> list[str]:
    """The cluster's Ray system processes that died on their own (a removed node's were killed)."""
    nodes = [n for n in [cluster.head_node, *cluster.worker_nodes] if n is not None and n is not removed]
    return [f"{'head' if n is cluster.head_node else 'worker'} {kind} exited {proc.returncode}"
            + (f" ({signal.Signals(-proc.returncode).name})" if proc.returncode < 0 else "")
            for n in nodes for kind, proc in n.dead_processes()]


def scenario(bucket_url: str, work: Path, machine_current: Path) -> dict:
    """The whole scenario (in its own process, with a private RAY_TMPDIR); returns what the test checks."""
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    from persona_core.run.config import NightlyConfig, from_dict
    from persona_core.run.plan import make_plan
    from persona_jobs.dispatch import HOLD_ENV

    if not os.environ.get("RAY_TMPDIR") or os.environ.get("RAY_ADDRESS"):
        raise SystemExit("run with a private RAY_TMPDIR and no RAY_ADDRESS (the test does)")
    temp_dir = get_default_ray_temp_dir()  # $RAY_TMPDIR/ray: where Cluster writes ray_current_cluster
    hold = work / "hold"
    # the nodes' workers inherit it; inert until `hold` exists: then a unit started on either node waits until
    # one is held on the worker node (so the kill always lands mid-unit, however slowly the actors start)
    os.environ[HOLD_ENV] = f"evaluation:{hold}:{HOLD_S}"
    os.environ["PERSONA_PROGRESS"] = "0"
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 200 * 1024 * 1024, "temp_dir": temp_dir,
        # the GCS declares a node dead within seconds (defaults: tens of seconds)
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 2}})
    out: dict = {"address": cluster.address, "temp_dir": temp_dir}
    worker = removed = None
    try:
        current = Path(temp_dir, "ray_current_cluster")
        out["current_cluster_file"] = current.read_text().strip() if current.exists() else None
        out["machine_current_cluster"] = machine_current.read_text().strip() if machine_current.exists() else None
        worker = cluster.add_node(num_cpus=2, object_store_memory=200 * 1024 * 1024, temp_dir=temp_dir)
        cluster.wait_for_nodes()
        out.update(cluster_s=round(time.monotonic() - t0, 1), nodes=2)
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "PERSONA_PROGRESS": "1",
               "PERSONA_PROGRESS_EVERY_S": "1", "PERSONA_LOG_TO_DRIVER": "1"}

        # 1. a local store is refused on a two-node cluster, in seconds, with one line
        t = time.monotonic()
        p = _cli(["calibrate", "--store", "local-store", "--model", "tiny-random-llama", "--catalog", "builtin",
                  "--personas", "introvert"], env, work / "local.log")
        out["local_store"] = {"rc": p.wait(timeout=300), "log": (work / "local.log").read_text()[-2000:],
                              "s": round(time.monotonic() - t, 1)}

        runs = out["runs"] = {}
        for name in ("clean", "killed"):
            store = f"{bucket_url}/{name}"
            cfg = work / f"{name}.yaml"
            cfg.write_text(json.dumps(_config(store)))
            if name == "killed":
                hold.mkdir()
            t = time.monotonic()
            p = _cli(["run", "--config", str(cfg)], env, work / f"{name}.log")
            killed_at = None
            while p.poll() is None:
                if name == "killed" and killed_at is None and any(
                        m.name.startswith(worker.node_id) for m in hold.iterdir()):
                    cluster.remove_node(worker, allow_graceful=False)  # mid-unit: a unit is held there now
                    removed, killed_at = worker, round(time.monotonic() - t, 1)
                    shutil.rmtree(hold)  # the head's units go on
                time.sleep(0.2)
            plan = make_plan(from_dict(NightlyConfig, _config(store)))
            runs[name] = {"rc": p.returncode, "s": round(time.monotonic() - t, 1), "killed_at": killed_at,
                          "log": (work / f"{name}.log").read_text(), "run_id": plan.run_id,
                          "rows": _rows(store, plan.run_id) if p.returncode == 0 else None}
    finally:
        out["dead"] = _dead(cluster, removed)
        cluster.shutdown()
    out["total_s"] = round(time.monotonic() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------ the test side


def _ray_processes(ray_tmp: Path) -> list:
    """The processes of this test's Ray cluster: every one names the private temp dir in its command line."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(ray_tmp) in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _kill_cluster(ray_tmp: Path) -> int:
    """Kill what is left of this test's cluster (by pid); the number of processes that were left."""
    import psutil

    left = _ray_processes(ray_tmp)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=30)
    return len(left)


def _crashes(ray_tmp: Path) -> list[str]:
    """Crash lines in the logs of the cluster's Ray system processes (raylet, GCS, agents), named by file."""
    found = []
    for log in sorted(ray_tmp.glob("ray/session_*/logs/*")):
        if log.is_file() and RAY_SYSTEM_LOGS.match(log.name):
            for line in log.read_text(errors="replace").splitlines():
                if CRASH_LINE.search(line):
                    found.append(f"{log.name}: {line.strip()[:300]}")
                    break
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _attempt(s3_url: str, work: Path, ray_tmp: Path, machine: Path) -> tuple[dict | None, str, list[str]]:
    """One run of the scenario in a subprocess; (its report or None, why there is none, crashes seen)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    proc = subprocess.Popen([sys.executable, __file__, "--bucket-url", s3_url, "--work", str(work),
                             "--machine-current-cluster", str(machine)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=ATTEMPT_TIMEOUT_S)
        problem = "" if proc.returncode == 0 else f"the scenario exited {proc.returncode}: {stderr[-3000:]}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        problem = f"the scenario ran past {ATTEMPT_TIMEOUT_S} s: {stderr[-3000:]}"
    finally:
        if proc.poll() is None:  # the test itself failed or was interrupted: the scenario goes too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = json.loads(stdout.strip().splitlines()[-1]) if not problem else None
    crashes = _crashes(ray_tmp) + (out["dead"] if out else [])
    if proc.returncode is not None and proc.returncode < 0:
        crashes.append(f"the scenario process died of {signal.Signals(-proc.returncode).name}")
    return out, problem, crashes


def _problems(out: dict) -> list[str]:
    """What is wrong with a scenario's report (empty: the test passes)."""
    found = []
    local = out["local_store"]
    if local["rc"] != 2 or "the Ray cluster has 2 nodes alive and a relative folder" not in local["log"]:
        found.append(f"a local store on 2 nodes was not refused: {local}")
    clean, killed = out["runs"]["clean"], out["runs"]["killed"]
    log = killed["log"]
    for ok, what in [
        (clean["rc"] == 0, f"the clean run failed: {clean['log'][-4000:]}"),
        (killed["killed_at"] is not None, "no evaluation unit was ever held on the worker node"),
        (killed["rc"] == 0, f"the killed run failed: {log[-4000:]}"),
        ("lost: its evaluation actor(s) died with it" in log, f"the node loss is not named: {log[-4000:]}"),
        ("failed to start" not in log, f"actors that had started reported as never started: {log[-4000:]}"),
        ("units, " in log and "ETA" in clean["log"] + log, "no progress lines in a log that is no terminal"),
        (bool(clean["rows"]) and killed["rows"] == clean["rows"], "the killed run's results differ from the clean run's"),
    ]:
        if not ok:
            found.append(what)
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_node_killed_mid_evaluation_changes_no_result(s3_url, tmp_path):
    from ray._common.utils import get_ray_address_file

    machine = Path(get_ray_address_file(None))  # this machine's "current Ray cluster" (/tmp/ray/ray_current_cluster)
    machine_before = _read(machine)
    t0 = time.monotonic()
    seen: list[str] = []
    for attempt in range(1, ATTEMPTS + 1):
        work = tmp_path / f"attempt-{attempt}"
        work.mkdir()
        # AF_UNIX socket paths are limited to 107 bytes and Ray's are <temp_dir>/session_<date>_<pid>/sockets/
        # plasma_store (~70 bytes after temp_dir): tmp_path is too long, so a short private folder in /tmp
        ray_tmp = Path(tempfile.mkdtemp(prefix="persona-mn-", dir="/tmp" if os.path.isdir("/tmp") else None))
        try:
            out, problem, crashes = _attempt(s3_url, work, ray_tmp, machine)
            left = _kill_cluster(ray_tmp)
            assert not _ray_processes(ray_tmp), f"processes of the test's Ray cluster outlived it: {_ray_processes(ray_tmp)}"
            problems = [problem] if problem else _problems(out)
            if problems or crashes:
                shutil.copytree(ray_tmp / "ray", work / "ray-logs", ignore=shutil.ignore_patterns("sockets", "*.sock"),
                                dirs_exist_ok=True, ignore_dangling_symlinks=True)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        if problems and crashes and attempt < ATTEMPTS:
            seen.append(f"attempt {attempt}: {'; '.join(crashes)}")
            warnings.warn(f"multi-node scenario: a Ray system process crashed ({'; '.join(crashes)}); "
                          f"running it again (logs in {work / 'ray-logs'})", stacklevel=1)
            continue
        break
    crashed = "; ".join(seen + ([f"attempt {attempt}: {'; '.join(crashes)}"] if crashes else []))
    assert not problems, "\n".join(problems) + (f"\nRay system process crash(es): {crashed}" if crashed else "") \
        + f"\n(logs in {work})"

    # isolated: the cluster recorded itself in its own temp dir, never in the machine's /tmp/ray
    assert out["current_cluster_file"] == out["address"] and out["temp_dir"].startswith(str(ray_tmp)), out
    assert out["machine_current_cluster"] != out["address"], f"{machine} named the test's cluster while it ran"
    assert _read(machine) == machine_before, f"{machine} changed: {machine_before!r} -> {_read(machine)!r}"
    wall = time.monotonic() - t0
    killed_log = "\n".join(line for line in out["runs"]["killed"]["log"].splitlines() if "lost" in line or "back in" in line)
    print(f"\n{killed_log}\nmulti-node scenario: {wall:.0f} s wall, {attempt} attempt(s), {left} process(es) "
          f"left by shutdown ({json.dumps({k: v for k, v in out.items() if k not in ('runs', 'local_store')})}; "
          f"local store refused in {out['local_store']['s']} s, clean run {out['runs']['clean']['s']} s, "
          f"killed run {out['runs']['killed']['s']} s)")


def test_the_hold_hook_ends_when_its_folder_goes(tmp_path, monkeypatch):
    """The scenario's kill needs it: a held unit waits until the folder is removed, not its whole bound."""
    import threading

    import ray

    from persona_jobs import dispatch

    class Context:
        def get_node_id(self):
            return "node-a"

    monkeypatch.setattr(ray, "get_runtime_context", Context)
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv(dispatch.HOLD_ENV, f"evaluation:{hold}:60")
    dispatch._hold("calibration")  # another pool: no pause, no marker
    assert not list(hold.iterdir())
    threading.Timer(0.5, shutil.rmtree, (hold,)).start()
    t = time.monotonic()
    dispatch._hold("evaluation")
    assert time.monotonic() - t < 10  # 60 s without the release
    monkeypatch.setenv(dispatch.HOLD_ENV, f"evaluation:{tmp_path}:0.3")
    t = time.monotonic()
    dispatch._hold("evaluation")  # the folder stays: the whole pause, and a marker named after the node
    assert time.monotonic() - t >= 0.3 and [m.name.split(".")[0] for m in tmp_path.iterdir() if m.is_file()] == ["node-a"]


def test_a_ray_system_process_crash_is_found_and_named(tmp_path):
    """What decides the one rerun: a crash line in a raylet/GCS log, named by file; workers' logs do not count."""
    logs = tmp_path / "ray" / "session_2026-12-05_08-00-00_000000_1" / "logs"
    logs.mkdir(parents=True)
    (logs / "raylet.out").write_text("[info] started\n")
    (logs / "worker-abc-01000000-123.err").write_text("*** SIGSEGV received at time=1 (a worker: not ours to retry)\n")
    assert _crashes(tmp_path) == []
    (logs / "raylet.1.err").write_text("ok\n*** SIGSEGV received at time=1764921600 on cpu 1 ***\nPC: @ 0x55\n")
    (logs / "gcs_server.err").write_text("check_failed.cc:12 Check failed: node != nullptr\n")
    assert _crashes(tmp_path) == ["gcs_server.err: check_failed.cc:12 Check failed: node != nullptr",
                                  "raylet.1.err: *** SIGSEGV received at time=1764921600 on cpu 1 ***"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket-url", required=True, help="s3://bucket (the moto server's, AWS_* set)")
    parser.add_argument("--work", required=True, type=Path, help="a scratch folder")
    parser.add_argument("--machine-current-cluster", required=True, type=Path,
                        help="the test process's ray_current_cluster file (reported while the cluster is up)")
    args = parser.parse_args()
    print(json.dumps(scenario(args.bucket_url.rstrip("/"), args.work, args.machine_current_cluster)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages, as in pytest
    main()
