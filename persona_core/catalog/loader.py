"""`load_catalog`: a catalog from a file, a folder, an fsspec URL or ``builtin``, in any registered format.

The built-in formats are imported here, in the order they are tried (the most specific first):
importing one registers it in `CATALOG_FORMATS`.
"""

from __future__ import annotations

from pathlib import Path

import fsspec

import persona_core.catalog.pruner_eval  # noqa: F401  (registers persona-pruner-eval: tried first)
import persona_core.catalog.anthropic  # noqa: F401  (registers anthropic-persona-evals: .jsonl of statements)
import persona_core.catalog.project_format  # noqa: F401,I001  (registers persona-catalog/v1: other .yaml/.jsonl)
from persona_core.catalog.formats import CATALOG_FORMATS, CatalogSource
from persona_core.catalog.personas import Catalog, CatalogError, SplitConfig
from persona_core.catalog.shipped import BUILTIN, BUILTIN_CATALOG


def load_catalog(path: str | Path, split: SplitConfig | None = None) -> Catalog:
    """Load and validate a catalog from a file, folder, fsspec URL, or ``builtin``."""
    split = split or SplitConfig()
    path = str(path)
    if path == BUILTIN:
        return load_catalog(BUILTIN_CATALOG, split)
    fs, fpath = fsspec.core.url_to_fs(path)
    if not fs.exists(fpath):
        raise CatalogError([f"{path}: no such file or folder"])
    source = CatalogSource(fs, fpath, path, tuple(fs.ls(fpath, detail=False)) if fs.isdir(fpath) else None)
    for fmt in CATALOG_FORMATS.values():
        if fmt.detect(source):
            return fmt.load(source, split)
    if source.is_folder:
        raise CatalogError([f"{path}: folder holds no catalog (no .jsonl files, nor persona-pruner-eval .json files)"])
    raise CatalogError([f"{path}: unknown catalog format (use .yaml, .yml, .jsonl or a folder)"])
