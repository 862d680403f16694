"""`load_catalog`: a catalog from a file, a folder, an fsspec URL or ``builtin``, in any registered format.

The built-in formats are imported here: importing one registers it in `CATALOG_FORMATS`. Each
format's `detect` says whether it reads a source; exactly one must, so the order in which formats
are registered never decides what a path means (two that both claim it is an error naming them).
"""

from __future__ import annotations

from pathlib import Path

import fsspec

import persona_core.catalog.anthropic  # noqa: F401  (registers anthropic-persona-evals)
import persona_core.catalog.project_format  # noqa: F401  (registers persona-catalog/v1)
import persona_core.catalog.pruner_eval  # noqa: F401  (registers persona-pruner-eval)
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
    readers = [fmt for fmt in CATALOG_FORMATS.values() if fmt.detect(source)]
    if len(readers) > 1:
        raise CatalogError([f"{path}: read by more than one catalog format ({', '.join(f.name for f in readers)}); "
                            "keep one format per file or folder"])
    if readers:
        return readers[0].load(source, split)
    if source.is_folder:
        raise CatalogError([f"{path}: folder holds no catalog (no .jsonl files, nor persona-pruner-eval .json files)"])
    raise CatalogError([f"{path}: unknown catalog format (use .yaml, .yml, .jsonl or a folder)"])
