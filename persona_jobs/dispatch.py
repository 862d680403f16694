"""One dispatcher for every actor pool: units from a queue, to whichever actor is free.

A pool is sized from the resources free to this job on each node when it starts
(`pool_size`, `node_resources`), not from the cluster's total: an actor is placed
on one node, so what counts is how many fit on each. Actors that Ray cannot place
(another job holds the CPUs) simply never take a unit, while every live actor takes
the next unit as soon as it finishes one. So a partly taken cluster is slower,
never stuck. Three failures are the cluster's, not the input's, and exit with the
retryable code (`PlacementError`, 75): an actor larger than every live node
(`Unplaceable`, at once, naming the largest node's free resources), and no actor
placed and no unit running for `schedule_timeout_s` (`SchedulingTimeout`). An
actor that dies (after its restarts) gives its unit back to the queue (up to
`unit_attempts` times), and when its node is gone the log says so (node loss, not
a failed start); a unit that raises is reported and the others go on.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from persona_core.errors import UserError
from persona_jobs.common import max_gpus, progress
from persona_jobs.jobs_api import EXIT_TEMPORARY

log = logging.getLogger(__name__)

SETTLE_S = 5.0  # longest wait for the resources this job's last pool held to come back
POLL_S = 1.0
NODE_CHECK_S = 2.0  # how long an actor's death waits for the GCS to say whether its node is gone
RESOURCE_KEYS = {"num_cpus": "CPU", "num_gpus": "GPU"}
# Test hook (the multi-node test): "<pool name>:<marker dir>:<seconds>". While the marker dir exists,
# each unit of that pool first writes a marker named after its node and holds for the seconds given,
# so a test can kill a node while it is known to hold a unit.
HOLD_ENV = "PERSONA_TEST_HOLD_UNITS"


class PlacementError(UserError):
    """The cluster cannot hold the pool's actors now: the run fails, and retrying later may succeed."""

    exit_code = EXIT_TEMPORARY


class SchedulingTimeout(PlacementError):
    """No actor of a pool could be started within the bound."""


class Unplaceable(PlacementError):
    """An actor asks for more than any live node has in total: it can never be placed."""


@dataclass
class PoolSpec:
    """What a pool is made of: a worker class, its arguments, and what each actor asks Ray for."""

    name: str  # shown in progress lines and messages, e.g. "calibration"
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
    nodes_lost: list[str] = field(default_factory=list)  # addresses of nodes that died while holding actors


@dataclass
class NodeResources:
    """One live node: its id, address, and resources in total and free now (Ray's names: CPU, GPU, ...)."""

    node_id: str
    address: str
    total: dict[str, float]
    free: dict[str, float]

    def fits(self, resources: dict, *, free: bool) -> int:
        """How many actors asking for `resources` fit in this node's free (or total) resources."""
        have = self.free if free else self.total
        counts = [int(have.get(key, 0) // amount) for key, amount in asked(resources).items()]
        return min(counts) if counts else 1

    def describe(self) -> str:
        keys = [k for k in ("CPU", "GPU") if self.total.get(k)] or ["CPU"]
        def fmt(d: dict) -> str:
            return ", ".join(f"{k}={d.get(k, 0):g}" for k in keys)
        return f"node {self.address} has {fmt(self.free)} free of {fmt(self.total)}"


def asked(resources: dict) -> dict[str, float]:
    """An actor's Ray options as resource amounts by Ray's names: {"num_cpus": 2} -> {"CPU": 2}."""
    out = {RESOURCE_KEYS[k]: float(v) for k, v in resources.items() if k in RESOURCE_KEYS and v}
    out.update({k: float(v) for k, v in (resources.get("resources") or {}).items() if v})
    return out


# What each node had free when this process's last pool started: its actors' resources come back a moment
# after they are killed, and the next pool is sized only once they have (see `node_resources`).
_held_since: dict[str, dict[str, float]] = {}


def _snapshot() -> list[NodeResources]:
    import ray  # heavy: ray only when a job runs
    from ray._private.state import available_resources_per_node  # DeveloperAPI: free resources of each live node

    free = available_resources_per_node()
    return [NodeResources(n.get("NodeID", ""), n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})),
                          dict(free.get(n.get("NodeID", ""), {})))
            for n in ray.nodes() if n.get("Alive")]


def node_resources(settle_s: float = SETTLE_S) -> list[NodeResources]:
    """The live nodes with what each has free now.

    Ray returns a killed actor's resources a moment after the driver has killed it, so a snapshot taken
    right after one pool ends can see half a machine as taken and size the next pool (and its torch
    threads) for one core. When this process's last pool has just ended, polls until every node has
    at least what it had free before that pool started, or `settle_s` has passed. A driver that holds
    nothing (no pool ran, or its resources are back) gets the snapshot at once: CPUs that other jobs or
    a submit entrypoint hold are not waited for.
    """
    deadline = time.monotonic() + settle_s
    while True:
        nodes = _snapshot()
        back = all(n.free.get(k, 0) >= v for n in nodes for k, v in _held_since.get(n.node_id, {}).items())
        if back or time.monotonic() >= deadline:
            _held_since.clear()
            return nodes
        time.sleep(0.1)


def free_resources(settle_s: float = SETTLE_S) -> dict:
    """What the cluster has free now, summed over its live nodes (see `node_resources`)."""
    total: dict[str, float] = {}
    for n in node_resources(settle_s):
        for k, v in n.free.items():
            total[k] = total.get(k, 0) + v
    return total


def free_cpus_per_node(settle_s: float = SETTLE_S) -> list[int]:
    """The whole CPUs free on each live node (what a CPU pool's actors can be placed in)."""
    return [int(n.free.get("CPU", 0)) for n in node_resources(settle_s)]


def free_slots(resources: dict) -> int:
    """How many actors asking for `resources` fit, node by node, in what the cluster has free right now."""
    return sum(n.fits(resources, free=True) for n in node_resources())


def pool_size(requested: int | None, resources: dict, units: int, cap: int | None = None) -> int:
    """Actors to start: what was asked for, else what fits in the free resources (capped), at least 1,
    never more than there are units."""
    n = requested if requested else free_slots(resources)
    if cap and not requested:
        n = min(n, cap)
    return max(1, min(n, units))


def cpu_share(units: int, cpus_per_node: list[int]) -> int:
    """CPUs (and torch threads) for each actor of a CPU pool of `units` long units: the free CPUs shared
    out, so a pool of fewer units than cores leaves none idle (one learned pair on 2 cores: 2 threads),
    never more than one node has free, nor than ``OMP_NUM_THREADS`` where the driver's environment sets
    it (the tests' parallel workers: one thread each), at least 1."""
    if units < 1 or not cpus_per_node or max(cpus_per_node) < 1:
        return 1
    share = min(max(cpus_per_node), sum(cpus_per_node) // units)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and int(cap) > 0:
        share = min(share, int(cap))
    return max(1, share)


def check_placeable(name: str, resources: dict, nodes: list[NodeResources] | None = None, kind: str = "actor") -> None:
    """Fail at once (`Unplaceable`) when no live node could ever hold one actor (or task) of a pool.

    An actor is placed on one node: one that asks for more than the largest node has in total waits
    for ever. GPU actors of one GPU are exempt while the cluster scales to more GPUs than it has
    (`common.max_gpus`): the autoscaler adds nodes for them.
    """
    need = asked(resources)
    if not need:
        return
    nodes = _snapshot() if nodes is None else nodes
    if any(n.fits(resources, free=False) for n in nodes):
        return
    if need.get("GPU", 0) <= 1 and set(need) <= {"CPU", "GPU"} and "GPU" in need and \
            max_gpus() > sum(n.total.get("GPU", 0) for n in nodes):
        return
    largest = max(nodes, key=lambda n: tuple(n.free.get(k, 0) for k in need), default=None)
    what = ", ".join(f"{k}={v:g}" for k, v in need.items())
    raise Unplaceable(f"no {name} {kind} can be placed: each asks for {what} on one node, and the largest "
                      f"{largest.describe() if largest else 'node: none is alive'} ({len(nodes)} node(s) alive). "
                      f"Ask for less per actor (e.g. resources.cpus_per_actor, --cpus-per-actor) or add larger nodes.")


def actor_resources(gpus_per_node: list[int], cpus_per_node: list[int] | int, n_tasks: int, *,
                    actors: int | None = None, cpus_per_actor: int | None = None,
                    gpus_per_actor: int | None = None, device_map: str | None = None) -> tuple[int, dict, int | None]:
    """(number of actors, Ray options of each, torch threads) for the evaluator pool.

    One GPU per actor, except with ``device_map="auto"``: then one model spreads over several
    GPUs of one node, and the actor must hold all of them (Ray sets CUDA_VISIBLE_DEVICES to
    the GPUs it grants; without asking for them the placement sees one GPU, or none).
    `gpus_per_actor` sets how many; by default every GPU of the largest node.
    On a CPU cluster each actor asks for `cpus_per_actor` CPUs (default 1: an actor fits any node
    with one free CPU) and there are as many as fit, node by node, in `cpus_per_node` (the free CPUs
    of each node, `free_cpus_per_node`; a number is one node's).
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
    per = cpus_per_actor or 1
    slots = sum(c // per for c in ([cpus_per_node] if isinstance(cpus_per_node, int) else cpus_per_node))
    n_actors = max(1, min(actors or max(1, slots), n_tasks))
    return n_actors, {"num_cpus": per}, per


def _hold_from(nodes: list[NodeResources]) -> None:
    """Remember what each node has free before a pool takes its share (`node_resources` waits for it)."""
    _held_since.clear()
    _held_since.update({n.node_id: {k: v for k, v in n.free.items() if k in ("CPU", "GPU")} for n in nodes})


def _hold(pool: str) -> None:
    """The test hook of `HOLD_ENV` ("<pool>:<folder>:<seconds>"), in the actor: while `folder` exists, a
    marker named after this node, then a pause of `seconds` that ends early once the folder is removed."""
    value = os.environ.get(HOLD_ENV, "")
    name, _, rest = value.partition(":")
    folder, _, seconds = rest.rpartition(":")
    if not value or name != pool or not os.path.isdir(folder):
        return
    import ray  # heavy: in the actor, where Ray is loaded

    node = ray.get_runtime_context().get_node_id()
    with open(os.path.join(folder, f"{node}.{os.getpid()}.{time.monotonic_ns()}"), "w"):
        pass
    until = time.monotonic() + float(seconds or 0)
    while time.monotonic() < until and os.path.isdir(folder):
        time.sleep(min(0.2, max(0.0, until - time.monotonic())))


def _actor_class(worker: type, pool: str) -> type:
    """The worker class plus `ready()` (the dispatcher learns that an actor started, and on which node)
    and `run_unit(method, *args)` (one unit: `method(*args)`, after the test hook of `HOLD_ENV`)."""

    def ready(self) -> str:
        import ray  # heavy: in the actor, where Ray is loaded

        return ray.get_runtime_context().get_node_id()

    def run_unit(self, method: str, *args):
        _hold(pool)
        return getattr(self, method)(*args)

    return type(f"{worker.__name__}Actor", (worker,), {"ready": ready, "run_unit": run_unit})


def run_pool(spec: PoolSpec, units: Iterable, method: str, *, num_actors: int,
             schedule_timeout_s: float = 300.0, unit_attempts: int = 3, describe: Callable[[Any], str] = str,
             call_args: Callable[[Any], tuple] = lambda unit: (unit,)) -> UnitResults:
    """Run `method(*call_args(unit))` for every unit on a pool of `num_actors` actors; returns the `UnitResults`."""
    import ray  # heavy: ray only when a job runs

    queue = deque(units)
    out = UnitResults()
    if not queue:
        return out
    nodes = _snapshot()
    check_placeable(spec.name, spec.resources, nodes)
    address = {n.node_id: n.address for n in nodes}
    opts = {k: v for k, v in spec.resources.items() if v}
    retries = {k: v for k, v in (("max_restarts", spec.max_restarts), ("max_task_retries", spec.max_task_retries)) if v}
    remote = ray.remote(**opts, **retries)(_actor_class(spec.worker, spec.name))
    _hold_from(nodes)
    actors = [remote.remote(*spec.args, **spec.kwargs) for _ in range(num_actors)]
    starting = {a.ready.remote(): a for a in actors}
    idle: list = []
    running: dict = {}  # ref -> (actor, unit)
    attempts: dict[int, int] = {}
    placed: dict[int, str] = {}  # id(actor) -> the node it started on
    live_at = time.monotonic()  # the last time an actor started or a unit came back
    bar = progress(len(queue), f"{spec.name} ({num_actors} actor{'s' * (num_actors > 1)})")

    def died(actor, err: BaseException) -> str:
        """Why an actor that had started is gone, in words; a lost node's other idle actors leave the pool."""
        node = placed.get(id(actor))
        if node is None or not _node_lost(node, err):
            return f"{spec.name} actor died ({short_error(err)})"
        where = f"{address.get(node) or _address_of(node) or '?'} ({node[:8]})"  # nodes may share an address
        if where not in out.nodes_lost:
            out.nodes_lost.append(where)
            log.error("node %s lost: its %s actor(s) died with it; their units go back to the queue", where, spec.name)
        idle[:] = [a for a in idle if placed.get(id(a)) != node]
        return f"node {where} lost (its {spec.name} actor died with it)"

    def gone(actor, err: BaseException) -> None:
        """An actor will not come back: say why; when none is left to take the rest, fail them with that."""
        if id(actor) in placed:
            why = died(actor, err)
            log.error("%s", why)
        else:
            why = f"{spec.name} actor failed to start: {short_error(err)}"
            log.error("a %s", why)
        if not starting and not idle and not running:  # none left to take the rest
            for unit in queue:
                out.failed.append((unit, why))
            queue.clear()
    try:
        while queue or running:
            while idle and queue:
                actor, unit = idle.pop(), queue.popleft()
                call = actor.run_unit
                if spec.retry_exceptions:
                    call = call.options(retry_exceptions=True)
                running[call.remote(method, *call_args(unit))] = (actor, unit)
            waiting = [*running, *starting]
            if not waiting:  # every actor is gone: nothing can take the rest
                for unit in queue:
                    out.failed.append((unit, f"no {spec.name} actor left"
                                             + (f" (node(s) lost: {', '.join(out.nodes_lost)})" if out.nodes_lost else "")))
                queue.clear()
                break
            ready, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S)
            if not ready:  # nothing running and no actor placed for too long: say why, do not hang
                bar.refresh()
                if not running and not idle and time.monotonic() - live_at > schedule_timeout_s:
                    raise SchedulingTimeout(_timeout_message(spec, num_actors, schedule_timeout_s))
                continue
            live_at = time.monotonic()
            ref = ready[0]
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    node = ray.get(ref)
                    if id(actor) not in placed:
                        out.actors_started += 1
                    placed[id(actor)] = node
                    idle.append(actor)
                except ray.exceptions.RayActorError as err:
                    if not isinstance(err, ray.exceptions.ActorDiedError):  # restarting: ask again shortly
                        time.sleep(0.2)
                        starting[actor.ready.remote()] = actor
                        continue
                    gone(actor, err)
                except Exception as err:  # the constructor failed (e.g. the model cannot load), or it died
                    gone(actor, err)
                continue
            actor, unit = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:  # the actor died: its unit goes back to the queue
                why = died(actor, err)
                n = attempts[id(unit)] = attempts.get(id(unit), 1) + 1
                if n <= unit_attempts:
                    log.warning("%s: %s; unit back in the queue", describe(unit), why)
                    queue.appendleft(unit)
                else:
                    out.failed.append((unit, why))
                    log.error("%s failed: %s", describe(unit), why)
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


def _node_lost(node_id: str, err: BaseException) -> bool:
    """Whether an actor's death is its node's: Ray says so, or the node is no longer alive."""
    import ray  # heavy: ray only when a job runs

    if "node has died" in str(err) or "node died" in str(err):
        return True
    deadline = time.monotonic() + NODE_CHECK_S  # the GCS marks a node dead a moment after its actors fail
    while True:
        if not any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _address_of(node_id: str) -> str | None:
    import ray  # heavy: ray only when a job runs

    return next((n.get("NodeManagerAddress") for n in ray.nodes() if n.get("NodeID") == node_id), None)


def _timeout_message(spec: PoolSpec, n: int, timeout: float) -> str:
    asked_ = ", ".join(f"{k}={v:g}" for k, v in asked(spec.resources).items())
    nodes = _snapshot()
    largest = max(nodes, key=lambda x: x.free.get("GPU", 0) * 1e6 + x.free.get("CPU", 0), default=None)
    return (f"no {spec.name} actor could be scheduled within {timeout:g} s: each asks for {asked_} "
            f"({n} requested); the largest {largest.describe() if largest else 'node: none is alive'} "
            f"({len(nodes)} node(s) alive). Free resources (other jobs, the driver's --entrypoint-num-cpus) "
            f"or raise resources.schedule_timeout_s; retrying later may succeed.")


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
    resources = resources or {"num_cpus": 1}
    nodes = _snapshot()
    check_placeable(name, resources, nodes, kind="task")
    task = ray.remote(max_retries=max_retries, **resources)(fn)
    _hold_from(nodes)
    pending: dict = {}
    with progress(len(queue), name) as bar:
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                unit = queue.popleft()
                pending[task.remote(*args(unit))] = unit
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            bar.refresh()
            for ref in ready:
                unit = pending.pop(ref)
                try:
                    out.results.append((unit, ray.get(ref)))
                except Exception as err:  # a task's failure is reported, not fatal to the others
                    out.failed.append((unit, short_error(err)))
                    log.error("%s failed: %s", describe(unit), short_error(err))
                bar.update(1)
    return out
