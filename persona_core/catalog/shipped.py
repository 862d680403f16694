"""What the package ships in ``persona_core/data``: the built-in catalog, the reference persona's
texts, the generic questions and a held-out text.

* ``builtin`` (`BUILTIN`): the catalog of 8 opposing pairs, ``data/catalog.yaml``.
* The reference persona (`reference_persona`, id ``general``): neutral text (``data/general.txt``)
  calibrated like a persona, the other side of persona-vs-reference contrasts.
* The generic questions (``data/questions.txt``) that elicit in-role answers: the first half
  generates calibration texts, the second half is held out for role-play metrics.
* The held-out text (``data/heldout.txt``) that perplexity is measured on.
"""

from __future__ import annotations

from pathlib import Path

from persona_core.catalog.personas import REFERENCE_PERSONA_ID, Persona

DATA = Path(__file__).resolve().parents[1] / "data"
BUILTIN = "builtin"  # the name `load_catalog` reads the built-in catalog by
BUILTIN_CATALOG = DATA / "catalog.yaml"
REFERENCE_TEXTS = DATA / "general.txt"  # the reference persona's texts (general, persona-neutral text)


def reference_persona() -> Persona:
    """The reference persona: neutral text calibrated like a persona (for persona-vs-reference contrasts)."""
    texts = tuple(t for t in REFERENCE_TEXTS.read_text().splitlines() if t.strip())
    return Persona(REFERENCE_PERSONA_ID, "", texts, (), None, ("reference",), False, str(REFERENCE_TEXTS))


def generic_questions(part: str = "all") -> list[str]:
    """The built-in generic questions that elicit in-role answers.

    ``part="calibration"`` is the first half (what calibration texts are generated
    from), ``part="evaluation"`` the second half (held out for role-play metrics).
    """
    qs = [q for q in (DATA / "questions.txt").read_text().splitlines() if q.strip()]
    half = len(qs) // 2
    try:
        return {"all": qs, "calibration": qs[:half], "evaluation": qs[half:]}[part]
    except KeyError:
        raise ValueError(f"generic_questions: part must be all, calibration or evaluation, not {part!r}") from None


def heldout_text() -> str:
    """The project's own held-out text, no persona's (what perplexity is measured on)."""
    return (DATA / "heldout.txt").read_text()
