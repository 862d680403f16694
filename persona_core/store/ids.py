"""The identifier grammar: what a user-given name may be before it becomes part of a store key.

Persona ids, schedule names and lease names become folder names, file names and object names,
so they follow one grammar: 1 to 128 characters from ``A-Z a-z 0-9 . _ -``, starting with a
letter or digit, never containing ``..``. Anything else could name a path outside its own
folder (``../x``, ``a/b``), hide (``.x``) or break a key's parser. Catalogs check it at load
(``file:line``, `persona_core.catalog.personas.persona_id_problem`) and every key builder checks
it again (`persona_core.store.layout.identifier`).
"""

from __future__ import annotations

import re

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ID_RE = re.compile(ID_PATTERN)
_ID_CHAR = re.compile(r"[A-Za-z0-9._-]")


def id_problem(value: object, what: str = "id") -> str | None:
    """Why `value` is not a valid identifier (persona id, schedule name), or None."""
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string"
    if not _ID_RE.fullmatch(value):
        bad = sorted({c for c in value if not _ID_CHAR.fullmatch(c)})
        if len(value) > 128:
            why = f"{len(value)} characters (at most 128)"
        elif bad:
            why = "character(s) " + " ".join(repr(c) for c in bad) + " not allowed"
        else:
            why = "must start with a letter or digit"
        return f"{what} {value!r} is not a valid identifier: {why} (allowed: {ID_PATTERN}, no '..')"
    if ".." in value:
        return f"{what} {value!r} is not a valid identifier: '..' not allowed (allowed: {ID_PATTERN}, no '..')"
    return None


def check_id(value: object, what: str = "id") -> str:
    """`value` if it is a valid identifier (see `id_problem`), else ValueError."""
    problem = id_problem(value, what)
    if problem:
        raise ValueError(problem)
    return value  # type: ignore[return-value]
