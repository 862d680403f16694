"""One evaluation unit's result part in the store: written with its owner and a content digest, verified on read.

A result part (``results/model=<k>/persona=<id>/part-<what>-<ident>.parquet``, see
`persona_core.store.layout.result_part`) is keyed by a hash of everything its rows depend on, so
any run that asks for the same unit reuses it. Because it is reused unseen, it is checked before
use: its Parquet footer holds ``persona_results`` (JSON: format, the owner fields the key names,
the number of rows and a digest of the rows), and `read_result_part` refuses a part whose footer is
missing or names another owner, whose rows name another model or persona, or whose rows no longer
match the digest (a truncated file, an edited value). A refused part is recomputed by the next
evaluation (`persona-jobs run` / `nightly`, with or without --repair or --force).
"""

from __future__ import annotations

import hashlib
import json
import logging

import pyarrow as pa

from persona_core.eval.schema import RESULT_SCHEMA
from persona_core.store import layout
from persona_core.store.hashing import canonical_json
from persona_core.store.store import Store, StoreError

log = logging.getLogger(__name__)

FORMAT = "persona-results/v1"
FOOTER_KEY = b"persona_results"
MAX_ROWS = 1_000_000  # a unit has one row per (condition, metric); far more is not a result part


class ResultPartError(StoreError):
    """A stored result part that is not what its key says (corrupt, edited, or another unit's)."""


def rows_digest(table: pa.Table) -> str:
    """sha256 of the rows' values in the result schema (column order and chunking do not matter)."""
    h = hashlib.sha256()
    for row in table.select(RESULT_SCHEMA.names).to_pylist():
        h.update(canonical_json(row).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def _owner(ref: layout.ResultPartRef) -> dict[str, str]:
    return {"model": ref.model_key, "persona": ref.persona_id, "what": ref.what, "ident": ref.ident}


def _ref(key: str) -> layout.ResultPartRef:
    ref = layout.parse_result_part(key)
    if ref is None:
        raise layout.LayoutError(f"{key!r} is not a result part key")
    return ref


def write_result_part(store: Store, key: str, table: pa.Table) -> str:
    """Publish one unit's rows at `key` with its owner and digest in the footer; returns the digest."""
    ref = _ref(key)
    rows = table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
    wrong = _row_owner_problem(rows, ref)
    if wrong:
        raise ValueError(f"{key}: {wrong}")
    digest = rows_digest(rows)
    footer = {"format": FORMAT, **_owner(ref), "rows": rows.num_rows, "digest": digest}
    store.write_parquet(key, rows.replace_schema_metadata({FOOTER_KEY: json.dumps(footer, sort_keys=True)}))
    return digest


def read_result_part(store: Store, key: str, digest: str | None = None) -> pa.Table:
    """The verified rows of the part at `key` (and, with `digest`, only if they are those rows);
    `ResultPartError` naming the file and what is wrong otherwise, FileNotFoundError if absent."""
    return _read(store, key, digest)[0]


def result_part_digest(store: Store, key: str) -> str:
    """The digest of a verified part's rows (what a run records for it)."""
    return _read(store, key, None)[1]


def _read(store: Store, key: str, digest: str | None) -> tuple[pa.Table, str]:
    ref = _ref(key)
    where = store.uri(key)
    try:
        table = store.read_parquet(key)
    except FileNotFoundError:
        raise
    except (StoreError, OSError, pa.ArrowException, ValueError) as err:
        raise ResultPartError(f"{where}: unreadable result part ({err})") from err
    meta = table.schema.metadata or {}
    try:
        footer = json.loads(meta[FOOTER_KEY])
        if not isinstance(footer, dict):
            raise ValueError("not a JSON object")
    except (KeyError, ValueError) as err:
        raise ResultPartError(f"{where}: no result part footer ({type(err).__name__}: {err}); written by "
                              f"something else, or before parts were verified") from None
    if footer.get("format") != FORMAT:
        raise ResultPartError(f"{where}: format {footer.get('format')!r}, not {FORMAT}")
    for field, want in _owner(ref).items():
        if footer.get(field) != want:
            raise ResultPartError(f"{where}: its footer names {field} {footer.get(field)!r}, its key {want!r}")
    if not table.schema.remove_metadata().equals(RESULT_SCHEMA) or table.num_rows != footer.get("rows") \
            or table.num_rows > MAX_ROWS:
        raise ResultPartError(f"{where}: {table.num_rows} rows in {table.schema.names}, the footer says "
                              f"{footer.get('rows')} rows in the result schema")
    wrong = _row_owner_problem(table, ref)
    if wrong:
        raise ResultPartError(f"{where}: {wrong}")
    got = rows_digest(table)
    if got != footer.get("digest"):
        raise ResultPartError(f"{where}: its rows fail their digest (changed after they were written)")
    if digest is not None and got != digest:
        raise ResultPartError(f"{where}: holds rows {got}, the run recorded {digest}")
    return table.replace_schema_metadata(None), got


def _row_owner_problem(table: pa.Table, ref: layout.ResultPartRef) -> str:
    for col, want in (("model", ref.model_key), ("persona", ref.persona_id)):
        found = set(table.column(col).to_pylist())
        if found - {want}:
            return f"rows name {col} {sorted(map(str, found))}, the key {want!r}"
    return ""
