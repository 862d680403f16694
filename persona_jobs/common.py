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
from typing import Callable

from tqdm import tqdm

from persona_core.errors import UserError
from persona_core.run.plan import Plan
from persona_core.run.runs import Summary
from persona_core.store.store import StoreError

log = logging.getLogger(__name__)


def preflight(p: Plan, need_ray: bool = True) -> None:
    """Store writable and (when asked) Ray reachable, checked before any work (nothing is written but a probe)."""
    try:
        p.store.check_writable()
    except (StoreError, OSError, ValueError) as err:
        raise UserError(f"store {p.config.store} cannot be written: {err}") from None
    if need_ray:
        ensure_ray(p.config.address or os.environ.get("RAY_ADDRESS"))  # checks the address first


def run_alone(plan: Plan, stage: Callable[[Plan], Summary]) -> int:
    """A standalone subcommand: preflight (Ray is joined once there is work to do), one stage, its summary."""
    preflight(plan, need_ray=False)
    summary = stage(plan)
    print(summary.line())
    for err in summary.errors:
        print(f"  {err}")
    return 0 if summary.ok else 1


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
    try:
        if address:
            ray.init(address=address, log_to_driver=False, **init_kwargs)
        else:
            init_kwargs.setdefault("include_dashboard", False)
            ray.init(log_to_driver=False, **init_kwargs)
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
    p.add_argument("--store", default=None,
                   help="store URL: a folder, s3://bucket/prefix or memory:// (default ./persona-store)")


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


def progress(total: int, desc: str):
    """A tqdm bar on stderr (quiet when not a terminal and PERSONA_PROGRESS=0)."""
    disable = os.environ.get("PERSONA_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit="unit", disable=disable, dynamic_ncols=True)
