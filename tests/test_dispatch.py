"""The shared dispatcher on a local Ray cluster whose CPUs are partly (or wholly) taken (issue 12 item 6)."""

from __future__ import annotations

import argparse
import os
import time

import pytest

from persona_jobs import dispatch


def _doubler():
    """A trivial worker: what a calibration or evaluation actor is, minus the model. Defined in a
    function so Ray ships it by value (workers cannot import this test module by name)."""

    class Doubler:
        def __init__(self, die_on: int | None = None, marker: str | None = None):
            self.die_on, self.marker = die_on, marker

        def run(self, unit: int) -> int:
            if unit == self.die_on and self.marker and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)  # the actor process dies mid-unit
            if unit < 0:
                raise ValueError(f"bad unit {unit}")
            return 2 * unit

    return Doubler


Doubler = _doubler()


@pytest.fixture
def taken(ray_cluster):
    """Hold CPUs of the 2-CPU test cluster, as another job (or a submit driver) would."""
    held = []

    def take(cpus: int):
        @ray_cluster.remote(num_cpus=cpus)
        class Blocker:
            def ping(self):
                return True

        b = Blocker.remote()
        ray_cluster.get(b.ping.remote())
        held.append(b)

    yield take
    for b in held:
        ray_cluster.kill(b)
    deadline = time.monotonic() + 30
    while ray_cluster.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)


def test_pool_of_two_on_a_half_taken_cluster_finishes_on_the_live_actor(taken):
    """The submit hang: two actors asked for, one CPU free. The unschedulable actor takes no unit."""
    taken(1)
    spec = dispatch.PoolSpec("test", Doubler, resources={"num_cpus": 1})
    out = dispatch.run_pool(spec, range(6), "run", num_actors=2, schedule_timeout_s=60)
    assert sorted(r for _, r in out.results) == [0, 2, 4, 6, 8, 10]
    assert out.failed == [] and out.actors_started == 1


def test_pool_size_follows_free_resources(taken):
    assert dispatch.pool_size(None, {"num_cpus": 1}, units=10) == 2
    taken(1)
    assert dispatch.pool_size(None, {"num_cpus": 1}, units=10) == 1
    assert dispatch.pool_size(None, {"num_cpus": 1}, units=10, cap=1) == 1
    assert dispatch.pool_size(3, {"num_cpus": 1}, units=2) == 2  # never more actors than units
    taken(1)
    assert dispatch.pool_size(None, {"num_cpus": 1}, units=10) == 1  # nothing free: one, which will wait


def test_no_schedulable_actor_fails_clearly_within_the_bound(taken):
    taken(2)
    spec = dispatch.PoolSpec("calibration", Doubler, resources={"num_cpus": 1})
    t0 = time.monotonic()
    with pytest.raises(dispatch.SchedulingTimeout, match=r"no calibration actor could be scheduled within 3 s: "
                                                         r"each asks for CPU=1 .*has CPU=0 free of CPU=2") as err:
        dispatch.run_pool(spec, range(3), "run", num_actors=1, schedule_timeout_s=3)
    assert time.monotonic() - t0 < 30
    assert err.value.exit_code == 75  # the cluster's state, not bad input: retrying later may succeed


def test_failing_unit_is_reported_and_the_rest_go_on(ray_cluster):
    spec = dispatch.PoolSpec("test", Doubler, resources={"num_cpus": 1})
    out = dispatch.run_pool(spec, [1, -1, 2], "run", num_actors=1, schedule_timeout_s=60)
    assert sorted(r for _, r in out.results) == [2, 4]
    assert [u for u, _ in out.failed] == [-1] and "bad unit -1" in out.failed[0][1]


def test_a_dead_actors_unit_goes_back_to_the_queue(ray_cluster, tmp_path):
    spec = dispatch.PoolSpec("test", Doubler, kwargs={"die_on": 3, "marker": str(tmp_path / "died")},
                             resources={"num_cpus": 1}, max_restarts=1)
    out = dispatch.run_pool(spec, range(5), "run", num_actors=1, schedule_timeout_s=60)
    assert sorted(r for _, r in out.results) == [0, 2, 4, 6, 8] and out.failed == []


def test_calibration_and_evaluation_pools_finish_on_a_half_taken_cluster(taken, tmp_path, builtin_catalog):
    """The jobs themselves, asked for two actors while one CPU is held elsewhere (issue 12 item 6)."""
    from persona_jobs import build_masks, calibrate, evaluate
    from persona_jobs.cli import build_parser

    def plan(job, *flags):
        return job.plan_from_args(build_parser().parse_args([*flags, "--store", store, "--model", "tiny-random-llama",
                                                             "--catalog", "builtin", "--personas", "introvert,extrovert"]))

    store = str(tmp_path / "store")
    taken(1)
    s = calibrate.run(plan(calibrate, "calibrate", "--shard-size", "16", "--max-length", "32", "--actors", "2",
                           "--schedule-timeout", "120"))
    assert s.ok and s.done > 2, s.errors
    b = build_masks.run(plan(build_masks, "build-masks", "--method", "contrastive-wanda", "--sparsity", "0.5"))
    assert b.ok, b.errors
    e = evaluate.run(plan(evaluate, "evaluate", "--method", "contrastive-wanda", "--sparsity", "0.5", "--run-id", "half",
                          "--actors", "2", "--cpus-per-actor", "1", "--conditions", "masked", "--metrics",
                          "statement-preference", "--max-statements", "4", "--schedule-timeout", "120"))
    assert e.ok and e.done == 2 and len(e.workers) == 1, e.errors  # one actor placed, it did both


def test_free_resources_waits_for_a_pool_that_just_ended(ray_cluster):
    """A pool sized right after the previous stage killed its actors must see the whole machine:
    sized from the instant snapshot, the evaluator once got one torch thread on a free 2-CPU node."""
    spec = dispatch.PoolSpec("stage", Doubler, resources={"num_cpus": 2})
    assert [r for _, r in dispatch.run_pool(spec, [1], "run", num_actors=1, schedule_timeout_s=60).results] == [2]
    assert dispatch.free_resources().get("CPU", 0) == 2
    assert dispatch.pool_size(None, {"num_cpus": 1}, units=10) == 2


def test_free_resources_returns_after_the_settle_time_when_others_hold_cpus(taken):
    taken(1)
    t0 = time.monotonic()
    assert dispatch.free_resources(settle_s=0.5).get("CPU", 0) == 1
    assert time.monotonic() - t0 < 5


def test_no_settle_wait_when_the_driver_holds_nothing(taken):
    """Issue 25 item 5: a CPU held by someone else (a submit entrypoint, another job) made every stage
    wait the whole settle time, twice. With no pool of this driver to wait for, the snapshot is taken at once."""
    taken(1)
    t0 = time.monotonic()
    assert dispatch.free_resources().get("CPU", 0) == 1
    assert dispatch.pool_size(None, {"num_cpus": 1}, units=10) == 1
    assert time.monotonic() - t0 < dispatch.SETTLE_S / 2


# ---------------------------------------------------------------------------- issue 25: actors that fit a node


def _node(address: str, cpus: float, free: float, gpus: float = 0) -> dispatch.NodeResources:
    total = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    return dispatch.NodeResources(address, address, total, {"CPU": free} | ({"GPU": gpus} if gpus else {}))


def test_cpu_evaluators_fit_the_free_cpus_of_each_node():
    """Two nodes of one free CPU each: the old sizing summed them and asked for one 2-CPU actor that
    no node could hold. Each actor asks for one CPU by default: two actors, one per node."""
    assert dispatch.actor_resources([], [1, 1], 10) == (2, {"num_cpus": 1}, 1)
    assert dispatch.actor_resources([], [3, 3], 10, cpus_per_actor=2) == (2, {"num_cpus": 2}, 2)  # 1 + 1, not 3
    assert dispatch.actor_resources([], [8], 3)[0] == 3  # never more actors than tasks
    assert dispatch.actor_resources([], [0], 3)[0] == 1  # nothing free now: one, which waits


def test_cpu_share_leaves_no_core_idle_and_fits_a_node(monkeypatch):
    """A learner pool of fewer long units than free cores shares the cores out (issue 26: one learned
    pair on 2 cores ran on 1 thread); never more than one node has free, never below 1."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert dispatch.cpu_share(1, [2]) == 2
    assert dispatch.cpu_share(2, [2]) == 1
    assert dispatch.cpu_share(5, [2]) == 1  # more units than cores: one each
    assert dispatch.cpu_share(1, [2, 2]) == 2  # an actor lives on one node
    assert dispatch.cpu_share(2, [8, 1]) == 4
    assert dispatch.cpu_share(1, [0]) == 1 and dispatch.cpu_share(1, []) == 1  # nothing free: one, which waits
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert dispatch.cpu_share(1, [8]) == 1  # the driver's thread setting caps it


def test_free_slots_count_node_by_node(monkeypatch):
    nodes = [_node("a", 4, 3), _node("b", 4, 3)]
    monkeypatch.setattr(dispatch, "_snapshot", lambda: nodes)
    assert dispatch.free_slots({"num_cpus": 2}) == 2  # 6 free CPUs in all, but one 2-CPU actor per node
    assert dispatch.free_slots({"num_cpus": 1}) == 6


def test_an_actor_larger_than_every_node_fails_at_once_naming_the_largest_node(monkeypatch):
    monkeypatch.delenv("PERSONA_MAX_GPUS", raising=False)
    nodes = [_node("10.0.0.1", 2, 0), _node("10.0.0.2", 2, 1)]
    with pytest.raises(dispatch.Unplaceable, match=r"no evaluation actor can be placed: each asks for CPU=3 on one "
                                                   r"node, and the largest node 10.0.0.2 has CPU=1 free of CPU=2") as err:
        dispatch.check_placeable("evaluation", {"num_cpus": 3}, nodes)
    assert err.value.exit_code == 75
    dispatch.check_placeable("evaluation", {"num_cpus": 2}, nodes)  # fits a node once its CPUs are free: it waits
    with pytest.raises(dispatch.Unplaceable, match="GPU=1"):
        dispatch.check_placeable("calibration", {"num_gpus": 1}, nodes)
    monkeypatch.setenv("PERSONA_MAX_GPUS", "2")  # the autoscaler adds GPU workers: a 1-GPU actor waits for one
    dispatch.check_placeable("calibration", {"num_gpus": 1}, nodes)


def test_an_unplaceable_pool_fails_at_once_not_after_the_schedule_timeout(ray_cluster):
    """Issue 25 item 4: an actor no node can hold waited schedule_timeout_s, then exited 2 (bad input)."""
    spec = dispatch.PoolSpec("evaluation", Doubler, resources={"num_cpus": 3})
    t0 = time.monotonic()
    with pytest.raises(dispatch.Unplaceable, match=r"CPU=3 on one node, and the largest node \S+ has CPU=2 free "
                                                   r"of CPU=2 \(1 node\(s\) alive\)"):
        dispatch.run_pool(spec, range(3), "run", num_actors=1, schedule_timeout_s=60)
    assert time.monotonic() - t0 < 10


def test_a_placement_failure_leaves_a_failed_manifest_and_exits_retryable(ray_cluster, tmp_path, capsys):
    """The run fails with a manifest (`status` says failed, not incomplete for ever) and exit code 75."""
    from conftest import tiny_pipeline_config

    from persona_core.run import runs
    from persona_core.run.plan import make_plan
    from persona_core.run.runs import Summary
    from persona_jobs import cli
    from persona_jobs.execute import execute

    class Done:
        def run(self, plan):
            return Summary("stage")

    class CannotPlace:
        def run(self, plan):
            dispatch.check_placeable("evaluation", {"num_cpus": 64})

    plan = make_plan(tiny_pipeline_config(str(tmp_path / "store")))
    stages = {"calibrate": Done(), "masks": Done(), "evaluate": CannotPlace(), "report": Done()}
    with pytest.raises(dispatch.Unplaceable) as err:
        execute(plan, stages)
    manifest = runs.read_manifest(plan.store, plan.run_id)
    assert manifest.status == runs.FAILED and "no evaluation actor can be placed" in manifest.error
    assert manifest.stages["evaluate"]["failed"] == 1 and manifest.stages["calibrate"]["failed"] == 0

    def fails(_args):
        raise err.value
    assert cli._run(argparse.Namespace(func=fails)) == 75
    assert "error: no evaluation actor can be placed" in capsys.readouterr().err


# ---------------------------------------------------------------------------- issue 25: the driver's log


def test_progress_is_lines_with_eta_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    """Under `submit` the job log is a file: a tqdm bar there was one line for a 116 s stage (or none, with
    PERSONA_PROGRESS=0). Lines "N/M units ... ETA" come every PERSONA_PROGRESS_EVERY_S seconds instead."""
    from persona_jobs import common
    from persona_jobs.status import progress_from_logs

    monkeypatch.setenv("PERSONA_PROGRESS", "1")
    monkeypatch.setenv(common.PROGRESS_EVERY_ENV, "10")
    assert isinstance(common.progress(4, "evaluation"), common.ProgressLines)  # pytest's stderr is no terminal
    assert capsys.readouterr().err == "evaluation: 0/4 units, 0s elapsed\n"
    now = [100.0]
    bar = common.ProgressLines(4, "evaluation (2 actors)", every_s=10, clock=lambda: now[0])
    now[0] += 5
    bar.update(1)  # 5 s after the last line: none yet
    now[0] += 10
    bar.refresh()  # nothing finished, but 15 s since the last line
    now[0] += 1
    bar.update(1)
    now[0] += 14
    bar.update(2)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["evaluation (2 actors): 0/4 units, 0s elapsed",
                     "evaluation (2 actors): 1/4 units, 15s elapsed, ETA 45s",
                     "evaluation (2 actors): 4/4 units, 30s elapsed",
                     "evaluation (2 actors): 4/4 units, 30s elapsed (done)"]
    assert progress_from_logs("\n".join(lines[:2])) == lines[1]  # what `status` shows of a running job
    monkeypatch.setenv("PERSONA_PROGRESS", "0")
    common.progress(4, "quiet").update(4)
    assert capsys.readouterr().err == ""


def test_actor_output_reaches_the_driver_log_unless_turned_off(monkeypatch):
    """log_to_driver=False hid every actor's error from `ray job logs`; it is Ray's default (on) now,
    PERSONA_LOG_TO_DRIVER=0 turns it off (the test session does, for quiet output)."""
    import ray

    from persona_jobs import common

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(common.LOG_TO_DRIVER_ENV, raising=False)
    common.ensure_ray(None)
    monkeypatch.setenv(common.LOG_TO_DRIVER_ENV, "0")
    common.ensure_ray(None)
    assert [c["log_to_driver"] for c in calls] == [True, False]


@pytest.mark.parametrize("store, refused", [("persona-store", "a relative folder"), ("/srv/store", "a local folder"),
                                            ("memory://x", "a memory:// store"), ("s3://bucket/store", None)])
def test_a_store_only_this_machine_sees_is_refused_on_a_multi_node_cluster(monkeypatch, tmp_path, store, refused):
    """Issue 25 item 6: a relative store passed `ray job submit`; calibration 'succeeded' with parts on
    each node's disk, then build-masks found no statistics. The stage drivers refuse it up front."""
    import ray

    from conftest import tiny_pipeline_config

    from persona_core.run.plan import make_plan
    from persona_jobs import common

    plan = make_plan(tiny_pipeline_config(str(tmp_path / "store")))
    plan.config.store = store  # what the user gave; the probe writes to tmp_path
    nodes = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}, {"NodeID": "c", "Alive": False}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.delenv(common.SHARED_STORE_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if refused:
        with pytest.raises(common.UserError, match=f"store {store}: the Ray cluster has 2 nodes alive and {refused}"):
            common.preflight(plan, need_ray=False)
    else:
        common.preflight(plan, need_ray=False)
    nodes[1]["Alive"] = False  # one node: every store works
    common.preflight(plan, need_ray=False)
    if store == "/srv/store":  # a folder every node mounts, declared so
        nodes[1]["Alive"] = True
        monkeypatch.setenv(common.SHARED_STORE_ENV, "1")
        common.preflight(plan, need_ray=False)
