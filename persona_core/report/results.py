"""Evaluation results of a run: gathered from their parts, read back, and turned into the report.

`write_report` is the one report writer: every stage that publishes a report calls it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa

from persona_core.eval.schema import RESULT_SCHEMA
from persona_core.report.analysis import Analysis, analyse
from persona_core.report.html import build_report
from persona_core.report.terminal import terminal_table
from persona_core.store import layout
from persona_core.store.store import Store, open_store

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
    """Every row of a run, read back from its parts."""
    store = open_store(store)
    parts = store.list(layout.results_prefix(run_id) + "/", suffix=".parquet")
    return gather([store.read_parquet(k) for k in parts])


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
