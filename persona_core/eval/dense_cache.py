"""Dense-condition rows: their identity (`dense_ident`) and their cache in the store (`DenseRowCache`).

The dense conditions (the baselines) do not depend on the mask: computed once per persona,
they are repeated in every unit's rows, and kept in the store across runs under an identity
that hashes everything they depend on. Each file's Parquet footer holds ``persona_dense``
(JSON: format, the model, persona and identity its key names, the number of rows and a digest
of the rows), checked on every read: a forged value or a flipped bit is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pyarrow as pa
import torch

from persona_core.calib.recorder import RESIDUAL
from persona_core.calib.stats import PersonaStats
from persona_core.catalog import Persona
from persona_core.eval.conditions import DENSE_CONDITIONS
from persona_core.eval.config import EvalConfig
from persona_core.eval.result_parts import rows_digest
from persona_core.eval.schema import DENSE_METHOD, RESULT_SCHEMA, ROW_COLUMNS, result_table
from persona_core.store import layout
from persona_core.store.hashing import content_hash
from persona_core.store.store import Store
from persona_core.versions import EVALUATE_VERSION

log = logging.getLogger(__name__)

FORMAT = "persona-dense/v1"
FOOTER_KEY = b"persona_dense"
MAX_ROWS = 100_000  # one row per (dense condition, metric): far more is not a persona's dense rows


def dense_ident(model_key: str, persona: Persona, opposite: Persona | None, config: EvalConfig,
                stats: dict[str, PersonaStats] | None = None, numerics: str = "") -> str:
    """Everything the dense rows of one persona depend on, hashed: the model (and where and in what
    precision it runs), the persona's evaluation data and description, its opposite's, the config's
    dense part and (for dense+steer) the statistics."""
    steer = _residual_digest(stats) if "dense+steer" in config.conditions else None
    return content_hash(EVALUATE_VERSION, model_key, numerics, persona.evaluation_hash, persona.description,
                        opposite.evaluation_hash if opposite else None, config.dense_hash, steer)[:16]


def _residual_digest(stats: dict[str, PersonaStats] | None) -> str:
    """A digest of what the steering baseline reads from the statistics: each persona's residual-stream
    token counts and sums (the same numbers under another calibration option give the same digest)."""
    h = hashlib.sha256()
    for pid, s in sorted((stats or {}).items()):
        h.update(f"{pid}\0".encode())
        for key in sorted(k for k in s.groups if k[1] == RESIDUAL):
            g = s.groups[key]
            h.update(f"{key[0]}:{g.tokens}\0".encode())
            h.update(g.sum.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


class DenseRowCache:
    """Dense-condition rows kept in the store across runs (``dense/model=<k>/persona=<id>/rows-<ident>.parquet``).

    The prompt, few-shot and steering baselines (the steering search above all) cost more than a
    masked condition, and they do not change when only the masks do: a nightly run with new masks,
    or a study adding a method to a catalog already evaluated, reads them back instead. What is
    read is verified (the footer's owner and identity against the key, the rows' digest, model,
    persona, opposite, evaluation data, dense config, code version, the conditions asked for) and a
    mismatch is recomputed and overwritten (with a warning), never used.
    """

    def __init__(self, store: Store, model_key: str):
        self.store, self.model_key = store, model_key

    def key(self, ident: str, persona: Persona) -> str:
        return layout.dense_rows(self.model_key, persona.id, ident)

    def get(self, ident: str, persona: Persona, opposite: Persona | None, config: EvalConfig) -> list[dict] | None:
        key = self.key(ident, persona)
        if not self.store.exists(key):
            return None
        try:
            table = self.store.read_parquet(key)
            problem = self._check_footer(table, ident, persona) or self._check(table, persona, opposite, config)
        except Exception as err:  # unreadable: recompute, the rewrite replaces it
            problem = f"{type(err).__name__}: {err}"
        if problem:
            log.warning("%s: %s; recomputing the dense rows", self.store.uri(key), problem)
            return None
        return [{c: r[c] for c in ROW_COLUMNS} for r in table.to_pylist()]

    def _owner(self, ident: str, persona: Persona) -> dict:
        return {"model": self.model_key, "persona": persona.id, "ident": ident}

    def _check_footer(self, table: pa.Table, ident: str, persona: Persona) -> str:
        """What is wrong with the footer and digest of `table` as the rows of (`ident`, `persona`); "" if nothing."""
        try:
            footer = json.loads((table.schema.metadata or {})[FOOTER_KEY])
            if not isinstance(footer, dict):
                raise ValueError("not a JSON object")
        except (KeyError, ValueError) as err:
            return f"no dense-rows footer ({type(err).__name__}: {err}): written by something else or an older version"
        if footer.get("format") != FORMAT:
            return f"format {footer.get('format')!r}, not {FORMAT}"
        for name, want in self._owner(ident, persona).items():
            if footer.get(name) != want:
                return f"its footer names {name} {footer.get(name)!r}, its key {want!r}"
        if table.num_rows != footer.get("rows") or table.num_rows > MAX_ROWS:
            return f"{table.num_rows} rows, the footer says {footer.get('rows')}"
        if rows_digest(table.replace_schema_metadata(None)) != footer.get("digest"):
            return "its rows fail their digest (changed after they were written)"
        return ""

    def _check(self, table: pa.Table, persona: Persona, opposite: Persona | None, config: EvalConfig) -> str:
        if not table.schema.remove_metadata().equals(RESULT_SCHEMA):
            return "not the result schema"
        want = {"model": self.model_key, "persona": persona.id, "opposite": opposite.id if opposite else "",
                "method": DENSE_METHOD, "config_hash": config.dense_hash, "eval_hash": persona.evaluation_hash,
                "code_version": EVALUATE_VERSION}
        for col, value in want.items():
            found = set(table.column(col).to_pylist())
            if found != {value}:
                return f"column {col!r} holds {sorted(map(str, found))}, expected {value!r}"
        conditions = set(table.column("condition").to_pylist())
        asked = {c for c in config.conditions if c in DENSE_CONDITIONS}
        if conditions != asked:
            return f"conditions {sorted(conditions)}, expected {sorted(asked)}"
        return ""

    def put(self, ident: str, persona: Persona, opposite: Persona | None, config: EvalConfig, rows: list[dict]) -> None:
        if not rows:
            return
        common = {"model": self.model_key, "persona": persona.id, "opposite": opposite.id if opposite else "",
                  "method": DENSE_METHOD, "sparsity": 0.0, "granularity": "", "mask_hash": "",
                  "config_hash": config.dense_hash, "eval_hash": persona.evaluation_hash,
                  "code_version": EVALUATE_VERSION}
        table = result_table(common, rows)
        footer = {"format": FORMAT, **self._owner(ident, persona), "rows": table.num_rows,
                  "digest": rows_digest(table)}
        self.store.write_parquet(self.key(ident, persona),
                                 table.replace_schema_metadata({FOOTER_KEY: json.dumps(footer, sort_keys=True)}))
