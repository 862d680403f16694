"""One stats part in the store: its key, its Parquet schema, writing it, and reading it back verified.

One part per (model, persona, shard), long format, one row per input channel:

  stats/model=<model-key>/persona=<id>/part-<hash>.parquet

sorted by (layer, group, channel), so every group is one contiguous run of rows
and loading back into tensors is a slice per group. `model` and `persona` are
hive partition columns (from the path, not stored in the file).

Every part carries a digest of each column's content in its metadata
(``persona.column_digests``), written with it. `read_part` checks, before anything
read is used, that the file's schema is exactly `SCHEMA`, that it belongs to the
persona its path names, and that every column read matches its digest.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from persona_core.calib.stats import PersonaStats, Shard
from persona_core.store import layout
from persona_core.store.hashing import content_hash
from persona_core.store.store import Store, StoreError, arrow_buffer, open_store, parquet_file
from persona_core.versions import STATS_VERSION

log = logging.getLogger(__name__)

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


# A part has one row per input channel of the model's linear groups (about 100 k for the default model,
# 4 M for a 70B one); its five float64 statistics are measurements, which no codec squeezes below a byte
# a row. A footer that claims more rows than either bound is a decompression bomb (issue 24 item 8: 10 M
# rows in 621 KB), refused before a column is read.
MAX_PART_ROWS = 1 << 24
MIN_BYTES_PER_ROW = 1
ROWS_SLACK = 1 << 16  # small parts compress best (few rows, constant columns): never refused for that


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


def check_rows(metadata: pq.FileMetaData, file_bytes: int, where: str) -> int:
    """The row count in a part's footer, checked against what a real part of `file_bytes` can hold,
    before anything is decompressed; StatsError otherwise."""
    rows = metadata.num_rows
    allowed = min(MAX_PART_ROWS, file_bytes // MIN_BYTES_PER_ROW + ROWS_SLACK)
    in_groups = sum(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    if rows < 0 or in_groups != rows:
        raise StatsError(f"{where}: footer row counts disagree ({rows} rows, {in_groups} in its row groups); "
                         f"{REPAIR_HINT}")
    if rows > allowed:
        raise StatsError(f"{where}: footer claims {rows} rows in {file_bytes} bytes (a part of that size holds at "
                         f"most {allowed}: one row per model channel); not read; {REPAIR_HINT}")
    return rows


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


def read_part(store: Store, key: str, columns: list[str] | None = None) -> pa.Table:
    """A stats part's columns, verified: schema, owner and every column read against its digest."""
    where = store.uri(key)
    try:
        data = store.read_bytes(key)
        pf = parquet_file(data)
        meta = check_schema(pf.schema_arrow, where)
        check_rows(pf.metadata, len(data), where)  # before any column is decompressed
        table = pf.read(columns=columns)
    except StatsError:
        raise
    except FileNotFoundError:
        raise
    except (StoreError, OSError, pa.ArrowException) as err:
        raise StatsError(f"{where}: cannot read stats part ({err}); {REPAIR_HINT}") from err
    check_owner(key, meta, where)
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


def check_owner(key: str, meta: dict[str, str], where: str) -> None:
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
    check_owner(key, meta, where)
    return meta
