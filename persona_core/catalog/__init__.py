"""Persona catalogs: the personas whose subnetworks are found, read from any registered format.

* `personas`: `Persona`, `Catalog`, the split of statements, the checks every catalog passes.
* `formats`: the registry of catalog formats (`CATALOG_FORMATS`, `catalog_format`).
* `project_format` (``persona-catalog/v1``, YAML or JSONL), `anthropic` (``anthropic-persona-evals``),
  `pruner_eval` (``persona-pruner-eval``): the built-in formats.
* `loader`: `load_catalog`, which tries each format.
* `shipped`: the built-in catalog, the reference persona, the generic questions, the held-out text.

The names below are the package's public API (``from persona_core.catalog import load_catalog``).
"""

from persona_core.catalog.formats import CATALOG_FORMATS, CatalogFormat, CatalogSource, catalog_format
from persona_core.catalog.loader import load_catalog
from persona_core.catalog.personas import (FORMAT, MAX_TEXT_CHARS, REFERENCE_PERSONA_ID, RESERVED_IDS, Catalog,
                                           CatalogError, Persona, SplitConfig, persona_id_problem, validate, with_texts)
from persona_core.catalog.project_format import load_texts
from persona_core.catalog.shipped import (BUILTIN, DATA, REFERENCE_TEXTS, generic_questions, heldout_text,
                                          reference_persona)

__all__ = [
    "BUILTIN", "CATALOG_FORMATS", "DATA", "FORMAT", "MAX_TEXT_CHARS", "REFERENCE_PERSONA_ID", "REFERENCE_TEXTS",
    "RESERVED_IDS", "Catalog", "CatalogError", "CatalogFormat", "CatalogSource", "Persona", "SplitConfig",
    "catalog_format", "generic_questions", "heldout_text", "load_catalog", "load_texts", "persona_id_problem",
    "reference_persona", "validate", "with_texts",
]
