"""The conditions a persona is scored under: which weights, which prompt, which hook.

* ``dense``          the unpruned model, no system prompt
* ``dense+prompt``   the unpruned model, the persona description as system prompt
                     (the prompting baseline)
* ``dense+fewshot``  retrieval-augmented prompting: the description plus k calibration
                     statements as examples (`persona_core.eval.fewshot`)
* ``dense+steer``    activation steering from the residual-stream statistics, layer and
                     coefficient chosen per pair on validation data (`persona_core.eval.steered`);
                     opt-in: it needs those statistics
* ``dense+steer-learned`` one residual-stream vector per pair learned with the learned masks' objective
                     (statement margin + general-text KL), layer and scale chosen within the same budget
                     (`persona_core.eval.steered`); opt-in (it trains, per pair)
* ``masked``         the subnetwork, no prompt
* ``masked+prompt``  the subnetwork with the prompt
* ``masked+fewshot`` the subnetwork with the few-shot prompt (the same k as ``dense+fewshot``): does a
                     mask add to few-shot? opt-in

`CONDITIONS` is their registry (in this order, which is also the order of result rows).
Dense conditions do not depend on the mask, so they are computed once per persona.
"""

from __future__ import annotations

from dataclasses import dataclass

from persona_core.catalog import Persona
from persona_core.eval.fewshot import FewShot
from persona_core.registry import Registry

PROMPTS = ("none", "description", "fewshot")


@dataclass(frozen=True)
class Condition:
    name: str
    masked: bool  # scored with the mask applied (else the dense weights)
    prompt: str = "none"  # system prompt: none, the persona's description, or description + few-shot examples
    steered: bool = False  # a steering hook on the residual stream while scoring
    default: bool = True  # in DEFAULT_CONDITIONS

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise ValueError(f"condition {self.name!r}: prompt {self.prompt!r} is not one of {', '.join(PROMPTS)}")

    def system(self, persona: Persona) -> str | None:
        """The one system prompt of every item (None under ``none`` and ``fewshot``)."""
        return persona.description if self.prompt == "description" else None

    def fewshot(self, persona: Persona, opposite: Persona | None, k: int, seed: int) -> FewShot | None:
        """The per-question few-shot prompts under ``fewshot`` (never an evaluation statement of the pair)."""
        return FewShot.for_persona(persona, opposite, k, seed) if self.prompt == "fewshot" else None


CONDITIONS: Registry[Condition] = Registry("condition")


def condition(name: str, *, masked: bool, prompt: str = "none", steered: bool = False,
              default: bool = True) -> Condition:
    """Register condition `name` (a name registered twice raises)."""
    return CONDITIONS.add(name, Condition(name, masked, prompt, steered, default))


condition("dense", masked=False)
condition("dense+prompt", masked=False, prompt="description")
condition("dense+fewshot", masked=False, prompt="fewshot")
condition("dense+steer", masked=False, steered=True, default=False)
condition("dense+steer-learned", masked=False, steered=True, default=False)
condition("masked", masked=True)
condition("masked+prompt", masked=True, prompt="description")
condition("masked+fewshot", masked=True, prompt="fewshot", default=False)

DENSE_CONDITIONS: tuple[str, ...] = tuple(name for name, c in CONDITIONS.items() if not c.masked)
DEFAULT_CONDITIONS: tuple[str, ...] = tuple(name for name, c in CONDITIONS.items() if c.default)
