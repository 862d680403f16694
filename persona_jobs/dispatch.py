"""One dispatcher for every actor pool: units from a queue, to whichever actor is free.

A pool is sized from the resources free to this job when it starts
(`pool_size`), not from the cluster's total; actors that Ray cannot place
(another job holds the CPUs, the driver holds one) simply never take a unit,
while every live actor takes the next unit as soon as it finishes one. So a
partly taken cluster is slower, never stuck. If no actor is placed and no unit
is running for `schedule_timeout_s` (none could start, or every live one died
and the rest cannot be placed), the dispatcher stops with a message that says
what the pool asked for and what the cluster has free. An actor that dies (after its
restarts) gives its unit back to the queue (up to `unit_attempts` times);
a unit that raises is reported and the others go on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from persona_core.errors import UserError
from persona_jobs.common import progress

log = logging.getLogger(__name__)

SETTLE_S = 5.0  # longest wait for a finished stage's resources to come back
POLL_S = 1.0


class SchedulingTimeout(UserError):
    """No actor of a pool could be started within the bound."""


@dataclass
class PoolSpec:
    """What a pool is made of: a worker class, its arguments, and what each actor asks Ray for."""

    name: str  # shown in progress bars and messages, e.g. "calibration"
    worker: type
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    resources: dict = field(default_factory=lambda: {"num_cpus": 1})  # num_cpus, num_gpus, resources
    max_restarts: int = 0
    max_task_retries: int = 0
    retry_exceptions: bool = False


@dataclass
class UnitResults:
    """What came back: results in completion order, and the units that failed with why."""

    results: list[tuple[Any, Any]] = field(default_factory=list)  # (unit, result)
    failed: list[tuple[Any, str]] = field(default_factory=list)  # (unit, error text)
    actors_started: int = 0


def free_resources(settle_s: float = SETTLE_S) -> dict:
    """What the cluster has free now, after letting a stage that just ended give back what it held.

    Ray returns a finished task's worker lease and a killed actor's resources a moment after the
    driver has its result, so a snapshot taken right after one stage can see half a 2-CPU machine
    as taken and size the next pool (and its torch threads) for one core. Polls until everything
    is free or `settle_s` has passed (on a cluster shared with other jobs: the last snapshot).
    """
    import ray  # heavy: ray only when a job runs

    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    deadline = time.monotonic() + settle_s
    while True:
        free = ray.available_resources()
        if all(free.get(k, 0) >= v for k, v in total.items()) or time.monotonic() >= deadline:
            return free
        time.sleep(0.1)


def free_slots(resources: dict) -> int:
    """How many actors asking for `resources` fit in what the cluster has free right now."""
    free = free_resources()
    slots = []
    if resources.get("num_gpus"):
        slots.append(int(free.get("GPU", 0) // resources["num_gpus"]))
    if resources.get("num_cpus"):
        slots.append(int(free.get("CPU", 0) // resources["num_cpus"]))
    for name, amount in (resources.get("resources") or {}).items():
        slots.append(int(free.get(name, 0) // amount))
    return min(slots) if slots else 1


def pool_size(requested: int | None, resources: dict, units: int, cap: int | None = None) -> int:
    """Actors to start: what was asked for, else what fits in the free resources (capped), at least 1,
    never more than there are units."""
    n = requested if requested else free_slots(resources)
    if cap and not requested:
        n = min(n, cap)
    return max(1, min(n, units))


def actor_resources(gpus_per_node: list[int], cpus: int, n_tasks: int, *, actors: int | None = None,
                    cpus_per_actor: int | None = None, gpus_per_actor: int | None = None,
                    device_map: str | None = None) -> tuple[int, dict, int | None]:
    """(number of actors, Ray options of each, torch threads) for the evaluator pool.

    One GPU per actor, except with ``device_map="auto"``: then one model spreads over several
    GPUs of one node, and the actor must hold all of them (Ray sets CUDA_VISIBLE_DEVICES to
    the GPUs it grants; without asking for them the placement sees one GPU, or none).
    `gpus_per_actor` sets how many; by default every GPU of the largest node.
    """
    gpus = sum(gpus_per_node)
    if gpus:
        per = 1
        if device_map == "auto":
            per = gpus_per_actor or max(gpus_per_node)
            if per > max(gpus_per_node):
                raise UserError(f"--gpus-per-actor {per}: one model's placement must fit on one node, and the "
                                f"largest has {max(gpus_per_node)} GPU(s)")
        elif gpus_per_actor not in (None, 1):
            raise UserError("--gpus-per-actor needs --device-map auto (one model over several GPUs)")
        slots = sum(g // per for g in gpus_per_node)
        n_actors = max(1, min(actors or slots, slots, n_tasks))
        return n_actors, {"num_gpus": per, "num_cpus": 1}, cpus_per_actor
    per = cpus_per_actor or max(1, min(4, cpus))
    n_actors = max(1, min(actors or max(1, cpus // per), n_tasks))
    return n_actors, {"num_cpus": per}, per


def _with_ready(worker: type) -> type:
    """The worker class plus a `ready()` method the dispatcher calls to learn that an actor has started."""
    return type(f"{worker.__name__}Actor", (worker,), {"ready": lambda self: True})


def run_pool(spec: PoolSpec, units: Iterable, method: str, *, num_actors: int,
             schedule_timeout_s: float = 300.0, unit_attempts: int = 3, describe: Callable[[Any], str] = str,
             call_args: Callable[[Any], tuple] = lambda unit: (unit,)) -> UnitResults:
    """Run `method(*call_args(unit))` for every unit on a pool of `num_actors` actors; returns the `UnitResults`."""
    import ray  # heavy: ray only when a job runs

    queue = deque(units)
    out = UnitResults()
    if not queue:
        return out
    opts = {k: v for k, v in spec.resources.items() if v}
    retries = {k: v for k, v in (("max_restarts", spec.max_restarts), ("max_task_retries", spec.max_task_retries)) if v}
    remote = ray.remote(**opts, **retries)(_with_ready(spec.worker))
    actors = [remote.remote(*spec.args, **spec.kwargs) for _ in range(num_actors)]
    starting = {a.ready.remote(): a for a in actors}
    idle: list = []
    running: dict = {}  # ref -> (actor, unit)
    attempts: dict[int, int] = {}
    started: set[int] = set()
    live_at = time.monotonic()  # the last time an actor started or a unit came back
    bar = progress(len(queue), f"{spec.name} ({num_actors} actor{'s' * (num_actors > 1)})")

    def _lost(err: BaseException) -> None:
        log.error("a %s actor failed to start: %s", spec.name, short_error(err))
        if not starting and not idle and not running:  # none left to take the rest
            for unit in queue:
                out.failed.append((unit, f"{spec.name} actor failed to start: {short_error(err)}"))
            queue.clear()
    try:
        while queue or running:
            while idle and queue:
                actor, unit = idle.pop(), queue.popleft()
                call = getattr(actor, method)
                if spec.retry_exceptions:
                    call = call.options(retry_exceptions=True)
                running[call.remote(*call_args(unit))] = (actor, unit)
            waiting = [*running, *starting]
            if not waiting:  # every actor is gone: nothing can take the rest
                for unit in queue:
                    out.failed.append((unit, f"no {spec.name} actor left"))
                queue.clear()
                break
            ready, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S)
            if not ready:  # nothing running and no actor placed for too long: say why, do not hang
                if not running and not idle and time.monotonic() - live_at > schedule_timeout_s:
                    raise SchedulingTimeout(_timeout_message(spec, num_actors, schedule_timeout_s))
                continue
            live_at = time.monotonic()
            ref = ready[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                    if id(actor) not in started:
                        started.add(id(actor))
                        out.actors_started += 1
                    idle.append(actor)
                except ray.exceptions.RayActorError as err:
                    if not isinstance(err, ray.exceptions.ActorDiedError):  # restarting: ask again shortly
                        time.sleep(0.2)
                        starting[actor.ready.remote()] = actor
                        continue
                    _lost(err)
                except Exception as err:  # the constructor failed (e.g. the model cannot load), or it died
                    _lost(err)
                continue
            actor, unit = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:  # the actor died: its unit goes back to the queue
                n = attempts[id(unit)] = attempts.get(id(unit), 1) + 1
                if n <= unit_attempts:
                    log.warning("%s: actor died (%s); unit back in the queue", describe(unit), short_error(err))
                    queue.appendleft(unit)
                else:
                    out.failed.append((unit, short_error(err)))
                    bar.update(1)
                if not isinstance(err, ray.exceptions.ActorDiedError):  # it may be restarting: ask again
                    starting[actor.ready.remote()] = actor
                continue
            except Exception as err:  # the unit raised on every attempt: report it, go on
                out.failed.append((unit, short_error(err)))
                log.error("%s failed: %s", describe(unit), short_error(err))
                idle.append(actor)
                bar.update(1)
                continue
            out.results.append((unit, result))
            idle.append(actor)
            bar.update(1)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)  # pending actors too: their creation is cancelled
    return out


def _timeout_message(spec: PoolSpec, n: int, timeout: float) -> str:
    import ray  # heavy: ray only when a job runs

    asked = ", ".join(f"{k.removeprefix('num_').upper()}={v}" for k, v in spec.resources.items() if v)
    free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    return (f"no {spec.name} actor could be scheduled within {timeout:g} s: each asks for {asked} "
            f"({n} requested); the cluster has {free or 'nothing'} free of {total}. Free resources "
            f"(other jobs, the driver's --entrypoint-num-cpus) or raise resources.schedule_timeout_s.")


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1][:500] if text else type(err).__name__


def run_tasks(fn: Callable, units: Iterable, args: Callable[[Any], tuple], *, name: str,
              resources: dict | None = None, max_retries: int = 2, max_in_flight: int = 256,
              describe: Callable[[Any], str] = str) -> UnitResults:
    """Run `fn(*args(unit))` as one Ray task per unit (at most `max_in_flight` submitted at once).

    For stateless work (the mask builder); tasks wait in Ray's queue for resources, so a partly
    taken cluster only slows them down. A task that fails after its retries is reported; the rest go on.
    """
    import ray  # heavy: ray only when a job runs

    queue = deque(units)
    out = UnitResults()
    task = ray.remote(max_retries=max_retries, **(resources or {"num_cpus": 1}))(fn)
    pending: dict = {}
    with progress(len(queue), name) as bar:
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                unit = queue.popleft()
                pending[task.remote(*args(unit))] = unit
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                unit = pending.pop(ref)
                try:
                    out.results.append((unit, ray.get(ref)))
                except Exception as err:  # a task's failure is reported, not fatal to the others
                    out.failed.append((unit, short_error(err)))
                    log.error("%s failed: %s", describe(unit), short_error(err))
                bar.update(1)
    return out
