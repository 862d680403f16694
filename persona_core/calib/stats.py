"""Activation statistics: sufficient statistics that merge by addition.

For the input of every linear group (see `models.linear_groups`), per input
channel j, over the real (unpadded) tokens of a calibration set:

* ``tokens``                      token count
* ``sum``, ``sumsq``, ``sumabs``  sum of x_j, of x_j^2, of |x_j|
* ``samples``                     number of calibration samples (texts)
* ``norm_sum``, ``norm_sumsq``    over samples, the sum and sum of squares of the
                                  channel's L2 norm over that sample's tokens

Every mask method's score derives from these; none needs raw activations again.
Shards of one persona merge by addition (`GroupStats.merge`, `PersonaStats.merge`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from persona_core.store import layout
from persona_core.store.hashing import content_hash
from persona_core.versions import STATS_VERSION
from persona_core.store.store import Store, StoreError, arrow_buffer, open_store, parquet_file

log = logging.getLogger(__name__)

EPS = 1e-12


@dataclass
class GroupStats:
    """Statistics of one shared linear input (one `LinearGroup`), float64 on any device."""

    tokens: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    sumabs: torch.Tensor
    samples: int
    norm_sum: torch.Tensor
    norm_sumsq: torch.Tensor

    @classmethod
    def zeros(cls, width: int, device: torch.device | str = "cpu") -> "GroupStats":
        z = lambda: torch.zeros(width, dtype=torch.float64, device=device)  # noqa: E731
        return cls(0, z(), z(), z(), 0, z(), z())

    @property
    def width(self) -> int:
        return self.sum.numel()

    def merge(self, other: "GroupStats") -> "GroupStats":
        if other.width != self.width:
            raise ValueError(f"cannot merge statistics of widths {self.width} and {other.width}")
        return GroupStats(
            self.tokens + other.tokens, self.sum + other.sum, self.sumsq + other.sumsq,
            self.sumabs + other.sumabs, self.samples + other.samples,
            self.norm_sum + other.norm_sum, self.norm_sumsq + other.norm_sumsq,
        )

    def to(self, device) -> "GroupStats":
        return GroupStats(self.tokens, self.sum.to(device), self.sumsq.to(device), self.sumabs.to(device),
                          self.samples, self.norm_sum.to(device), self.norm_sumsq.to(device))

    # Derived quantities (all per channel).
    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq / max(self.tokens, 1) - self.mean**2).clamp_min(0)

    @property
    def rms(self) -> torch.Tensor:
        """sqrt(mean x^2): Wanda's ||X_j||_2 normalised by the real token count."""
        return (self.sumsq / max(self.tokens, 1)).sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sumabs / max(self.tokens, 1)

    @property
    def norm_mean(self) -> torch.Tensor:
        """Mean over samples of the per-sample L2 norm."""
        return self.norm_sum / max(self.samples, 1)

    @property
    def norm_var(self) -> torch.Tensor:
        """Variance over samples of the per-sample L2 norm."""
        return (self.norm_sumsq / max(self.samples, 1) - self.norm_mean**2).clamp_min(0)


GroupKey = tuple[int, str]  # (layer index, group name), e.g. (12, "mlp_in")


@dataclass
class PersonaStats:
    """All groups' statistics for one persona (possibly merged from several shards)."""

    model_key: str
    persona_id: str
    persona_hash: str
    groups: dict[GroupKey, GroupStats] = field(default_factory=dict)
    calib_hash: str = ""

    def __getitem__(self, key: GroupKey) -> GroupStats:
        return self.groups[key]

    def merge(self, other: "PersonaStats") -> "PersonaStats":
        if (other.model_key, other.persona_id) != (self.model_key, self.persona_id):
            raise ValueError(f"cannot merge stats of {other.model_key}/{other.persona_id} "
                             f"into {self.model_key}/{self.persona_id}")
        merged = dict(self.groups)
        for k, g in other.groups.items():
            merged[k] = merged[k].merge(g) if k in merged else g
        return PersonaStats(self.model_key, self.persona_id, self.persona_hash, merged, self.calib_hash)

    @property
    def tokens(self) -> int:
        return next(iter(self.groups.values())).tokens if self.groups else 0


# ---------------------------------------------------------------------------- Parquet in the store
#
# One part per (model, persona, shard), long format, one row per input channel:
#
#   stats/model=<model-key>/persona=<id>/part-<hash>.parquet
#
# sorted by (layer, group, channel), so every group is one contiguous run of rows
# and loading back into tensors is a slice per group. `model` and `persona` are
# hive partition columns (from the path, not stored in the file).
#
# Every part carries a digest of each column's content in its metadata
# (``persona.column_digests``), written with it. `read_part` checks, before anything
# read is used, that the file's schema is exactly `SCHEMA`, that it belongs to the
# persona its path names, and that every column read matches its digest.

STATS_PREFIX = layout.STATS
STAT_COLUMNS = ("sum", "sumsq", "sumabs", "norm_sum", "norm_sumsq")
_DICT = pa.dictionary(pa.int8(), pa.string())
SCHEMA = pa.schema([
    ("layer", pa.int16()),
    ("group", _DICT),
    ("channel", pa.int32()),
    ("tokens", pa.int64()),
    ("samples", pa.int64()),
    *[(c, pa.float64()) for c in STAT_COLUMNS],
    ("persona_hash", _DICT),
    ("calib_hash", _DICT),
    ("shard", pa.int32()),
    ("shards", pa.int32()),
    ("code_version", _DICT),
])
PARTITIONING = pads.partitioning(pa.schema([("model", pa.string()), ("persona", pa.string())]), flavor="hive")


class StatsError(RuntimeError):
    """Statistics that cannot be read or do not fit together; the message names the file(s)."""


REPAIR_HINT = "rerun with --repair to regenerate it"


def column_digest(column: pa.Array | pa.ChunkedArray) -> str:
    """Digest of a column's values, independent of chunking and of dictionary encoding."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    h = hashlib.sha256(f"{len(arr)}:{arr.null_count}\x00".encode())
    if pa.types.is_dictionary(arr.type) and arr.null_count == 0 and len(arr):
        values, codes = _first_appearance(arr.dictionary.to_pylist(), arr.indices.to_numpy(zero_copy_only=False))
        h.update(json.dumps(values).encode())
        h.update(codes.tobytes())
    elif pa.types.is_dictionary(arr.type) or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        enc = pc.dictionary_encode(arr)  # canonical: values in order of first appearance
        h.update(json.dumps(enc.dictionary.to_pylist()).encode())
        h.update(enc.indices.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    else:
        h.update(np.ascontiguousarray(arr.to_numpy(zero_copy_only=False)).tobytes())
    return h.hexdigest()[:32]


def _first_appearance(dictionary: list, indices: np.ndarray) -> tuple[list, np.ndarray]:
    """The values of a dictionary column in order of first appearance, and each row's position in
    that list (int64): what ``pc.dictionary_encode`` of the decoded strings gives, without decoding."""
    indices = indices.astype(np.int64, copy=False)
    used, first = np.unique(indices, return_index=True)
    order: dict = {}
    for pos, code in sorted(zip(first.tolist(), used.tolist())):
        order.setdefault(dictionary[code], len(order))  # a value listed twice counts once
    remap = np.array([order.get(v, -1) for v in dictionary], dtype=np.int64)
    return list(order), remap[indices]


def _type_ok(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_dictionary(want):  # Parquet may give back other index widths
        return pa.types.is_dictionary(got) and got.value_type == want.value_type
    return got == want


def check_schema(schema: pa.Schema, where: str) -> dict[str, str]:
    """The part's ``persona.*`` metadata, after checking its columns are exactly `SCHEMA`'s."""
    problems = []
    for f in SCHEMA:
        if f.name not in schema.names:
            problems.append(f"missing column {f.name}")
        elif not _type_ok(schema.field(f.name).type, f.type):
            problems.append(f"column {f.name} is {schema.field(f.name).type}, expected {f.type}")
    extra = [n for n in schema.names if n not in SCHEMA.names]
    if extra:
        problems.append(f"unexpected column(s) {', '.join(extra)}")
    if problems:
        raise StatsError(f"{where}: not a stats part of this version ({'; '.join(problems)}); {REPAIR_HINT}")
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    return {k[len("persona."):]: v for k, v in meta.items() if k.startswith("persona.")}


@dataclass(frozen=True)
class Shard:
    """Which slice of a persona's calibration texts a part covers: texts [index*size, (index+1)*size)."""

    index: int = 0
    count: int = 1
    size: int | None = None  # None: the whole set in one part

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} outside 0..{self.count - 1}")


def persona_prefix(model_key: str, persona_id: str) -> str:
    return layout.stats_prefix(model_key, persona_id)


def stale_parts(store: Store | str, model_key: str, persona_id: str, keep: set[str], *,
                persona_hash: str | None = None, calib_hash: str | None = None) -> list[str]:
    """Parts of a persona that may be deleted because `keep` (the current plan) replaces them.

    Only a file this code provably wrote qualifies: a `part_key` name directly inside the
    persona's own partition, whose metadata names this model and persona. Anything else in
    the store (a stranger's file, a corrupt part, another persona's folder) is left alone.
    With `persona_hash` and `calib_hash` (the plan's), the statistics of this persona
    version under *another* calibration config are kept too: they are another config's
    current statistics, not stale ones (two configs of one persona coexist).
    """
    store = open_store(store)
    out = []
    for key in list_parts(store, model_key, persona_id):
        if key in keep:
            continue
        try:
            meta = part_metadata(store, key)
        except (StatsError, FileNotFoundError) as err:
            log.warning("not removing %s: cannot read its metadata (%s)", store.uri(key), err)
            continue
        if meta.get("model_key") != model_key or meta.get("persona_id") != persona_id:
            log.warning("not removing %s: its metadata names %s/%s", store.uri(key), meta.get("model_key"),
                        meta.get("persona_id"))
            continue
        if persona_hash is not None and meta.get("persona_hash") == persona_hash \
                and meta.get("calib_hash") != calib_hash:
            continue  # another calibration config's statistics of this very persona
        out.append(key)
    return out


def part_versions(store: Store | str, model_key: str) -> dict[str, tuple[str, str]]:
    """Stats part key -> (persona hash, calibration hash), from each file's footer only.

    A part whose footer cannot be read is left out (it has no version; --repair handles it).
    """
    store = open_store(store)
    out = {}
    for key in list_parts(store, model_key):
        try:
            with store.fs.open(store.path(key), "rb") as f:
                meta = pq.read_schema(f).metadata or {}
        except (pa.ArrowException, OSError) as err:
            log.warning("%s: unreadable footer (%s); ignored", store.uri(key), err)
            continue
        p_hash, c_hash = meta.get(b"persona.persona_hash"), meta.get(b"persona.calib_hash")
        if p_hash is not None and c_hash is not None:
            out[key] = (p_hash.decode(), c_hash.decode())
    return out


def part_key(model_key: str, persona_id: str, persona_hash: str, calib_hash: str, shard: Shard = Shard()) -> str:
    """The part's key: a hash of everything that produced it, so a rerun finds it again."""
    h = content_hash(STATS_VERSION, model_key, persona_id, persona_hash, calib_hash,
                     shard.index, shard.count, shard.size)
    return layout.stats_part(model_key, persona_id, h)


def to_table(stats: PersonaStats, shard: Shard = Shard()) -> pa.Table:
    """The long-format table of one part (rows sorted by layer, group, channel)."""
    if not stats.groups:
        raise ValueError(f"stats of {stats.persona_id!r} hold no groups")
    keys = sorted(stats.groups)
    names = sorted({g for _, g in keys})
    widths = [stats.groups[k].width for k in keys]
    n = sum(widths)
    cols: dict[str, pa.Array] = {
        "layer": pa.array(np.repeat([k[0] for k in keys], widths).astype(np.int16)),
        "group": pa.DictionaryArray.from_arrays(
            pa.array(np.repeat([names.index(k[1]) for k in keys], widths).astype(np.int8)), names),
        "channel": pa.array(np.concatenate([np.arange(w, dtype=np.int32) for w in widths])),
        "tokens": pa.array(np.repeat([stats.groups[k].tokens for k in keys], widths).astype(np.int64)),
        "samples": pa.array(np.repeat([stats.groups[k].samples for k in keys], widths).astype(np.int64)),
    }
    for c in STAT_COLUMNS:
        cols[c] = pa.array(torch.cat([getattr(stats.groups[k], c).detach().to("cpu", torch.float64)
                                      for k in keys]).numpy())
    const = lambda v: pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), [v])  # noqa: E731
    cols["persona_hash"] = const(stats.persona_hash)
    cols["calib_hash"] = const(stats.calib_hash)
    cols["shard"] = pa.array(np.full(n, shard.index, np.int32))
    cols["shards"] = pa.array(np.full(n, shard.count, np.int32))
    cols["code_version"] = const(STATS_VERSION)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def write_stats(store: Store | str, stats: PersonaStats, shard: Shard = Shard(), *,
                generated: list[dict[str, str]] | None = None, calib_config: dict | None = None,
                overwrite: bool = False) -> str:
    """Write one part; returns its key. Idempotent: an existing part is left as it is.

    `generated` (question/answer pairs a persona's texts were generated from) and
    `calib_config` are kept in the file's metadata for audit and reproduction.
    """
    store = open_store(store)
    key = part_key(stats.model_key, stats.persona_id, stats.persona_hash, stats.calib_hash, shard)
    if not overwrite and store.exists(key):
        log.debug("%s exists; not rewritten", key)
        return key
    meta = {"model_key": stats.model_key, "persona_id": stats.persona_id, "persona_hash": stats.persona_hash,
            "calib_hash": stats.calib_hash, "code_version": STATS_VERSION,
            "shard": json.dumps({"index": shard.index, "count": shard.count, "size": shard.size}),
            "calib_config": json.dumps(calib_config or {}, sort_keys=True),
            "generated": json.dumps(generated or [], ensure_ascii=False)}
    table = to_table(stats, shard)
    meta["column_digests"] = json.dumps({c: column_digest(table.column(c)) for c in table.column_names},
                                        sort_keys=True)
    table = table.replace_schema_metadata({f"persona.{k}": v for k, v in meta.items()})
    store.write_parquet(key, table, write_statistics=["layer", "group", "channel"])
    return key


def list_parts(store: Store | str, model_key: str | None = None, persona_id: str | None = None) -> list[str]:
    """Keys of stats parts, optionally of one model and persona."""
    store = open_store(store)
    return [k for k in store.list(layout.stats_prefix(model_key, persona_id), suffix=".parquet")
            if (ref := layout.parse_stats_part(k)) is not None and (model_key is None or ref.model_key == model_key)
            and (persona_id is None or ref.persona_id == persona_id)]  # never a folder below the persona's


def stats_exist(store: Store | str, model_key: str, persona_id: str, persona_hash: str | None = None,
                calib_hash: str | None = None) -> bool:
    """Whether a complete set of parts exists (for these hashes, when given)."""
    try:
        read_persona_stats(store, model_key, persona_id, persona_hash, calib_hash, _headers_only=True)
    except (StatsError, FileNotFoundError):
        return False
    return True


def read_part(store: Store, key: str, columns: list[str] | None = None) -> pa.Table:
    """A stats part's columns, verified: schema, owner and every column read against its digest."""
    where = store.uri(key)
    try:
        data = store.read_bytes(key)
        pf = parquet_file(data)
        meta = check_schema(pf.schema_arrow, where)
        table = pf.read(columns=columns)
    except StatsError:
        raise
    except FileNotFoundError:
        raise
    except (StoreError, OSError, pa.ArrowException) as err:
        raise StatsError(f"{where}: cannot read stats part ({err}); {REPAIR_HINT}") from err
    _check_owner(key, meta, where)
    try:
        digests = json.loads(meta["column_digests"])
    except (KeyError, ValueError) as err:
        raise StatsError(f"{where}: written without column digests, so it cannot be verified; {REPAIR_HINT}") from err
    bad = [c for c in table.column_names if digests.get(c) != column_digest(table.column(c))]
    if bad:
        raise StatsError(f"{where}: column(s) {', '.join(bad)} fail their digest (corrupt); {REPAIR_HINT}")
    if table.num_rows == 0:
        raise StatsError(f"{where}: empty stats part; {REPAIR_HINT}")
    return table


def _check_owner(key: str, meta: dict[str, str], where: str) -> None:
    """A part's metadata must name the model and persona of the folder it is stored in."""
    segs = dict(s.split("=", 1) for s in key.split("/") if "=" in s)
    for seg, field_ in (("model", "model_key"), ("persona", "persona_id")):
        if seg in segs and meta.get(field_) != segs[seg]:
            raise StatsError(f"{where}: written for {field_} {meta.get(field_)!r}, stored under {seg}={segs[seg]}; "
                             f"{REPAIR_HINT}")


def footer_schema(store: Store, key: str) -> pa.Schema:
    """A Parquet file's schema from its footer alone (two ranged reads, whatever the file's size)."""
    path, where = store.path(key), store.uri(key)
    try:
        size = int(store.fs.size(path))
        tail = store.fs.cat_file(path, start=size - 8) if size >= 12 else b""
        if len(tail) != 8 or tail[4:] != b"PAR1":
            raise ValueError("no Parquet footer")
        n = int.from_bytes(tail[:4], "little")
        if not 0 < n <= size - 12:
            raise ValueError(f"footer length {n} does not fit a file of {size} bytes")
        footer = store.fs.cat_file(path, start=size - 8 - n, end=size - 8)
        return pq.read_schema(pa.BufferReader(arrow_buffer(b"PAR1" + footer + tail)))
    except (ValueError, OSError, pa.ArrowException) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise StatsError(f"{where}: cannot read stats part ({err}); {REPAIR_HINT}") from err


def verify_part(store: Store | str, key: str) -> None:
    """Read a whole part and check it (schema, owner, every column's digest); StatsError if not whole."""
    read_part(open_store(store), key)


def part_metadata(store: Store | str, key: str) -> dict[str, str]:
    """The metadata a part was written with (persona.* keys, prefix dropped), after a schema check."""
    store = open_store(store)
    where = store.uri(key)
    try:
        schema = parquet_file(store.read_bytes(key)).schema_arrow
    except (pa.ArrowException, OSError) as err:
        raise StatsError(f"{where}: cannot read stats part ({err}); {REPAIR_HINT}") from err
    meta = check_schema(schema, where)
    _check_owner(key, meta, where)
    return meta


def read_generated(store: Store | str, model_key: str, persona_id: str) -> list[dict[str, str]]:
    """The question/answer pairs generated for a persona, in shard order (empty if none)."""
    store = open_store(store)
    metas = [part_metadata(store, k) for k in list_parts(store, model_key, persona_id)]
    metas.sort(key=lambda m: json.loads(m.get("shard", "{}")).get("index", 0))
    return [s for m in metas for s in json.loads(m.get("generated") or "[]")]


def read_persona_stats(store: Store | str, model_key: str, persona_id: str, persona_hash: str | None = None,
                       calib_hash: str | None = None, *, device: str | torch.device = "cpu",
                       _headers_only: bool = False) -> PersonaStats:
    """All parts of one persona merged by addition.

    Parts must agree on persona and calibration hashes (pass them to pick one
    version when several are stored) and cover every shard exactly once.
    """
    store = open_store(store)
    keys = list_parts(store, model_key, persona_id)
    where = store.uri(persona_prefix(model_key, persona_id))
    if not keys:
        raise FileNotFoundError(f"{where}: no statistics stored")
    head_cols = ["persona_hash", "calib_hash", "shard", "shards"]
    parts = []
    for key in keys:
        table = read_part(store, key, head_cols if _headers_only else None)
        first = table.slice(0, 1).to_pylist()
        if not first:
            raise StatsError(f"{store.uri(key)}: empty stats part")
        parts.append((key, first[0], table))
    if persona_hash:
        parts = [p for p in parts if p[1]["persona_hash"] == persona_hash]
    if calib_hash:
        parts = [p for p in parts if p[1]["calib_hash"] == calib_hash]
    if not parts:
        raise FileNotFoundError(f"{where}: no statistics for persona hash {persona_hash}, calib hash {calib_hash}")
    versions = {(h["persona_hash"], h["calib_hash"], h["shards"]) for _, h, _ in parts}
    if len(versions) > 1:
        raise StatsError(f"{where}: parts of {len(versions)} different versions (persona hash, calib hash, "
                         f"shard count): {sorted(versions)}; pass persona_hash/calib_hash to choose one")
    (p_hash, c_hash, count), = versions
    shards = sorted(h["shard"] for _, h, _ in parts)
    if shards != list(range(count)):
        raise StatsError(f"{where}: incomplete or duplicated shards {shards} of {count}")
    result = PersonaStats(model_key, persona_id, p_hash, {}, c_hash)
    if _headers_only:
        return result
    total = None
    for key, _, table in parts:
        arrays = _columns(store, key, table)
        if total is None:
            total = arrays
            continue
        for c in ("layer", "group", "channel"):
            if not np.array_equal(total[c], arrays[c]):
                raise StatsError(f"{store.uri(key)}: rows do not match {store.uri(parts[0][0])} (another model?)")
        for c in ("tokens", "samples", *STAT_COLUMNS):
            total[c] = total[c] + arrays[c]
    result.groups = _groups(total, device)
    return result


def _columns(store: Store, key: str, table: pa.Table) -> dict[str, np.ndarray]:
    group = table.column("group").combine_chunks()
    if isinstance(group, pa.DictionaryArray):
        group = group.dictionary_decode()
    out = {"group": group.to_numpy(zero_copy_only=False).astype(str)}
    for c in ("layer", "channel", "tokens", "samples", *STAT_COLUMNS):
        out[c] = table.column(c).to_numpy()
    return out


def _groups(cols: dict[str, np.ndarray], device) -> dict[GroupKey, GroupStats]:
    layer, group = cols["layer"], cols["group"]
    n = len(layer)
    cuts = np.flatnonzero((layer[1:] != layer[:-1]) | (group[1:] != group[:-1])) + 1
    bounds = np.concatenate([[0], cuts, [n]])
    out: dict[GroupKey, GroupStats] = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        t = {c: torch.from_numpy(np.array(cols[c][a:b])).to(device) for c in STAT_COLUMNS}  # a writable copy
        out[(int(layer[a]), str(group[a]))] = GroupStats(
            int(cols["tokens"][a]), t["sum"], t["sumsq"], t["sumabs"], int(cols["samples"][a]),
            t["norm_sum"], t["norm_sumsq"])
    return out


def open_stats(url: str | Store) -> pads.Dataset:
    """Every stats part under a store (or its ``stats/`` folder) as one hive-partitioned dataset.

    Columns: the file columns (see `SCHEMA`) plus ``model`` and ``persona`` from the path. Every
    part's schema and owner are checked first (StatsError naming the file); for values checked
    against their digests, read through `read_part` / `read_persona_stats`.
    """
    store = open_store(url)
    prefix = STATS_PREFIX
    if store.url.rstrip("/").endswith("/" + STATS_PREFIX) or store.url.rstrip("/") == STATS_PREFIX:
        prefix = ""
    keys = [k for k in store.list(prefix, suffix=".parquet")]
    if not keys:
        raise FileNotFoundError(f"{store.uri(prefix)}: no statistics stored")
    for key in keys:  # schema and owner from each footer (two small reads); the values are not digested here
        _check_owner(key, check_schema(footer_schema(store, key), store.uri(key)), store.uri(key))
    return store.dataset(prefix, partitioning=PARTITIONING, schema=pa.unify_schemas([SCHEMA, PARTITIONING.schema]))


def stats_summary(store: Store | str, model_key: str | None = None) -> list[dict]:
    """One row per (model, persona, version): parts, shards, tokens, samples, hashes (metadata reads only)."""
    store = open_store(store)
    rows: dict[tuple, dict] = {}
    for key in list_parts(store, model_key):
        ref = layout.parse_stats_part(key)
        table = read_part(store, key, ["tokens", "samples", "persona_hash", "calib_hash", "shard", "shards"])
        h = table.slice(0, 1).to_pylist()[0]
        k = (ref.model_key, ref.persona_id, h["persona_hash"], h["calib_hash"])
        row = rows.setdefault(k, {"model": k[0], "persona": k[1], "persona_hash": k[2], "calib_hash": k[3],
                                  "parts": 0, "shards": h["shards"], "tokens": 0, "samples": 0})
        row["parts"] += 1
        row["tokens"] += h["tokens"]
        row["samples"] += h["samples"]
    return [rows[k] for k in sorted(rows)]
