"""A lease in the store: one holder at a time, with an expiry.

Used by the nightly run so that two overlapping runs on one store do not both
work: one acquires the lease and proceeds, the other finds it held and exits.
The lease is a small JSON object at ``leases/<name>.json``::

    {"name", "owner", "token", "host", "pid", "acquired", "expires"}

Guarantees, by backend
----------------------
* Local folders (and NFS): the lease is written whole under a private name and
  published with ``link(2)``, which fails if the lease exists, so of several
  racing processes exactly one wins and nobody reads a half-written lease.
  Taking over an *expired* lease renames it to a unique name first (only one
  rename of a file succeeds) and checks that what it moved is the expired
  lease it read; if it moved a fresh one by mistake it is linked back.
* S3 servers with conditional writes (AWS S3 since 2024, moto, MinIO):
  acquiring is ``PutObject`` with ``If-None-Match: *``; taking over an expired
  lease and renewing are ``PutObject`` with ``If-Match: <etag>``. Exactly one
  racer wins; the others get ``412 Precondition Failed``.
* S3 servers that ignore conditional headers (detected once per store by a
  probe): write-then-verify. The lease is written with the holder's random
  token, the writer waits `settle_s`, reads it back and proceeds only if its
  token is still there. Two racers whose writes both land before either
  reads back lose the race together (neither proceeds), but two whose
  write/read windows do not overlap in that way could both proceed. This is
  a best-effort mutex; the artifacts themselves are content-addressed and
  idempotent, so a duplicate run wastes compute but corrupts nothing.

Expiry uses the wall clock of the machines involved: keep clocks in sync
(NTP), and choose a TTL much longer than the renewal interval. A holder that
cannot renew (its lease was taken over after it expired) learns so from
`renew()` / `check()` and must stop writing run-level records.

Nothing here imports Ray.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from persona_core.store import layout
from persona_core.store.store import Store, StoreError

log = logging.getLogger(__name__)

PREFIX = layout.LEASES


class LeaseHeld(RuntimeError):
    """The lease is held by someone else (not expired)."""

    def __init__(self, info: "LeaseInfo"):
        self.info = info
        left = max(0.0, info.expires - time.time())
        super().__init__(f"lease {info.name!r} is held by {info.owner} (pid {info.pid} on {info.host}) "
                         f"until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.expires))} "
                         f"({left:.0f} s left)")


class LeaseLost(RuntimeError):
    """This holder's lease expired and was taken, or was removed."""


@dataclass
class LeaseInfo:
    name: str
    owner: str
    token: str
    host: str
    pid: int
    acquired: float
    expires: float

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseInfo":
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


class Lease:
    """A named lease in `store`; use as a context manager or acquire()/release().

    With `renew_every_s`, a daemon thread renews the lease while it is held.
    """

    def __init__(self, store: Store, name: str, ttl_s: float = 3600, *, owner: str = "",
                 renew_every_s: float | None = None, settle_s: float = 1.0):
        if ttl_s <= 0:
            raise ValueError("lease ttl must be positive")
        self.store, self.name, self.ttl_s = store, name, float(ttl_s)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.renew_every_s = renew_every_s
        self.settle_s = settle_s
        self.key = layout.lease(name)
        self.info: LeaseInfo | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # ------------------------------------------------------------------ public

    def acquire(self) -> LeaseInfo:
        """Take the lease or raise LeaseHeld (naming the current holder)."""
        info = self._new_info()
        if self.store.is_local:
            self._acquire_local(info)
        elif _conditional_writes(self.store):
            self._acquire_conditional(info)
        else:
            self._acquire_verify(info)
        self.info, self.lost = info, False
        log.info("acquired lease %s (%s, ttl %.0f s)", self.key, self.owner, self.ttl_s)
        if self.renew_every_s:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}", daemon=True)
            self._thread.start()
        return info

    def renew(self) -> None:
        """Push the expiry forward; raise LeaseLost if the lease is no longer ours."""
        if self.info is None:
            raise LeaseLost(f"lease {self.name!r} is not held")
        self.check()
        info = LeaseInfo(**{**asdict(self.info), "expires": time.time() + self.ttl_s})
        if self.store.is_local:
            self.store.write_bytes(self.key, info.to_bytes())  # only the holder writes a live lease
        elif _conditional_writes(self.store) and self._etag:
            self._etag = _put(self.store, self.key, info.to_bytes(), if_match=self._etag)
            if self._etag is None:
                self.lost = True
                raise LeaseLost(f"lease {self.name!r} was taken over")
        else:
            self.store.write_bytes(self.key, info.to_bytes())
        self.info = info

    def check(self) -> None:
        """Raise LeaseLost unless the stored lease still carries our token."""
        current = self.read()
        if self.info is None or current is None or current.token != self.info.token:
            self.lost = True
            holder = current.owner if current else "nobody"
            raise LeaseLost(f"lease {self.name!r} is no longer held by {self.owner} (now: {holder})")

    def release(self) -> None:
        """Give the lease back (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.info is None:
            return
        try:
            current = self.read()
            if current is not None and current.token == self.info.token:
                self.store.delete(self.key)
                log.info("released lease %s", self.key)
        except (OSError, StoreError) as err:  # the lease will expire on its own
            log.warning("could not release lease %s: %s", self.key, err)
        self.info = None

    def read(self) -> LeaseInfo | None:
        try:
            return LeaseInfo.from_bytes(self.store.read_bytes(self.key))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("lease %s is unreadable; treating it as expired", self.key)
            return LeaseInfo(self.name, "?", "?", "?", 0, 0.0, 0.0)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ backends

    def _new_info(self) -> LeaseInfo:
        now = time.time()
        return LeaseInfo(self.name, self.owner, uuid.uuid4().hex, socket.gethostname(), os.getpid(),
                         now, now + self.ttl_s)

    def _acquire_local(self, info: LeaseInfo) -> None:
        path = Path(self.store.path(self.key))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a private name, then published with link(2), which fails if the
        # lease exists: nobody ever sees a half-written lease, and of several racers one wins.
        tmp = path.with_name(f"{path.name}.tmp-{info.token}")
        tmp.write_bytes(info.to_bytes())
        try:
            for _ in range(5):
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    current = self.read()
                    if current is None:
                        continue  # released between our link and read: try again
                    if not current.expired:
                        raise LeaseHeld(current) from None
                    self._break_local(path, current)
                    continue
                return
            raise LeaseHeld(self.read() or info)
        finally:
            tmp.unlink(missing_ok=True)

    def _break_local(self, path: Path, expired: LeaseInfo) -> None:
        """Move an expired lease aside; only one racer's rename succeeds."""
        tomb = path.with_name(f"{path.name}.expired-{uuid.uuid4().hex}")
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            return
        try:
            moved = LeaseInfo.from_bytes(tomb.read_bytes())
        except (ValueError, KeyError, TypeError):
            moved = None
        if moved is not None and moved.token != expired.token and not moved.expired:
            # We moved a lease someone acquired after our read: put it back (fails if taken meanwhile).
            try:
                os.link(tomb, path)
            except FileExistsError:
                pass
        log.info("took over expired lease %s of %s", self.key, expired.owner)
        tomb.unlink(missing_ok=True)

    def _acquire_conditional(self, info: LeaseInfo) -> None:
        etag = _put(self.store, self.key, info.to_bytes(), if_none_match=True)
        if etag is None:
            current, current_etag = _read_with_etag(self.store, self.key)
            if current is None:  # released in between: one more try
                etag = _put(self.store, self.key, info.to_bytes(), if_none_match=True)
            elif current.expired and current_etag:
                etag = _put(self.store, self.key, info.to_bytes(), if_match=current_etag)
                if etag is not None:
                    log.info("took over expired lease %s of %s", self.key, current.owner)
            if etag is None:
                raise LeaseHeld(self.read() or current or info)
        self._etag = etag

    def _acquire_verify(self, info: LeaseInfo) -> None:
        current = self.read()
        if current is not None and not current.expired:
            raise LeaseHeld(current)
        self.store.write_bytes(self.key, info.to_bytes())
        time.sleep(self.settle_s)
        now = self.read()
        if now is None or now.token != info.token:
            raise LeaseHeld(now or info)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except LeaseLost as err:
                log.error("%s", err)
                return
            except Exception as err:  # a transient store error: try again next time
                log.warning("lease renewal failed: %s", err)


# ---------------------------------------------------------------------------- S3 helpers


def _s3_call(store: Store, method: str, **kwargs):
    fs = store.fs
    bucket, key, _ = fs.split_path(store.path(kwargs.pop("key")))
    return fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)


def _is_precondition(err: BaseException | None) -> bool:
    """A failed If-Match / If-None-Match (412), or a concurrent conditional write (409)."""
    while err is not None:
        response = getattr(err, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = f"{type(err).__name__} {err}"
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412) \
                or "pre-conditions you specified did not hold" in text or "PreconditionFailed" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def _put(store: Store, key: str, data: bytes, *, if_none_match: bool = False,
         if_match: str | None = None) -> str | None:
    """A conditional PUT; the new ETag, or None when the condition failed."""
    kwargs = {"IfNoneMatch": "*"} if if_none_match else {}
    if if_match:
        kwargs["IfMatch"] = if_match
    try:
        out = _s3_call(store, "put_object", key=key, Body=data, **kwargs)
    except Exception as err:
        if _is_precondition(err):
            return None
        raise StoreError(f"cannot write {store.uri(key)}: {err}") from err
    return out.get("ETag")


def _read_with_etag(store: Store, key: str) -> tuple[LeaseInfo | None, str | None]:
    """The lease and the ETag of exactly that version (re-read if it changed in between)."""
    for _ in range(5):
        try:
            before = _s3_call(store, "head_object", key=key).get("ETag")
            data = store.read_bytes(key)
            after = _s3_call(store, "head_object", key=key).get("ETag")
        except FileNotFoundError:
            return None, None
        if before == after:
            try:
                return LeaseInfo.from_bytes(data), after
            except (ValueError, KeyError, TypeError):
                return LeaseInfo("?", "?", "?", "?", 0, 0.0, 0.0), after
    raise StoreError(f"{store.uri(key)}: changes too fast to read")


_PROBED: dict[str, bool] = {}


def _conditional_writes(store: Store) -> bool:
    """Whether this S3 server honours If-None-Match on PUT (probed once per store URL)."""
    if store.url in _PROBED:
        return _PROBED[store.url]
    key = layout.lease_probe(uuid.uuid4().hex)
    try:
        first = _put(store, key, b"1", if_none_match=True)
        second = _put(store, key, b"2", if_none_match=True)
        supported = first is not None and second is None
    except StoreError as err:
        log.warning("conditional-write probe failed (%s); using write-then-verify leases", err)
        supported = False
    finally:
        store.delete(key)
    if not supported:
        log.warning("%s ignores conditional writes: leases fall back to write-then-verify "
                    "(best effort; see persona_core/lease.py)", store.url)
    _PROBED[store.url] = supported
    return supported
