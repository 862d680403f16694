"""The evaluator pool asks Ray for what each actor's placement needs (issue 12 item 12):
with `--device-map auto` one model spreads over several GPUs, so its actor must hold them all."""

from __future__ import annotations

import pytest

from persona_jobs import evaluate as job
from persona_jobs.cli import UserError, build_parser


def test_one_gpu_per_actor_by_default():
    assert job.actor_resources([2, 2], 16, 10) == (4, {"num_gpus": 1, "num_cpus": 1}, None)
    assert job.actor_resources([2, 2], 16, 3)[0] == 3  # never more actors than tasks
    assert job.actor_resources([], [1, 1], 10) == (2, {"num_cpus": 1}, 1)  # CPU: one each, fits any node (issue 25)


def test_device_map_auto_holds_the_gpus_of_its_placement():
    # By default an actor holds every GPU of the largest node: one model per node.
    assert job.actor_resources([4, 4], 16, 10, device_map="auto") == (2, {"num_gpus": 4, "num_cpus": 1}, None)
    assert job.actor_resources([4, 2], 16, 10, device_map="auto")[:2] == (1, {"num_gpus": 4, "num_cpus": 1})
    # --gpus-per-actor 2: two placements per 4-GPU node, one on the 2-GPU node.
    assert job.actor_resources([4, 2], 16, 10, device_map="auto", gpus_per_actor=2)[:2] == \
        (3, {"num_gpus": 2, "num_cpus": 1})
    with pytest.raises(UserError, match="largest has 4"):
        job.actor_resources([4, 4], 16, 10, device_map="auto", gpus_per_actor=8)
    with pytest.raises(UserError, match="needs --device-map auto"):
        job.actor_resources([4], 16, 10, gpus_per_actor=2)


def test_run_creates_evaluators_with_those_resources(ray_cluster, tmp_path, monkeypatch):
    """The job wires it through: with 2 nodes of 2 GPUs (as Ray reports them), `device_map="auto"`
    creates 2 actors asking for 2 GPUs each (today: 4 actors of 1 GPU, each placement seeing one)."""
    import ray

    asked = []

    class Stop(Exception):
        pass

    def fake_remote(**opts):
        asked.append(opts)
        raise Stop

    nodes = [{"Alive": True, "Resources": {"CPU": 8, "GPU": 2}}, {"Alive": True, "Resources": {"CPU": 8, "GPU": 2}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16, "GPU": 4})
    monkeypatch.setattr(ray, "remote", fake_remote)
    with pytest.raises(Stop):
        job.run(job.plan_from_args(build_parser().parse_args([
            "evaluate", "--store", str(tmp_path / "st"), "--model", "tiny-random-llama", "--personas",
            "introvert,extrovert,optimist,pessimist", "--conditions", "dense", "--metrics", "statement-preference",
            "--run-id", "r", "--device-map", "auto"])))
    assert len(asked) == 1 and {k: asked[0][k] for k in ("num_gpus", "num_cpus")} == {"num_gpus": 2, "num_cpus": 1}
