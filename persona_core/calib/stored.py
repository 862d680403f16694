"""The statistics a store holds: listing parts, a persona's parts read back merged, the parts a
plan makes stale, and the whole ``stats/`` tree as one pyarrow dataset (see `persona_core.calib.parts`
for one part's format).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from persona_core.calib.parts import (SCHEMA, STAT_COLUMNS, StatsError, check_owner, check_schema, footer_schema,
                                      part_metadata, read_part)
from persona_core.calib.stats import GroupKey, GroupStats, PersonaStats
from persona_core.store import layout
from persona_core.store.store import Store, open_store

if TYPE_CHECKING:
    import pyarrow.dataset as pads

log = logging.getLogger(__name__)

PARTITION_SCHEMA = pa.schema([("model", pa.string()), ("persona", pa.string())])  # hive columns from the path


def list_parts(store: Store | str, model_key: str | None = None, persona_id: str | None = None) -> list[str]:
    """Keys of stats parts, optionally of one model and persona."""
    store = open_store(store)
    return [k for k in store.list(layout.stats_prefix(model_key, persona_id), suffix=".parquet")
            if (ref := layout.parse_stats_part(k)) is not None and (model_key is None or ref.model_key == model_key)
            and (persona_id is None or ref.persona_id == persona_id)]  # never a folder below the persona's


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


def stats_exist(store: Store | str, model_key: str, persona_id: str, persona_hash: str | None = None,
                calib_hash: str | None = None) -> bool:
    """Whether a complete set of parts exists (for these hashes, when given)."""
    try:
        read_persona_stats(store, model_key, persona_id, persona_hash, calib_hash, _headers_only=True)
    except (StatsError, FileNotFoundError):
        return False
    return True


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
    where = store.uri(layout.stats_prefix(model_key, persona_id))
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
    prefix = layout.STATS
    if store.url.rstrip("/").endswith("/" + layout.STATS) or store.url.rstrip("/") == layout.STATS:
        prefix = ""
    keys = [k for k in store.list(prefix, suffix=".parquet")]
    if not keys:
        raise FileNotFoundError(f"{store.uri(prefix)}: no statistics stored")
    for key in keys:  # schema and owner from each footer (two small reads); the values are not digested here
        check_owner(key, check_schema(footer_schema(store, key), store.uri(key)), store.uri(key))
    import pyarrow.dataset as pads  # heavy (pulls in pandas): only for the dataset view

    partitioning = pads.partitioning(PARTITION_SCHEMA, flavor="hive")
    return store.dataset(prefix, partitioning=partitioning, schema=pa.unify_schemas([SCHEMA, PARTITION_SCHEMA]))


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
