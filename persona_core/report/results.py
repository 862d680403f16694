"""Evaluation results of a run: gathered from their parts, read back, and turned into the report.

A run's results table is the set of result parts its index names (``results/run=<id>/parts.json``,
part key -> rows digest; the parts are keyed by content and shared between runs, see
`persona_core.eval.result_parts`); each is verified as it is read. A run written before results
were keyed by content has no index: its parts are the files under ``results/run=<id>/``.

`write_report` is the one report writer: every stage that publishes a report calls it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa

from persona_core.eval.result_parts import read_result_part
from persona_core.eval.schema import RESULT_SCHEMA
from persona_core.report.analysis import Analysis, analyse
from persona_core.report.html import build_report
from persona_core.report.terminal import terminal_table
from persona_core.store import layout
from persona_core.store.store import Store, StoreError, open_store

UNIT_KEY = ("persona", "method", "sparsity", "condition", "metric")


def gather(tables: list[pa.Table]) -> pa.Table:
    """Concatenate unit tables; every (persona, method, sparsity, condition, metric) once."""
    if not tables:
        return RESULT_SCHEMA.empty_table()
    results = pa.concat_tables([_conform(t) for t in tables])
    keys = list(zip(*(results.column(c).to_pylist() for c in UNIT_KEY)))
    if len(set(keys)) != len(keys):
        dupes = len(keys) - len(set(keys))
        raise RuntimeError(f"{dupes} result row(s) gathered twice: parts of different configs in one run?")
    return results


def _conform(t: pa.Table) -> pa.Table:
    """A part in today's schema (columns added since it was written are null)."""
    for f in RESULT_SCHEMA:
        if f.name not in t.column_names:
            t = t.append_column(f.name, pa.nulls(t.num_rows, f.type))
    return t.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)


def load_results(store: str | Store, run_id: str) -> pa.Table:
    """Every row of a run, read back from its parts (each verified against the digest its index records)."""
    store = open_store(store)
    index = read_results_index(store, run_id)
    if index is not None:
        return gather([read_result_part(store, k, digest) for k, digest in sorted(index.items())])
    parts = [k for k in store.list(layout.results_prefix(run_id) + "/", suffix=".parquet")
             if layout.is_legacy_result_part(k)]  # a run from before the index: its own folder's parts
    return gather([store.read_parquet(k) for k in parts])


def read_results_index(store: Store, run_id: str) -> dict[str, str] | None:
    """Result part key -> rows digest, from the run's results index; None when the run has none (a
    run from before the index, or one not evaluated); StoreError naming the file when it is corrupt."""
    key = layout.results_index(run_id)
    try:
        raw = json.loads(store.read_bytes(key))
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise StoreError(f"{store.uri(key)}: not a results index ({err})") from None
    parts = raw.get("parts") if isinstance(raw, dict) else None
    if not isinstance(parts, dict) or raw.get("run_id") != run_id or not all(
            isinstance(k, str) and isinstance(v, str) and layout.parse_result_part(k) for k, v in parts.items()):
        raise StoreError(f"{store.uri(key)}: not the results index of run {run_id}")
    return parts


def write_results_index(store: Store, run_id: str, parts: dict[str, str]) -> None:
    """Publish which result parts (key -> rows digest) make up the run's results table."""
    store.write_json(layout.results_index(run_id), {"run_id": run_id, "parts": dict(sorted(parts.items()))})


def write_report(store: Store, run_id: str, results: "pa.Table | Analysis", inputs: dict | None = None) -> str:
    """The HTML report of `results` (naming the run's `inputs`) and its summary table as text,
    published at the run's report and summary keys; returns the report's URL."""
    an = analyse(results)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_report(an, Path(tmp) / "report.html", title=f"Persona subnetworks: {run_id}",
                            inputs=inputs)
        store.write_bytes(layout.report(run_id), path.read_bytes())
    store.write_bytes(layout.summary_table(run_id), (terminal_table(an) + "\n").encode())
    return store.uri(layout.report(run_id))
