"""Content hashes: every artifact is keyed by a hash of what produced it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

HASH_LEN = 16


def _default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, bytes):
        return hashlib.sha256(obj).hexdigest()
    if hasattr(obj, "as_posix"):
        return obj.as_posix()
    raise TypeError(f"cannot hash object of type {type(obj).__name__}")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_default)


def content_hash(*parts: Any) -> str:
    """A short, stable hex digest of any JSON-able values (dataclasses included)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(canonical_json(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:HASH_LEN]


def file_digest(path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
