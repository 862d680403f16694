"""Keep-masks on disk: bit-packed safetensors, optionally delta-coded against a base mask.

A mask file is a plain safetensors file holding one ``uint8`` tensor per module:

* ``encoding=bits``:  the keep-mask, row-major, 8 weights per byte (``np.packbits``,
  little bit order): exactly 1 bit per weight.
* ``encoding=delta``: the positions where the mask differs from a base mask (another
  mask file in the store, named in the header), as gaps between flipped positions,
  byte-shuffled and zstd-compressed. Decoding is exact; the base's content digest is
  checked so a delta is never applied to the wrong base.

The header's ``__metadata__`` (strings only) holds the format, encoding, module shapes,
a content digest of the decoded masks, and the caller's metadata as JSON (model key,
method, parameters, sparsity, hashes of the statistics used, ...).

Reading parses the JSON header and raw bytes only: nothing is ever unpickled.
`MaskFile` reads one module at a time (a ranged read of just its bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import torch

from .store import Store, StoreError

log = logging.getLogger(__name__)

FORMAT = "persona-mask/v1"
CODEC = "zstd"


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
                base: Mapping[str, torch.Tensor] | None = None, base_key: str | None = None) -> bytes:
    """The bytes of a mask file; with `base` (and its store key), delta-coded against it."""
    from safetensors.numpy import save

    if not masks:
        raise ValueError("no masks to encode")
    shapes = {name: tuple(m.shape) for name, m in masks.items()}
    packed = {name: pack(m) for name, m in masks.items()}
    header = {"format": FORMAT, "shapes": json.dumps(shapes), "digest": digest(packed, shapes),
              "meta": json.dumps(dict(metadata), sort_keys=True, default=str)}
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
    return save(tensors, metadata=header)


def write_mask(store: Store, key: str, masks: Mapping[str, torch.Tensor], metadata: Mapping, *,
               base: Mapping[str, torch.Tensor] | None = None, base_key: str | None = None) -> int:
    """Publish a mask file at `key` (atomically); delta-coded when `base_key` is given.

    With `base_key` but no `base`, the base masks are read from the store. Returns the
    number of bytes written.
    """
    if base_key is not None and base is None:
        base, _ = read_mask(store, base_key, names=list(masks))
    data = encode_mask(masks, metadata, base=base, base_key=base_key)
    store.write_bytes(key, data)
    return len(data)


# ---------------------------------------------------------------------------- decode


class MaskFile:
    """A mask file in the store, read lazily: the header once, each module on demand."""

    def __init__(self, store: Store, key: str, _depth: int = 0):
        self.store, self.key = store, key
        path = store.path(key)
        try:
            head = store.fs.cat_file(path, start=0, end=8)
            if len(head) != 8:
                raise ValueError("file shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if not 0 < n < 1 << 27:
                raise ValueError(f"implausible header length {n}")
            text = store.fs.cat_file(path, start=8, end=8 + n)
            if len(text) != n:
                raise ValueError("truncated header")
            raw = json.loads(text)
        except FileNotFoundError:
            raise FileNotFoundError(f"{store.uri(key)}: no mask there") from None
        except (ValueError, OSError) as err:
            raise StoreError(f"{store.uri(key)}: not a mask file ({err})") from err
        self._offset = 8 + n
        header = raw.pop("__metadata__", None) or {}
        if header.get("format") != FORMAT:
            raise StoreError(f"{store.uri(key)}: not a {FORMAT} file (format {header.get('format')!r})")
        self._entries = raw
        self.header = header
        self.encoding = header["encoding"]
        self.shapes = {k: tuple(v) for k, v in json.loads(header["shapes"]).items()}
        self.metadata = json.loads(header["meta"])
        self._base = None
        self._depth = _depth
        if self.encoding == "delta":
            if _depth > 8:
                raise StoreError(f"{store.uri(key)}: delta chain too long")
            self.counts = json.loads(header["counts"])
        elif self.encoding != "bits":
            raise StoreError(f"{store.uri(key)}: unknown encoding {self.encoding!r}")

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def base(self) -> "MaskFile":
        if self._base is None:
            self._base = MaskFile(self.store, self.header["base"], self._depth + 1)
            if self._base.header["digest"] != self.header["base_digest"]:
                raise StoreError(f"{self.store.uri(self.key)}: its base {self.header['base']} has changed "
                                 "since the delta was written; rebuild this mask")
        return self._base

    def _raw(self, name: str) -> np.ndarray:
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(f"{self.store.uri(self.key)}: no module {name!r}")
        if entry["dtype"] != "U8":
            raise StoreError(f"{self.store.uri(self.key)}: module {name!r} has dtype {entry['dtype']}, expected U8")
        start, end = entry["data_offsets"]
        if end == start:
            return np.zeros(0, dtype=np.uint8)
        data = self.store.fs.cat_file(self.store.path(self.key), start=self._offset + start, end=self._offset + end)
        return np.frombuffer(data, dtype=np.uint8)

    def packed(self, name: str) -> np.ndarray:
        if self.encoding == "bits":
            return self._raw(name)
        n = int(np.prod(self.shapes[name]))
        return _delta_decode(self._raw(name), int(self.counts[name]), self.base.packed(name), n)

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack(self.packed(name), self.shapes[name])

    def read(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return {name: self[name] for name in (names if names is not None else self.names)}


def read_mask(store: Store, key: str, names: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(keep-masks by module name, metadata). `names` limits which modules are read."""
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
