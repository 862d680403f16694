"""`CalibConfig`: how calibration texts are rendered and run; its hash is the ``calib=`` segment of
every stats part and of every mask built from one. Plain Python (no torch), so configs load cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from persona_core.store.hashing import content_hash
from persona_core.versions import CALIB_VERSION


@dataclass(frozen=True)
class CalibConfig:
    """How calibration texts are rendered and run. Its `hash` keys every stats part."""

    max_length: int = 256  # tokens per text (longer texts are truncated)
    batch_size: int = 8
    chat_template: bool = True  # render through the tokenizer's chat template (else raw text)
    system_prompt: bool = False  # persona description as system prompt (off: a prompt-free subnetwork)
    user_prompt: str | None = None  # an optional user turn before each reply
    sort_by_length: bool = True  # batch texts of similar length together (less padding)
    # Generation, for personas given only by a description.
    gen_questions: int | None = None  # how many of the calibration half of `catalog.generic_questions()` (None: all)
    gen_max_new_tokens: int = 96
    gen_batch_size: int = 8
    # Also record, per MLP channel, its attribution to the texts' log-likelihood (group ``mlp_attr``:
    # a forward and backward pass more per batch); what `contrastive-attribution` masks are built from.
    attribution: bool = False

    def __post_init__(self):
        for name in ("max_length", "batch_size", "gen_max_new_tokens", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CalibConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.gen_questions is not None and self.gen_questions < 1:
            raise ValueError(f"CalibConfig.gen_questions must be >= 1 or None, got {self.gen_questions}")

    @property
    def hash(self) -> str:
        d = asdict(self)
        if not d["attribution"]:  # off: the hash of configs written before the option existed
            d.pop("attribution")
        return content_hash(CALIB_VERSION, d)

    def to_dict(self) -> dict:
        return asdict(self)
