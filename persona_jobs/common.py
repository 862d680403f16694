"""What every job shares: the preflight check, connecting to Ray, progress, and the command-line conventions.

Every subcommand spells its shared options the same way (`add_common`): ``--store``,
``--model`` (and ``--revision``), ``--catalog``, ``--address``, ``--config``; and every
list option takes values one convention (`add_list`): comma-separated, space-separated
or repeated, all three mean the same (``--personas a,b`` = ``--personas a b`` =
``--personas a --personas b``).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from typing import Callable

from tqdm import tqdm

from persona_core.errors import UserError
from persona_core.run.plan import Plan
from persona_core.run.runs import Summary
from persona_core.store.redact import url_userinfo_problem
from persona_core.store.store import StoreError

log = logging.getLogger(__name__)


def preflight(p: Plan, need_ray: bool = True) -> None:
    """Store writable and (when asked) Ray reachable, checked before any work (nothing is written but a probe).

    A store that only this machine sees (a folder, memory://) is refused when the Ray cluster has more
    than one node (`check_store_shared`); to know that, a driver given a Ray address joins it here even
    when Ray is not otherwise needed yet.
    """
    try:
        p.store.check_writable()
    except (StoreError, OSError, ValueError) as err:
        raise UserError(f"store {p.config.store} cannot be written: {err}") from None
    address = p.config.address or os.environ.get("RAY_ADDRESS")
    local = store_locality(p.config.store or p.store.uri())
    if need_ray or (local and address):
        ensure_ray(address)  # checks the address first
    if local:
        check_store_shared(p.config.store or p.store.uri(), local)


SHARED_STORE_ENV = "PERSONA_SHARED_STORE"  # "1": the store's absolute folder is mounted on every node


def store_locality(store: str) -> str | None:
    """Why a store may be seen by this machine only ("memory", "relative", "folder"), or None (a URL
    such as s3://, which every node reaches, or a folder declared shared with PERSONA_SHARED_STORE=1)."""
    protocol, sep, rest = store.partition("://")
    if not sep:
        protocol, rest = "file", store
    if protocol == "memory":
        return "memory"
    if protocol not in ("file", "local"):
        return None
    if not os.path.isabs(os.path.expanduser(rest)):
        return "relative"
    return None if os.environ.get(SHARED_STORE_ENV, "") in ("1", "true") else "folder"


def check_store_shared(store: str, locality: str) -> None:
    """Refuse a store that only this machine sees when the joined Ray cluster has more than one node alive:
    each node's actors would write their parts to their own disk (and the next stage finds none)."""
    import ray  # heavy: ray only when a job runs

    if not ray.is_initialized():
        return  # no cluster joined: a local Ray started later has one node
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    if alive <= 1:
        return
    why = {"memory": "a memory:// store lives in this process only",
           "relative": "a relative folder resolves on each node in its own working directory",
           "folder": f"a local folder is on this machine only (set {SHARED_STORE_ENV}=1 if every node mounts it)"}
    raise UserError(f"store {store}: the Ray cluster has {alive} nodes alive and {why[locality]}; "
                    f"use a store every node reaches (s3://bucket/prefix)")


def run_alone(plan: Plan, stage: Callable[[Plan], Summary]) -> int:
    """A standalone subcommand: preflight (Ray is joined once there is work to do), one stage, its summary."""
    preflight(plan, need_ray=False)
    summary = stage(plan)
    print(summary.line())
    for err in summary.errors:
        print(f"  {err}")
    return 0 if summary.ok else 1


LOG_TO_DRIVER_ENV = "PERSONA_LOG_TO_DRIVER"


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), or start a local one.

    A process that already called `ray.init` (a test session, a driver under
    `ray job submit`) keeps its connection.
    """
    import ray  # heavy: ray only when a job runs

    address = address or os.environ.get("RAY_ADDRESS")
    check_ray_address(address)  # also when connected: a wrong address given is an error, not ignored
    if ray.is_initialized():
        return
    # the actors' output (their warnings, errors, tracebacks) in this driver's log, as Ray does by default
    # (the job log of `ray job logs`); PERSONA_LOG_TO_DRIVER=0 leaves it in the nodes' worker logs
    init_kwargs.setdefault("log_to_driver", os.environ.get(LOG_TO_DRIVER_ENV, "1") not in ("0", "false"))
    try:
        if address:
            ray.init(address=address, **init_kwargs)
        else:
            init_kwargs.setdefault("include_dashboard", False)
            ray.init(**init_kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot reach Ray at {address or 'a new local cluster'}: {err}") from err


def check_ray_address(address: str | None, timeout: float = 10.0) -> None:
    """Fail in seconds, with one line, unless `address` answers like a Ray cluster.

    `ray.init` retries a silent or foreign port for minutes. A TCP connection proves
    only that something listens; Ray's GCS and client server speak gRPC, so the
    check also completes an HTTP/2 (gRPC) handshake there: a web server, a database
    or a port that never answers fails it.
    """
    if not address or address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise UserError(f"{address} is a dashboard URL (for `submit`/`status`); a driver joins the cluster at its "
                        f"GCS address (<head>:6379) or a Ray client address (ray://<head>:10001)")
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        host, port = hostport, "10001" if address.startswith("ray://") else "6379"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise UserError(f"cannot reach Ray at {address}: {err.strerror or err}") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a TLS cluster: an insecure handshake proves nothing either way
    import grpc  # heavy: grpc only to probe an address given

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise UserError(f"{address} accepts connections but does not answer like Ray (no gRPC handshake within "
                        f"{timeout:g} s): is it the GCS port (6379) or the Ray client port (10001)?") from None
    finally:
        channel.close()


MAX_GPUS_ENV = "PERSONA_MAX_GPUS"


def max_gpus() -> int:
    """The GPUs the cluster can scale to (PERSONA_MAX_GPUS, set by cluster/*.yaml to maxReplicas x
    GPUs per worker); 0 when unset. Pools are sized for this many GPU actors: those that do not fit
    yet stay pending and the autoscaler adds workers for them."""
    value = os.environ.get(MAX_GPUS_ENV, "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise UserError(f"{MAX_GPUS_ENV}={value!r}: expected a whole number of GPUs")
    return int(value)


def gpus_available() -> int:
    """GPUs to size GPU actor pools for: those present, or more where the cluster autoscales to more."""
    import ray  # heavy: ray only when a job runs

    return max(int(ray.cluster_resources().get("GPU", 0)), max_gpus())


def gpus_per_node() -> list[int]:
    """GPUs of each live node, plus the 1-GPU workers the autoscaler may still add (see `max_gpus`)."""
    import ray  # heavy: ray only when a job runs

    nodes = [int(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return nodes + [1] * max(0, max_gpus() - sum(nodes))


# ---------------------------------------------------------------------------- CLI conventions


class ListAction(argparse.Action):
    """One list convention for every option: ``a,b``, ``a b`` and a repeated flag all extend the list."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for value in values if isinstance(values, list) else [values]:
            for part in str(value).split(","):
                if part.strip():
                    items.append(self.item_type(part.strip(), option_string))
        if self.valid is not None:
            bad = [i for i in items if i not in self.valid]
            if bad:
                parser.error(f"{option_string}: unknown {', '.join(map(str, bad))} (choose from {', '.join(self.valid)})")
        setattr(namespace, self.dest, items)

    def __init__(self, option_strings, dest, item_type=str, valid=None, **kwargs):
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)
        self.valid = tuple(valid) if valid is not None else None
        self._type = item_type

    def item_type(self, text: str, flag: str | None):
        try:
            return self._type(text)
        except ValueError:
            raise argparse.ArgumentError(self, f"{text!r} is not a valid {getattr(self._type, '__name__', 'value')}")


def add_list(p, *flags: str, help: str, item_type=str, valid=None, metavar: str = "X", **kwargs) -> None:
    """A list option with the one convention (see `ListAction`)."""
    p.add_argument(*flags, action=ListAction, item_type=item_type, valid=valid, metavar=metavar, default=None,
                   help=f"{help} (comma- or space-separated, or repeated)", **kwargs)


def add_store_arg(p) -> None:
    """The `--store` option every subcommand shares (None: the config's store, else ./persona-store)."""
    p.add_argument("--store", default=None, type=store_url,
                   help="store URL: a folder, s3://bucket/prefix or memory:// (default ./persona-store)")


def store_url(text: str) -> str:
    """`--store`'s value, refused (never echoed) when it carries credentials."""
    problem = url_userinfo_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_common(p, *, model: bool = True, catalog: str | bool = False, address: bool = True,
               model_default: str | None = None, revision: bool = True) -> None:
    """--store, and as asked --model/--revision, --catalog, --address, spelled the same everywhere."""
    add_store_arg(p)
    if model:
        p.add_argument("--model", default=model_default,
                       help=f"model spec: smollm2-135m, tiny-random-llama, a hub id or a folder"
                            f"{f' (default {model_default})' if model_default else ''}")
        if revision:
            p.add_argument("--revision", default=None,
                           help="model revision (hub models; tiny-random-llama: its seed)")
    if catalog:
        required = catalog == "required"
        p.add_argument("--catalog", required=required, default=None if required else (catalog if isinstance(
            catalog, str) else None), help="persona catalog: a file, folder, URL, or 'builtin'")
    if address:
        p.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS, else a local Ray)")


PROGRESS_EVERY_ENV = "PERSONA_PROGRESS_EVERY_S"  # seconds between progress lines when stderr is not a terminal


def progress(total: int, desc: str):
    """Progress on stderr: a tqdm bar on a terminal; elsewhere (a job log, a file) a line
    "desc: N/M units, ... ETA ..." every PERSONA_PROGRESS_EVERY_S seconds (default 30) and at the end.
    PERSONA_PROGRESS=0 turns both off."""
    if os.environ.get("PERSONA_PROGRESS", "1") == "0":
        return tqdm(total=total, desc=desc, unit="unit", disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit="unit", dynamic_ncols=True)
    every = os.environ.get(PROGRESS_EVERY_ENV, "30")
    try:
        every_s = float(every)
    except ValueError:
        raise UserError(f"{PROGRESS_EVERY_ENV}={every!r}: expected seconds") from None
    return ProgressLines(total, desc, every_s)


class ProgressLines:
    """Progress as plain lines on stderr, for logs: the same calls as a tqdm bar (update, refresh, close)."""

    def __init__(self, total: int, desc: str, every_s: float = 30.0, clock: Callable[[], float] | None = None):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.clock = clock or (lambda: time.monotonic())
        self.n = 0
        self.started = self.last = self.clock()
        self.closed = False
        self._emit()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def refresh(self) -> None:
        """A line when the last one is `every_s` old (also called while nothing finishes)."""
        if not self.closed and self.clock() - self.last >= self.every_s:
            self._emit()

    def close(self) -> None:
        if not self.closed:
            self._emit(final=True)
            self.closed = True

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, final: bool = False) -> None:
        now = self.clock()
        self.last = now
        elapsed = now - self.started
        line = f"{self.desc}: {self.n}/{self.total} units, {_duration(elapsed)} elapsed"
        if final:
            line += " (done)" if self.n >= self.total else ""
        elif self.n and self.n < self.total:
            line += f", ETA {_duration(elapsed / self.n * (self.total - self.n))}"
        print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
