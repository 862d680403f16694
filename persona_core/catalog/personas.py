"""Personas and catalogs: the model every catalog format loads into, and the checks it must pass.

A persona has an id, a description (usable as a system prompt), an optional opposite,
calibration texts (what its statistics are recorded on) and held-out evaluation texts; a
catalog is an ordered set of them. Its content hash keys every artifact derived from it.

Persona ids follow the identifier grammar of store keys (`persona_core.store.ids`), checked at
load (``file:line``) and again by every function that builds a key; no two ids of a catalog may
differ only in case (they would share files on a case-insensitive store). The id of the reference
persona (`REFERENCE_PERSONA_ID`, ``general``) is reserved in any case.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import yaml

from persona_core.store.hashing import content_hash
from persona_core.store.ids import id_problem
from persona_core.versions import PERSONA_FORMAT_VERSION

FORMAT = "persona-catalog/v1"  # the project's own catalog format (what `Catalog.to_yaml` writes)
MAX_TEXT_CHARS = 20_000  # one statement or text; longer ones are refused at load (they cost minutes and GBs)

# The reference persona: neutral text calibrated like a persona, what persona-vs-reference contrasts
# and methods such as wanda-general read, and the owner of masks shared by every persona. Its id is
# part of store keys (``persona=general``, ``.../general.safetensors``), so its value never changes.
REFERENCE_PERSONA_ID = "general"
RESERVED_IDS = frozenset({REFERENCE_PERSONA_ID})  # a catalog persona of that name would overwrite its artifacts


def persona_id_problem(value: object) -> str | None:
    """Why `value` cannot be a catalog persona's id: the grammar, or a reserved name."""
    problem = id_problem(value, "persona id")
    if problem is None and value.lower() in RESERVED_IDS:  # type: ignore[union-attr]
        return (f"persona id {value!r} is reserved (used internally: {', '.join(sorted(RESERVED_IDS))}); "
                f"choose another id")
    return problem


MAX_NAME_CHARS = 200  # a catalog's display name: one short line


def catalog_name_problem(value: object) -> str | None:
    """Why `value` cannot be a catalog's ``name`` (a non-empty single-line string, at most 200 characters)."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value.strip():
        return "must not be empty (leave it out to name the catalog after its file)"
    if len(value) > MAX_NAME_CHARS or any(ord(c) < 32 for c in value):
        return f"must be one line of at most {MAX_NAME_CHARS} characters"
    return None


class CatalogError(ValueError):
    """A catalog that cannot be used; `problems` lists every reason, each located."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class SplitConfig:
    """How a plain list of statements is split into calibration and evaluation.

    Each statement's side is decided by a seeded hash of its text alone, so the
    split is deterministic and adding statements never moves existing ones (sets
    too small for that to give both sides are split by count instead).
    """

    eval_fraction: float = 0.3
    seed: int = 0
    max_calibration: int | None = None
    max_evaluation: int | None = None

    def __post_init__(self):
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

    def split(self, statements: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        unique = list(dict.fromkeys(statements))
        ranked = sorted(unique, key=lambda s: _rank(self.seed, s))
        evaluation = [s for s in ranked if _unit(self.seed, s) < self.eval_fraction]
        calibration = [s for s in ranked if _unit(self.seed, s) >= self.eval_fraction]
        if len(unique) > 1 and (not evaluation or not calibration):  # tiny sets: split by count
            n_eval = max(1, min(len(ranked) - 1, round(len(ranked) * self.eval_fraction)))
            evaluation, calibration = ranked[:n_eval], ranked[n_eval:]
        return tuple(calibration[: self.max_calibration]), tuple(evaluation[: self.max_evaluation])


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def _unit(seed: int, text: str) -> float:
    """A statement's seeded position in [0, 1): it alone decides the statement's side."""
    return int(_rank(seed, text)[:13], 16) / 16**13


@dataclass(frozen=True)
class Persona:
    """One persona: what it is (id, description, opposite, tags) and the texts it is calibrated and
    evaluated on. `content_hash` and `evaluation_hash` key everything derived from it."""

    id: str
    description: str
    calibration: tuple[str, ...] = ()
    evaluation: tuple[str, ...] = ()
    opposite: str | None = None
    tags: tuple[str, ...] = ()
    generate: bool = False  # no statements given: generate calibration texts from the description
    source: str = ""  # "file:line" it was read from
    questions: tuple[str, ...] = ()  # the persona's own role-play evaluation questions (else the generic ones)
    rubric: str = ""  # the persona's own judge rubric, with {question} and {answer} (else the built-in one)

    @property
    def content_hash(self) -> str:
        """What every artifact derived from this persona's statistics is keyed by."""
        return content_hash(PERSONA_FORMAT_VERSION, self.id, self.description, self.opposite,
                            sorted(self.tags), self.generate, list(self.calibration))

    @property
    def evaluation_hash(self) -> str:
        extra = [list(self.questions), self.rubric] if self.questions or self.rubric else []
        return content_hash(PERSONA_FORMAT_VERSION, self.id, self.description, list(self.evaluation), *extra)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "description": self.description}
        if self.opposite:
            d["opposite"] = self.opposite
        if self.tags:
            d["tags"] = list(self.tags)
        if not self.generate:
            d["calibration"] = list(self.calibration)
        d["evaluation"] = list(self.evaluation)
        return d


def with_texts(p: Persona, calibration: Iterable[str]) -> Persona:
    """The persona with generated calibration texts filled in (its hash stays the spec's)."""
    return replace(p, calibration=tuple(calibration))


@dataclass
class Catalog:
    """Personas by id, in catalog order; `source` is where they were read from."""

    name: str
    personas: dict[str, Persona] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.personas)

    def __iter__(self):
        return iter(self.personas.values())

    def __getitem__(self, pid: str) -> Persona:
        try:
            return self.personas[pid]
        except KeyError:
            raise KeyError(f"persona {pid!r} is not in catalog {self.name!r}") from None

    def __contains__(self, pid: str) -> bool:
        return pid in self.personas

    def pairs(self) -> list[tuple[str, str]]:
        """Opposing pairs, each once, in catalog order."""
        seen, out = set(), []
        for p in self:
            if p.opposite and p.id not in seen:
                out.append((p.id, p.opposite))
                seen.update((p.id, p.opposite))
        return out

    def select(self, ids: Iterable[str] | None) -> "Catalog":
        """A sub-catalog; unknown ids are an error naming them all."""
        if not ids:
            return self
        ids = list(dict.fromkeys(ids))
        unknown = [i for i in ids if i not in self.personas]
        if unknown:
            raise CatalogError([f"{self.source or self.name}: unknown persona id(s): {', '.join(unknown)}"])
        return Catalog(self.name, {i: self.personas[i] for i in ids}, self.source)

    @property
    def content_hash(self) -> str:
        return content_hash([p.content_hash for p in self])

    def to_yaml(self) -> str:
        return yaml.safe_dump({"format": FORMAT, "name": self.name, "personas": [p.to_dict() for p in self]},
                              sort_keys=False, allow_unicode=True, width=100)

    def to_jsonl(self) -> str:
        return "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in self)


def validate(catalog: Catalog) -> list[str]:
    """Cross-persona checks: opposites exist and are mutual; no calibration/evaluation overlap."""
    problems = []
    folded: dict[str, Persona] = {}
    for p in catalog:
        bad_id = persona_id_problem(p.id)
        if bad_id:
            problems.append(f"{p.source}: field 'id': {bad_id}")
        first = folded.setdefault(p.id.lower(), p)
        if first is not p:
            problems.append(f"{p.source}: persona {p.id!r}: field 'id': differs from {first.id!r} "
                            f"({first.source}) only in case (they would share files on a case-insensitive store)")
        if p.opposite:
            other = catalog.personas.get(p.opposite)
            if other is None:
                problems.append(f"{p.source}: persona {p.id!r}: field 'opposite': {p.opposite!r} does not exist")
            elif other.opposite != p.id:
                problems.append(f"{p.source}: persona {p.id!r}: field 'opposite': {p.opposite!r} is not mutual "
                                f"({p.opposite!r} names {other.opposite!r})")
            if p.opposite == p.id:
                problems.append(f"{p.source}: persona {p.id!r}: field 'opposite': a persona cannot oppose itself")
        overlap = set(p.calibration) & set(p.evaluation)
        if overlap:
            sample = sorted(overlap)[0]
            problems.append(f"{p.source}: persona {p.id!r}: field 'evaluation': {len(overlap)} text(s) also in "
                            f"calibration, e.g. {sample[:60]!r}")
    return problems


def checked(catalog: Catalog) -> Catalog:
    """`catalog` itself once `validate` finds nothing, else CatalogError with every problem."""
    problems = validate(catalog)
    if problems:
        raise CatalogError(problems)
    return catalog
