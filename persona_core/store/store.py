"""The artifact store: one small API over any fsspec URL.

A local folder (the default, ``./persona-store``), ``s3://bucket/prefix`` through
s3fs, or ``memory://`` in tests. Keys are ``/``-separated paths relative to the
store's root. Every write publishes atomically: a reader sees the whole artifact
or nothing (local files are written to a temporary name and renamed; object
stores publish a single PUT whole).

S3 credentials come from the usual AWS variables and config files; the endpoint
from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) or the store options.
Nothing here ever logs a credential: URLs in messages go through `redact.redact`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from persona_core.store import layout
from persona_core.store.redact import redact, url_userinfo_problem

if TYPE_CHECKING:
    import pyarrow.dataset as pads

log = logging.getLogger(__name__)

DEFAULT_STORE = "./persona-store"


class StoreError(RuntimeError):
    """A store cannot be reached, read or written; the message names the URL or key."""


class StoreUnreachable(StoreError):
    """The store's server cannot be reached at all (endpoint down, DNS, refused connection)."""


def _unreachable(err: BaseException) -> bool:
    """Whether `err` says the object store's endpoint could not be reached (any client layer)."""
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                         "ClientConnectorError", "ServerDisconnectedError", "ProxyConnectionError"})


def _filesystem(url: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol, _, rest = url.partition("://")
    if url_userinfo_problem(url):  # never echoed: the message shows the host alone
        raise StoreError(url_userinfo_problem(url))
    if not rest:
        return fsspec.filesystem("file"), str(Path(url).expanduser().absolute())
    opts = dict(options)
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts:
            opts["endpoint_url"] = endpoint
        # Other workers write to the same bucket: never answer a listing from a cache.
        opts.setdefault("use_listings_cache", False)
        opts.setdefault("skip_instance_cache", True)
    fs = fsspec.filesystem(protocol, **opts)
    root = fs._strip_protocol(url).rstrip("/")
    return fs, root


@dataclass
class Store:
    """An artifact store rooted at `url`. Safe to pickle (workers rebuild the filesystem)."""

    url: str = DEFAULT_STORE
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.url = str(self.url)
        self._fs = None
        self._root = None

    def __getstate__(self):
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state):
        self.url, self.options = state["url"], state["options"]
        self._fs = self._root = None

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, self._root = _filesystem(self.url, self.options)
        return self._fs

    @property
    def root(self) -> str:
        self.fs
        return self._root

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, key: str) -> str:
        """The filesystem path of a key (no protocol)."""
        key = key.strip("/")
        return f"{self.root}/{key}" if key else self.root

    def uri(self, key: str = "") -> str:
        """A full URL for a key, usable by other tools (credentials in the store URL redacted)."""
        if self.is_local:
            return redact(self.path(key))
        return redact(self.fs.unstrip_protocol(self.path(key)))

    def __repr__(self) -> str:  # options may hold keys: never shown
        return f"Store({redact(self.url)!r})"

    # ------------------------------------------------------------------ bytes

    @contextmanager
    def _reaching(self):
        """An unreachable endpoint becomes one StoreUnreachable naming the store, not a client traceback."""
        try:
            yield
        except Exception as err:
            if not _unreachable(err):
                raise
            endpoint = self.options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") \
                or os.environ.get("AWS_ENDPOINT_URL")
            where = f" (endpoint {endpoint})" if endpoint and not self.is_local else ""
            reason = str(err).split(":", 1)[0].strip() or type(err).__name__
            raise StoreUnreachable(redact(f"cannot reach the store {self.url}{where}: {reason}")) from None

    def exists(self, key: str) -> bool:
        with self._reaching():
            return self.fs.exists(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        try:
            with self._reaching():
                return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)}: not in the store") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Publish `data` at `key` atomically: readers never see a partial object."""
        path = self.path(key)
        try:
            if self.is_local:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                with self._reaching():
                    self.fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
        except OSError as err:
            raise StoreError(f"cannot write {self.uri(key)}: {err}") from err

    def inside(self, key: str) -> bool:
        """Whether `key` names a file within the store's root: on a local store, its folder (and, unless
        the key is itself a symlink, which deleting removes alone, the file) resolve inside the resolved
        root, so no symlink on the way leads out. Object stores have no links: always true there."""
        if not self.is_local:
            return True
        path = self.path(key)
        root = os.path.realpath(self.root)
        within = lambda p: p == root or p.startswith(root.rstrip(os.sep) + os.sep)  # noqa: E731
        if not within(os.path.realpath(os.path.dirname(path))):
            return False
        return os.path.islink(path) or within(os.path.realpath(path))

    def delete(self, key: str, recursive: bool = False) -> None:
        """Remove `key` (a missing one is no error). On a local store, a key that resolves outside the
        root through a symlink is refused (StoreError), so nothing outside the store is ever deleted."""
        if not self.inside(key):
            raise StoreError(f"refusing to delete {self.uri(key)}: it resolves to "
                             f"{redact(os.path.realpath(self.path(key)))}, outside the store root {self.uri()}")
        try:
            with self._reaching():
                self.fs.rm(self.path(key), recursive=recursive)
        except FileNotFoundError:
            pass

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Keys (relative to the root) of every object under `prefix`, sorted."""
        base = self.path(prefix)
        try:
            with self._reaching():
                found = self.fs.find(base)
        except FileNotFoundError:
            found = []
        if not found and not self.is_local and "s3" in _protocols(self.fs):
            bucket = self.root.split("/", 1)[0]  # nothing listed: an empty prefix, or no bucket at all?
            with self._reaching():
                if not self.fs.exists(bucket):  # unreachable as a store: one line wherever it surfaces
                    raise StoreUnreachable(redact(f"store {self.url}: bucket {bucket!r} does not exist "
                                                  "(create it, or fix the store URL)"))
        root = self.root.rstrip("/") + "/"
        keys = []
        for p in found:
            p = self.fs._strip_protocol(p)
            key = p[len(root):] if p.startswith(root) else p
            if ".tmp-" in key.rsplit("/", 1)[-1] or not key.endswith(suffix):
                continue
            keys.append(key)
        return sorted(keys)

    def check_writable(self) -> None:
        """Fail early, with the URL named, if this store cannot be written."""
        key = layout.probe(uuid.uuid4().hex)
        self.write_bytes(key, b"ok")
        self.delete(key)

    # ------------------------------------------------------------------ JSON

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as err:
            raise StoreError(f"{self.uri(key)}: not valid JSON ({err})") from err

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    # ------------------------------------------------------------------ Parquet

    def write_parquet(self, key: str, table: pa.Table, **kwargs) -> None:
        """Write one Parquet file, serialised in memory, then published whole."""
        buf = io.BytesIO()
        kwargs.setdefault("compression", "zstd")
        pq.write_table(table, buf, **kwargs)
        self.write_bytes(key, buf.getvalue())

    def read_parquet(self, key: str, columns: list[str] | None = None) -> pa.Table:
        data = self.read_bytes(key)
        try:
            return parquet_file(data).read(columns=columns)
        except pa.ArrowInvalid as err:
            raise StoreError(f"{self.uri(key)}: corrupt Parquet file ({err})") from err

    def dataset(self, prefix: str, **kwargs) -> pads.Dataset:
        """A pyarrow dataset over every Parquet file under `prefix`, hive-partitioned."""
        import pyarrow.dataset as pads  # heavy (pulls in pandas, about 0.7 s): only for dataset queries
        from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem  # with pyarrow.dataset, for it alone

        filesystem = LocalFileSystem() if self.is_local else PyFileSystem(FSSpecHandler(self.fs))
        base = self.path(prefix)
        files = [self.path(k) for k in self.list(prefix, suffix=".parquet")]
        kwargs.setdefault("partitioning", "hive")
        return pads.dataset(files, filesystem=filesystem, partition_base_dir=base, format="parquet", **kwargs)

    # ------------------------------------------------------------------ safetensors

    def write_safetensors(self, key: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save  # imports torch: only for stores that hold tensors

        self.write_bytes(key, save(tensors, metadata=metadata))

    def read_safetensors(self, key: str) -> tuple[dict, dict[str, str]]:
        """Tensors and metadata; safetensors never unpickles anything."""
        from safetensors.torch import load  # imports torch: only for stores that hold tensors

        data = self.read_bytes(key)
        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
        except Exception as err:
            raise StoreError(f"{self.uri(key)}: corrupt safetensors file ({err})") from err
        return tensors, metadata


def arrow_buffer(data: bytes) -> pa.Buffer:
    """`data` copied into memory that Arrow owns, for Arrow readers.

    Arrow's thread pools may drop the last reference to an input buffer after the
    interpreter has started to shut down. Releasing a Python-owned buffer
    (``pa.BufferReader(bytes)``) then takes the GIL in a finalizing interpreter, which
    ends that pool thread with a forced unwind through C++ and ``std::terminate``
    ("terminate called without an active exception", exit 134, issue 12 item 10). An
    Arrow-owned copy is freed without Python, from any thread.
    """
    buf = pa.allocate_buffer(len(data))
    if data:
        pa.FixedSizeBufferWriter(buf).write(data)
    return buf


def parquet_file(data: bytes) -> pq.ParquetFile:
    """A Parquet reader over in-memory bytes (an Arrow-owned copy, see `arrow_buffer`)."""
    return pq.ParquetFile(pa.BufferReader(arrow_buffer(data)))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def open_store(url: str | Store | None = None, **options) -> Store:
    if isinstance(url, Store):
        return url
    return Store(url or DEFAULT_STORE, options)
