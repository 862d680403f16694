"""Keep-masks on disk: bit-packed safetensors, optionally delta-coded against a base mask.

A mask file is a plain safetensors file holding one ``uint8`` tensor per module:

* ``encoding=bits``:  the keep-mask, row-major, 8 weights per byte (``np.packbits``,
  little bit order): exactly 1 bit per weight.
* ``encoding=delta``: the positions where the mask differs from a base mask (another
  mask file in the store, named in the header), as gaps between flipped positions,
  byte-shuffled and zstd-compressed. Decoding is exact; the base's content digest is
  checked so a delta is never applied to the wrong base.

The header's ``__metadata__`` (strings only) holds the format, encoding, module shapes,
a content digest of the decoded masks, the caller's metadata as JSON (model key,
method, parameters, sparsity, hashes of the statistics used, ...), the owner the key
names (``owner``: model, method segment, level, persona, calibration config), a payload
digest of every module's stored bytes (``payload``) and a digest of all of these
(``header_digest``).

Reading parses the JSON header and raw bytes only: nothing is ever unpickled, and
nothing is used before it is verified (see `MaskFile`), including that the file is the
one its key names: a mask moved or swapped to another key (introvert's file under
extrovert's name) is refused. `MaskFile` reads one module at a time (a ranged read of
just its bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import torch
from safetensors.numpy import save

from persona_core.store import layout
from persona_core.store.store import Store, StoreError

log = logging.getLogger(__name__)

FORMAT = "persona-mask/v2"  # v2: payload and header digests
OLD_FORMAT = "persona-mask/v1"
CODEC = "zstd"
MAX_HEADER = 1 << 27
# A mask key: masks/<segment>/.../<name>.safetensors, segments of these characters, none '.' or '..'.
_KEY_SEGMENT = re.compile(r"[A-Za-z0-9_=@~+:,-][A-Za-z0-9._=@~+:,-]*")


def _bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _header_digest(header: Mapping[str, str]) -> str:
    """Digest of every header field but itself: an edited shape or metadata field changes it."""
    fields = {k: v for k, v in header.items() if k != "header_digest"}
    return _bytes_digest(json.dumps(fields, sort_keys=True).encode())


def key_owner(key: str) -> dict[str, str] | None:
    """What a mask key says its file is (model, method segment, level, owner, calibration config);
    None for a key outside the store layout (nothing to compare a header with)."""
    ref = layout.parse_mask(key)
    if ref is None:
        return None
    return {"model": ref.model_key, "method": ref.method, "level": ref.level, "owner": ref.owner, "calib": ref.calib}


def owner_problem(key: str, header: Mapping[str, str], metadata: object) -> str:
    """Why the mask header `header` (with its decoded `metadata`) is not the file `key` names; "" when it is.

    A header with ``owner`` must name exactly the key's model, method, level, owner and calibration
    config. One written before headers named their key is checked on what its metadata recorded: the
    persona and model key (every mask the system wrote has both), and the calibration config where
    recorded."""
    want = key_owner(key)
    if want is None:
        return ""
    if "owner" in header:
        try:
            got = json.loads(header["owner"])
        except (TypeError, ValueError):
            got = None
        if not isinstance(got, dict):
            return "its header's owner field is not a JSON object"
        for name, value in want.items():
            if got.get(name) != value:
                return f"its header names {name} {got.get(name)!r}, its key {value!r} (moved or swapped?)"
        return ""
    meta = metadata if isinstance(metadata, dict) else {}
    for name, field in (("owner", "persona"), ("model", "model_key")):
        if field not in meta:
            return f"its header names no {name} ({field!r} missing from its metadata), so it cannot be matched to its key"
        if meta[field] != want[name]:
            return f"its header names {name} {meta[field]!r}, its key {want[name]!r} (moved or swapped?)"
    recorded = {meta["calib_hash"]} if meta.get("calib_hash") else set()
    versions = meta.get("stats_versions")
    if isinstance(versions, dict):
        recorded |= {v.get("calib_hash") for v in versions.values() if isinstance(v, dict) and v.get("calib_hash")}
    if want["calib"] and recorded and recorded != {want["calib"]}:
        return f"its header names calib {sorted(map(str, recorded))}, its key {want['calib']!r} (moved or swapped?)"
    return ""


def is_mask_key(key: str) -> bool:
    """Whether `key` is a relative key under ``masks/`` naming a ``.safetensors`` file (no '..', no URL)."""
    if not isinstance(key, str) or not key.startswith("masks/") or not key.endswith(".safetensors"):
        return False
    return all(_KEY_SEGMENT.fullmatch(seg) and seg not in (".", "..") for seg in key.split("/"))


def check_base_key(key: str, base_key, where: str | None = None) -> None:
    """A delta's base must be another mask key of the same store (and of the same model)."""
    where = where or key
    if not is_mask_key(base_key):
        raise StoreError(f"{where}: delta base {base_key!r} is not a mask key of this store")
    if base_key == key:
        raise StoreError(f"{where}: a delta mask cannot be its own base")
    model = lambda k: next((s for s in k.split("/") if s.startswith("model=")), None)  # noqa: E731
    if model(key) != model(base_key):
        raise StoreError(f"{where}: delta base {base_key!r} belongs to another model")


# ---------------------------------------------------------------------------- bits


def pack(mask: torch.Tensor) -> np.ndarray:
    """A bool mask as packed bits (1 bit per element, row-major, little bit order)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"masks must be bool tensors, got {mask.dtype}")
    return np.packbits(mask.detach().cpu().contiguous().numpy().reshape(-1), bitorder="little")


def unpack(packed: np.ndarray, shape: Iterable[int]) -> torch.Tensor:
    shape = tuple(shape)
    n = int(np.prod(shape))
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=n, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def digest(packed: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> str:
    """Content digest of a whole mask (names, shapes, packed bits)."""
    h = hashlib.sha256()
    for name in sorted(packed):
        h.update(f"{name}:{list(shapes[name])}\x00".encode())
        h.update(np.ascontiguousarray(packed[name]).tobytes())
    return h.hexdigest()[:32]


def _delta_encode(mask_packed: np.ndarray, base_packed: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    flips = np.unpackbits(mask_packed ^ base_packed, count=n, bitorder="little")
    pos = np.flatnonzero(flips)
    if pos.size == 0:
        return np.zeros(0, dtype=np.uint8), 0
    gaps = np.diff(pos, prepend=-1).astype(np.uint32) - 1  # >= 0
    shuffled = gaps.view(np.uint8).reshape(-1, 4).T.copy()  # low bytes together, high bytes together
    comp = pa.compress(shuffled.tobytes(), codec=CODEC, asbytes=True)
    return np.frombuffer(comp, dtype=np.uint8).copy(), int(pos.size)


def _delta_decode(data: np.ndarray, count: int, base_packed: np.ndarray, n: int) -> np.ndarray:
    flips = np.zeros(n, dtype=np.uint8)
    if count:
        raw = pa.decompress(data.tobytes(), decompressed_size=4 * count, codec=CODEC, asbytes=True)
        gaps = np.frombuffer(raw, dtype=np.uint8).reshape(4, count).T.copy().view(np.uint32).reshape(-1)
        pos = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if pos[-1] >= n:
            raise ValueError("delta mask has a position past the end of the module")
        flips[pos] = 1
    return base_packed ^ np.packbits(flips, bitorder="little")


# ---------------------------------------------------------------------------- encode


def encode_mask(masks: Mapping[str, torch.Tensor], metadata: Mapping, *,
                base: Mapping[str, torch.Tensor] | None = None, base_key: str | None = None,
                key: str | None = None) -> bytes:
    """The bytes of a mask file; with `base` (and its store key), delta-coded against it; with the
    `key` it will be stored at, the owner that key names (checked by every read)."""
    if not masks:
        raise ValueError("no masks to encode")
    shapes = {name: tuple(m.shape) for name, m in masks.items()}
    packed = {name: pack(m) for name, m in masks.items()}
    header = {"format": FORMAT, "shapes": json.dumps(shapes), "digest": digest(packed, shapes),
              "meta": json.dumps(dict(metadata), sort_keys=True, default=str)}
    owner = key_owner(key) if key else None
    if owner is not None:
        header["owner"] = json.dumps(owner, sort_keys=True)
    if base is None:
        header["encoding"] = "bits"
        tensors = packed
    else:
        if not base_key:
            raise ValueError("delta coding needs the base mask's store key")
        missing = sorted(set(masks) - set(base))
        bad = [n for n in masks if n in base and tuple(base[n].shape) != shapes[n]]
        if missing or bad:
            raise ValueError(f"base mask does not match: missing {missing[:3]}, shape differs {bad[:3]}")
        base_packed = {name: pack(base[name]) for name in masks}
        tensors, counts = {}, {}
        for name in masks:
            tensors[name], counts[name] = _delta_encode(packed[name], base_packed[name], masks[name].numel())
        header.update(encoding="delta", base=base_key, counts=json.dumps(counts),
                      base_digest=digest(base_packed, shapes))
    header["payload"] = json.dumps({name: _bytes_digest(np.ascontiguousarray(t).tobytes())
                                    for name, t in tensors.items()}, sort_keys=True)
    header["header_digest"] = _header_digest(header)
    return save(tensors, metadata=header)


def write_mask(store: Store, key: str, masks: Mapping[str, torch.Tensor], metadata: Mapping, *,
               base: Mapping[str, torch.Tensor] | None = None, base_key: str | None = None) -> int:
    """Publish a mask file at `key` (atomically); delta-coded when `base_key` is given.

    With `base_key` but no `base`, the base masks are read (verified) from the store; the
    base must be a mask key of the same store. Returns the number of bytes written.
    """
    if base_key is not None:
        check_base_key(key, base_key, store.uri(key))
    if base_key is not None and base is None:
        base, _ = read_mask(store, base_key, names=list(masks))
    data = encode_mask(masks, metadata, base=base, base_key=base_key, key=key)
    store.write_bytes(key, data)
    return len(data)


# ---------------------------------------------------------------------------- decode


class MaskFile:
    """A mask file in the store, verified as it is read: the header once, each module on demand.

    Opening checks, before anything is allocated: every size the header states against the file's
    real size, the header's own digest (so edited ``shapes`` or metadata are refused), the owner the
    header names against the key's (`owner_problem`: a swapped or moved file is refused), one entry of
    the right length per module, no zero-length module data, and for a delta a base key that is a
    mask key of this store. Each module's bytes are checked against their payload digest before
    they are decoded; `read` of every module also checks the decoded masks against the content
    digest and records it as `read_digest` (the digest of what was actually read).
    """

    def __init__(self, store: Store, key: str, _depth: int = 0):
        self.store, self.key = store, key
        self.read_digest: str | None = None
        where = store.uri(key)
        path = store.path(key)
        try:
            self.size = int(store.fs.size(path))
            head = store.fs.cat_file(path, start=0, end=8) if self.size >= 8 else b""
            if len(head) != 8:
                raise ValueError(f"file of {self.size} bytes is shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if not 0 < n <= min(self.size - 8, MAX_HEADER):
                raise ValueError(f"header length {n} does not fit a file of {self.size} bytes")
            text = store.fs.cat_file(path, start=8, end=8 + n)
            if len(text) != n:
                raise ValueError("truncated header")
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("header is not a JSON object")
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: no mask there") from None
        except (ValueError, OSError) as err:
            raise StoreError(f"{where}: not a mask file ({err})") from err
        self._offset = 8 + n
        header = raw.pop("__metadata__", None) or {}
        if not isinstance(header, dict) or header.get("format") not in (FORMAT, OLD_FORMAT):
            fmt = header.get("format") if isinstance(header, dict) else None
            raise StoreError(f"{where}: not a {FORMAT} file (format {fmt!r})")
        if header["format"] == OLD_FORMAT:
            raise StoreError(f"{where}: written by an older version without payload digests, so it cannot be "
                             "verified; rebuild it (persona-jobs run --repair, or delete it and build-masks)")
        if header.get("header_digest") != _header_digest(header):
            raise StoreError(f"{where}: header digest mismatch (its shapes or metadata were changed after writing)")
        try:
            self.header = header
            self.encoding = header["encoding"]
            self.shapes = {k: tuple(int(d) for d in v) for k, v in json.loads(header["shapes"]).items()}
            self.metadata = json.loads(header["meta"])
            self._payload = json.loads(header["payload"])
            self.counts = {k: int(v) for k, v in json.loads(header.get("counts") or "{}").items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise StoreError(f"{where}: malformed mask header ({type(err).__name__}: {err})") from err
        problem = owner_problem(key, header, self.metadata)
        if problem:
            raise StoreError(f"{where}: not the mask its key names: {problem}; rebuild it "
                             "(persona-jobs run --repair, or build-masks)")
        self._base = None
        self._depth = _depth
        if self.encoding == "delta":
            if _depth > 8:
                raise StoreError(f"{where}: delta chain too long")
            check_base_key(key, header.get("base"), where)
        elif self.encoding != "bits":
            raise StoreError(f"{where}: unknown encoding {self.encoding!r}")
        self._entries = self._check_entries(raw, where)

    def _check_entries(self, raw: dict, where: str) -> dict[str, tuple[int, int]]:
        """(start, end) of every module's bytes, each bounded by the real file size."""
        if set(raw) != set(self.shapes) or set(self._payload) != set(self.shapes):
            raise StoreError(f"{where}: modules in the header, the shapes and the payload digests differ")
        data_size = self.size - self._offset
        out = {}
        for name, shape in self.shapes.items():
            entry = raw[name]
            n = math.prod(shape)  # exact: a huge claimed shape must not wrap around
            if any(d < 0 for d in shape) or n == 0:
                raise StoreError(f"{where}: module {name!r} has an empty shape {list(shape)} (zero-length data)")
            if not isinstance(entry, dict) or entry.get("dtype") != "U8":
                raise StoreError(f"{where}: module {name!r} is not U8 data")
            try:
                start, end = (int(x) for x in entry["data_offsets"])
                (length,) = (int(x) for x in entry["shape"])
            except (KeyError, TypeError, ValueError) as err:
                raise StoreError(f"{where}: module {name!r}: malformed entry ({err})") from None
            if not 0 <= start <= end <= data_size or end - start != length:
                raise StoreError(f"{where}: module {name!r}: bytes {start}..{end} outside the file's "
                                 f"{data_size} data bytes (truncated?)")
            if self.encoding == "bits":
                if length == 0:
                    raise StoreError(f"{where}: module {name!r} has zero-length data")
                if length != (n + 7) // 8:
                    raise StoreError(f"{where}: module {name!r}: {length} bytes cannot hold shape {list(shape)}")
            else:
                count = self.counts.get(name)
                if count is None or not 0 <= count <= n or (count == 0) != (length == 0):
                    raise StoreError(f"{where}: module {name!r}: flip count {count} does not fit its "
                                     f"{length} bytes and {n} weights")
            out[name] = (start, end)
        return out

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def base(self) -> "MaskFile":
        if self._base is None:
            base = MaskFile(self.store, self.header["base"], self._depth + 1)
            where = self.store.uri(self.key)
            if base.header["digest"] != self.header.get("base_digest"):
                raise StoreError(f"{where}: its base {self.header['base']} has changed "
                                 "since the delta was written; rebuild this mask")
            bad = [n for n in self.shapes if base.shapes.get(n) != self.shapes[n]]
            if bad:
                raise StoreError(f"{where}: module shapes differ from its base's ({bad[:3]})")
            self._base = base
        return self._base

    def _raw(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise KeyError(f"{self.store.uri(self.key)}: no module {name!r}")
        start, end = self._entries[name]
        if end == start:
            data = b""
        else:
            data = self.store.fs.cat_file(self.store.path(self.key), start=self._offset + start,
                                          end=self._offset + end)
        if len(data) != end - start or _bytes_digest(data) != self._payload[name]:
            raise StoreError(f"{self.store.uri(self.key)}: module {name!r} fails its payload digest "
                             "(corrupt or truncated); rebuild it (persona-jobs run --repair)")
        return np.frombuffer(data, dtype=np.uint8)

    def packed(self, name: str) -> np.ndarray:
        if self.encoding == "bits":
            return self._raw(name)
        n = int(np.prod(self.shapes[name]))
        try:
            return _delta_decode(self._raw(name), self.counts[name], self.base.packed(name), n)
        except (ValueError, OSError, pa.ArrowException) as err:
            raise StoreError(f"{self.store.uri(self.key)}: module {name!r}: cannot decode ({err})") from err

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack(self.packed(name), self.shapes[name])

    def read(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Decoded masks; reading every module also checks them against the content digest."""
        names = list(names if names is not None else self.names)
        packed = {name: self.packed(name) for name in names}
        if set(names) == set(self.names):
            self.read_digest = digest(packed, self.shapes)
            if self.read_digest != self.header["digest"]:
                raise StoreError(f"{self.store.uri(self.key)}: decoded masks fail the content digest")
        return {name: unpack(packed[name], self.shapes[name]) for name in names}

    def verify(self) -> str:
        """Read and check every module; returns the content digest (raises StoreError if corrupt)."""
        packed = {name: self.packed(name) for name in self.names}
        got = digest(packed, self.shapes)
        if got != self.header["digest"]:
            raise StoreError(f"{self.store.uri(self.key)}: decoded masks fail the content digest")
        self.read_digest = got
        return got


def verify_mask(store: Store, key: str) -> str:
    """The content digest of a whole, verified mask; StoreError naming the file otherwise."""
    return MaskFile(store, key).verify()


def read_mask(store: Store, key: str, names: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(keep-masks by module name, metadata), verified. `names` limits which modules are read."""
    f = MaskFile(store, key)
    return f.read(names), f.metadata


def read_mask_metadata(store: Store, key: str) -> dict | None:
    """A mask's metadata from its header alone; None when there is no mask at `key`."""
    try:
        return MaskFile(store, key).metadata
    except FileNotFoundError:
        return None


def bits_per_weight(nbytes: int, masks: Mapping[str, torch.Tensor]) -> float:
    return 8.0 * nbytes / sum(m.numel() for m in masks.values())
