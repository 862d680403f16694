"""Persona-Pruner's role-play evaluation sets as a catalog of description-only personas (format
``persona-pruner-eval``).

The format (one JSON object per file, ``<set>_<kind>_user_<i>.json``): ``persona_description``,
``system_prompt`` (the description as a system prompt), ``questions`` (evaluation questions)
and ``eval_prompt`` (the judge's 0-100 rubric with ``{question}`` and ``{answer}``). Files of
the same set and index describe the same persona with different questions (``specific``: about
the character's world; ``general``: ordinary instructions).

Each (set, index) becomes one persona, id ``<set>-<i>`` with ``_`` written ``-`` (e.g.
``rolebench-0``, ``persona-alpaca-3``): its description is the file's system prompt (what the
paper prompts with), it has no statements (calibration texts are generated from the
description), and its evaluation questions are every question of its files, in file order.
The judge rubric is the one whose text names the persona's own description (the upstream
``persona_alpaca_general`` files all carry persona 0's rubric; a mismatching rubric is
never used, and a warning says so).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from persona_core.catalog.formats import CatalogSource, catalog_format
from persona_core.catalog.personas import Catalog, CatalogError, Persona, SplitConfig, checked

log = logging.getLogger(__name__)

FORMAT = "persona-pruner-eval"
_NAME = re.compile(r"^(?P<set>[a-z][a-z0-9_]*?)_(?P<kind>specific|general)_user_(?P<index>\d+)\.json$")
_FIELDS = ("persona_description", "system_prompt", "questions", "eval_prompt")


def is_pruner_eval(source: CatalogSource) -> bool:
    """Whether a folder's files are this format (every .json file is named like it)."""
    names = [Path(f).name for f in source.listing or () if f.endswith(".json")]
    return bool(names) and all(_NAME.match(n) for n in names)


@catalog_format(FORMAT, detect=is_pruner_eval)
def load_pruner_eval(source: CatalogSource, split: SplitConfig) -> Catalog:
    """One persona per (set, index); `split` is unused (these personas have no statements to split)."""
    fs, files, shown = source.fs, source.listing, source.shown
    problems: list[str] = []
    groups: dict[str, list[tuple[str, str, dict]]] = {}
    for fpath in sorted(files):
        name = Path(fpath).name
        m = _NAME.match(name)
        if not m:
            continue
        where = f"{shown.rstrip('/')}/{name}"
        try:
            with fs.open(fpath, "rb") as f:
                rec = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problems.append(f"{where}: cannot read ({err})")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected a JSON object")
            continue
        bad = [k for k in _FIELDS[:2] + _FIELDS[3:] if not isinstance(rec.get(k), str) or not rec[k].strip()]
        qs = rec.get("questions")
        if not isinstance(qs, list) or not qs or not all(isinstance(q, str) and q.strip() for q in qs):
            bad.append("questions")
        for k in bad:
            problems.append(f"{where}: field {k!r}: missing or empty" + (" (a list of texts)" if k == "questions" else ""))
        if bad:
            continue
        if "{question}" not in rec["eval_prompt"] or "{answer}" not in rec["eval_prompt"]:
            problems.append(f"{where}: field 'eval_prompt': needs {{question}} and {{answer}} placeholders")
            continue
        pid = f"{m['set']}-{int(m['index'])}".replace("_", "-")
        groups.setdefault(pid, []).append((m["kind"], where, rec))
    personas: dict[str, Persona] = {}
    foreign: list[str] = []  # files whose rubric names another persona
    for pid, items in groups.items():
        items.sort(key=lambda t: 0 if t[0] == "specific" else 1)
        descs = {" ".join(r["persona_description"].split()) for _, _, r in items}
        prompts = {r["system_prompt"].strip() for _, _, r in items}
        first = items[0][1]
        if len(descs) != 1 or len(prompts) != 1:
            problems.append(f"{first}: persona {pid!r}: files {', '.join(w for _, w, _ in items)} disagree on the "
                            "description or system prompt")
            continue
        desc = items[0][2]["persona_description"]
        rubric = ""
        for _, where, rec in items:
            if " ".join(desc.split()) in " ".join(rec["eval_prompt"].split()):
                rubric = rubric or rec["eval_prompt"]
            else:
                foreign.append(Path(where).name)
        if not rubric:
            problems.append(f"{first}: persona {pid!r}: no eval_prompt names this persona's description")
            continue
        questions = tuple(dict.fromkeys(q.strip() for _, _, r in items for q in r["questions"]))
        personas[pid] = Persona(pid, prompts.pop(), (), (), None, ("persona-pruner-eval", pid.rsplit("-", 1)[0]),
                                True, first, questions=questions, rubric=rubric)
    if foreign:
        log.info("%s: %d file(s) carry another persona's eval_prompt (not used as their rubric): %s", shown,
                 len(foreign), ", ".join(sorted(foreign)[:3]) + (" ..." if len(foreign) > 3 else ""))
    if problems:
        raise CatalogError(problems)
    if not personas:
        raise CatalogError([f"{shown}: no persona-pruner-eval files found"])
    ordered = dict(sorted(personas.items(), key=lambda kv: (kv[0].rsplit("-", 1)[0], int(kv[0].rsplit("-", 1)[1]))))
    return checked(Catalog(Path(shown.rstrip("/")).name, ordered, shown))
