"""The shared dispatcher on a local Ray cluster whose CPUs are partly (or wholly) taken (issue 12 item 6)."""

from __future__ import annotations

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
                                                         r"each asks for CPUS=1"):
        dispatch.run_pool(spec, range(3), "run", num_actors=1, schedule_timeout_s=3)
    assert time.monotonic() - t0 < 30


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


def test_free_resources_waits_for_a_stage_that_just_ended(ray_cluster):
    """A pool sized right after the previous stage killed its actors must see the whole machine:
    sized from the instant snapshot, the evaluator once got one torch thread on a free 2-CPU node."""

    @ray_cluster.remote(num_cpus=2)
    class Stage:
        def ping(self):
            return True

    a = Stage.remote()
    ray_cluster.get(a.ping.remote())
    ray_cluster.kill(a)
    assert dispatch.free_resources().get("CPU", 0) == 2
    assert dispatch.pool_size(None, {"num_cpus": 1}, units=10) == 2


def test_free_resources_returns_after_the_settle_time_when_others_hold_cpus(taken):
    taken(1)
    t0 = time.monotonic()
    assert dispatch.free_resources(settle_s=0.5).get("CPU", 0) == 1
    assert time.monotonic() - t0 < 5
