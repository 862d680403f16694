"""Catalog formats: one registry of the formats `load_catalog` reads, and what they share.

A format is registered under its name with `catalog_format`, which decorates its loader::

    @catalog_format("anthropic-persona-evals", detect=is_anthropic_persona_evals)
    def load_anthropic_persona_evals(source: CatalogSource, split: SplitConfig) -> Catalog: ...

`load_catalog` opens the path as a `CatalogSource` and asks every registered format (the built-in
ones: ``persona-catalog/v1``, ``anthropic-persona-evals``, ``persona-pruner-eval``) whether it reads
it; exactly one must. A `detect` is cheap and never claims what another format reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

from fsspec import AbstractFileSystem

from persona_core.catalog.personas import Catalog, CatalogError, SplitConfig
from persona_core.registry import Registry


@dataclass(frozen=True)
class CatalogSource:
    """A catalog file or folder, opened: what a format's `detect` and `load` are given."""

    fs: AbstractFileSystem
    path: str  # the file system's path
    shown: str  # the path as the user gave it (every problem names it)
    listing: tuple[str, ...] | None = None  # a folder's entries; None for a file

    @property
    def is_folder(self) -> bool:
        return self.listing is not None

    @cached_property
    def text(self) -> str:
        """A file's text (read once)."""
        return read_text(self.fs, self.path, self.shown)

    @cached_property
    def jsonl(self) -> list[tuple[int, Any]]:
        """A file's JSON lines, as (line number, value); CatalogError naming every malformed line."""
        return parse_jsonl(self.text, self.shown)

    @property
    def is_statements_file(self) -> bool:
        """A .jsonl file whose first record holds a ``statement`` (Anthropic's persona evals, not personas)."""
        if self.is_folder or not self.path.endswith(".jsonl"):
            return False
        records = self.jsonl
        return bool(records) and isinstance(records[0][1], dict) and "statement" in records[0][1]

    def file_shown(self, fpath: str) -> str:
        """How a file of this source is named in problems: ``<folder>/<name>``, or the file itself."""
        return f"{self.shown.rstrip('/')}/{fpath.rsplit('/', 1)[-1]}" if self.is_folder else self.shown


@dataclass(frozen=True)
class CatalogFormat:
    """One catalog format: whether it reads a source, and how."""

    name: str
    detect: Callable[[CatalogSource], bool]
    load: Callable[[CatalogSource, SplitConfig], Catalog]


CATALOG_FORMATS: Registry[CatalogFormat] = Registry("catalog format")


def catalog_format(name: str, detect: Callable[[CatalogSource], bool]):
    """Decorator: register the decorated loader as the catalog format `name`, read when `detect` says so."""

    def register(load: Callable[[CatalogSource, SplitConfig], Catalog]):
        CATALOG_FORMATS.add(name, CatalogFormat(name, detect, load))
        return load

    return register


def read_text(fs: AbstractFileSystem, fpath: str, shown: str) -> str:
    """A UTF-8 file's text; CatalogError naming `shown` when it cannot be read."""
    try:
        with fs.open(fpath, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CatalogError([f"{shown}: not UTF-8 text ({err})"]) from None
    except OSError as err:
        raise CatalogError([f"{shown}: cannot read ({err})"]) from None


def parse_jsonl(text: str, shown: str) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line; a key given twice in an object is malformed."""
    out, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line, object_pairs_hook=_unique_keys)))
        except ValueError as err:
            problems.append(f"{shown}:{n}: malformed JSON ({err})")
    if problems:
        raise CatalogError(problems)
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} given twice")
        out[k] = v
    return out
