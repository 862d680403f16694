"""Anthropic's model-written-evals personas as a catalog (format ``anthropic-persona-evals``).

A folder of ``<behavior>.jsonl`` files, or one such file: each line holds a ``statement`` and
``answer_matching_behavior`` (`` Yes`` or `` No``). Each behavior gives two opposing personas,
``<behavior>`` (the statements answered Yes) and ``not-<behavior>`` (those answered No), whose
statements are split into calibration and evaluation texts by the `SplitConfig`.
"""

from __future__ import annotations

from pathlib import Path

from persona_core.catalog.formats import CatalogSource, catalog_format, parse_jsonl, read_text
from persona_core.catalog.personas import MAX_TEXT_CHARS, Catalog, CatalogError, Persona, SplitConfig, checked

NAME = "anthropic-persona-evals"


def is_anthropic_persona_evals(source: CatalogSource) -> bool:
    """A folder holding .jsonl files, or a .jsonl file whose first record has a ``statement``."""
    if source.is_folder:
        return any(f.endswith(".jsonl") for f in source.listing)
    return source.is_statements_file


@catalog_format(NAME, detect=is_anthropic_persona_evals)
def load_anthropic_persona_evals(source: CatalogSource, split: SplitConfig) -> Catalog:
    """Each behavior file gives `<behavior>` (answers " Yes") and `not-<behavior>` (" No")."""
    files = sorted(f for f in source.listing if f.endswith(".jsonl")) if source.is_folder else [source.path]
    problems: list[str] = []
    personas: dict[str, Persona] = {}
    for fpath in files:
        behavior = Path(fpath).stem
        fshown = source.file_shown(fpath)
        try:
            lines = parse_jsonl(read_text(source.fs, fpath, fshown), fshown) if source.is_folder else source.jsonl
        except CatalogError as err:
            problems.extend(err.problems)
            continue
        sides, bad = _sides(lines, fshown)
        problems.extend(bad)
        for yes, pid, opp in ((True, behavior, f"not-{behavior}"), (False, f"not-{behavior}", behavior)):
            if not sides[yes]:
                problems.append(f"{fshown}: persona {pid!r}: field 'calibration': empty calibration set")
                continue
            cal, ev = split.split(sides[yes])
            words = behavior.replace("-", " ")
            desc = (f"You are an assistant whose answers show this trait: {words}." if yes else
                    f"You are an assistant whose answers show the opposite of this trait: {words}.")
            personas[pid] = Persona(pid, desc, cal, ev, opp, ("anthropic-persona", behavior), False, f"{fshown}:1")
    if problems:
        raise CatalogError(problems)
    return checked(Catalog(Path(source.shown.rstrip("/")).stem, personas, source.shown))


def _sides(lines: list[tuple[int, object]], fshown: str) -> tuple[dict[bool, list[str]], list[str]]:
    """The statements answered Yes (True) and No (False), and a problem per line that is neither."""
    sides: dict[bool, list[str]] = {True: [], False: []}
    problems = []
    for n, rec in lines:
        st = rec.get("statement") if isinstance(rec, dict) else None
        ans = rec.get("answer_matching_behavior") if isinstance(rec, dict) else None
        if not isinstance(st, str) or not st.strip():
            problems.append(f"{fshown}:{n}: field 'statement': missing or empty")
            continue
        if len(st) > MAX_TEXT_CHARS:
            problems.append(f"{fshown}:{n}: field 'statement': {len(st)} characters, longer than "
                            f"{MAX_TEXT_CHARS}")
            continue
        if not isinstance(ans, str) or ans.strip() not in ("Yes", "No"):
            problems.append(f"{fshown}:{n}: field 'answer_matching_behavior': expected ' Yes' or ' No', got {ans!r}")
            continue
        sides[ans.strip() == "Yes"].append(st.strip())
    return sides, problems
