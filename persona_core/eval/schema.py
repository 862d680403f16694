"""The result table: one row per (unit, condition, metric), the columns every result part has.

A row is the unit's identity (model, persona, opposite, method, sparsity, granularity, mask
hash, config and evaluation hashes, code version), written once per unit by `result_table`,
and a scored row (`ROW_COLUMNS`: condition, metric, value, n, stderr, per-item scores, texts).
The dense model's rows carry the method `DENSE_METHOD`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

DENSE_METHOD = "dense"

RESULT_SCHEMA = pa.schema([
    ("model", pa.string()), ("persona", pa.string()), ("opposite", pa.string()),
    ("method", pa.string()), ("sparsity", pa.float64()), ("granularity", pa.string()),
    ("mask_hash", pa.string()), ("condition", pa.string()), ("metric", pa.string()),
    ("value", pa.float64()), ("n", pa.int64()), ("stderr", pa.float64()),
    ("config_hash", pa.string()), ("eval_hash", pa.string()), ("code_version", pa.string()),
    # per-item scores behind `value` (statement-preference: each own statement's mean token log-prob,
    # then each opposite statement's; `items_own` own ones first): what bootstrap intervals resample
    ("items", pa.list_(pa.float64())), ("items_own", pa.int64()),
    ("texts", pa.list_(pa.string())),  # generated texts (sample-generations: "question\nanswer")
])

# what a scored row holds (the rest of a result row is the unit's identity)
ROW_COLUMNS = ("condition", "metric", "value", "n", "stderr", "items", "items_own", "texts")


def result_table(unit: dict[str, Any], rows: list[dict[str, Any]]) -> pa.Table:
    """The unit's identity columns (`unit`) joined to each scored row, as a result table."""
    return pa.Table.from_pylist([{**unit, **r} for r in rows], schema=RESULT_SCHEMA)
