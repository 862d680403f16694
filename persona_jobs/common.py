"""What every job shares: connecting to Ray, progress, and closing summaries."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), or start a local one.

    A process that already called `ray.init` (a test session, a driver under
    `ray job submit`) keeps its connection.
    """
    import ray

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
        from persona_jobs.cli import UserError

        raise UserError(f"cannot reach Ray at {address or 'a new local cluster'}: {err}") from err


def check_ray_address(address: str | None, timeout: float = 10.0) -> None:
    """Fail in seconds, with one line, unless `address` answers like a Ray cluster.

    `ray.init` retries a silent or foreign port for minutes. A TCP connection proves
    only that something listens; Ray's GCS and client server speak gRPC, so the
    check also completes an HTTP/2 (gRPC) handshake there: a web server, a database
    or a port that never answers fails it.
    """
    from persona_jobs.cli import UserError

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
    import grpc

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
        from persona_jobs.cli import UserError

        raise UserError(f"{MAX_GPUS_ENV}={value!r}: expected a whole number of GPUs")
    return int(value)


def gpus_available() -> int:
    """GPUs to size GPU actor pools for: those present, or more where the cluster autoscales to more."""
    import ray

    return max(int(ray.cluster_resources().get("GPU", 0)), max_gpus())


def gpus_per_node() -> list[int]:
    """GPUs of each live node, plus the 1-GPU workers the autoscaler may still add (see `max_gpus`)."""
    import ray

    nodes = [int(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return nodes + [1] * max(0, max_gpus() - sum(nodes))


@dataclass
class Summary:
    """Counts a job reports when it ends (and writes into run manifests)."""

    stage: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    def finish(self) -> "Summary":
        self.seconds = time.time() - self.started
        return self

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def line(self) -> str:
        parts = [f"{self.stage}: {self.done} done, {self.skipped} skipped, {self.failed} failed"]
        if self.tokens:
            rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
            parts.append(f"{self.tokens} tokens, {rate:,.0f} tokens/s")
        parts.append(f"{self.seconds:.1f} s")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "tokens": self.tokens, "seconds": round(self.seconds, 3), "errors": self.errors[:20]}


def add_store_arg(p) -> None:
    """The `--store` option every subcommand shares (None: the config's store, else ./persona-store)."""
    p.add_argument("--store", default=None,
                   help="store URL: a folder, s3://bucket/prefix or memory:// (default ./persona-store)")


def progress(total: int, desc: str):
    """A tqdm bar on stderr (quiet when not a terminal and PERSONA_PROGRESS=0)."""
    from tqdm import tqdm

    disable = os.environ.get("PERSONA_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit="unit", disable=disable, dynamic_ncols=True)
