"""The knobs of a learned mask: how a persona's training data is made (`DataConfig`) and how the
learner runs (`LearnConfig`). Their hashes key learned masks and training data in the store."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from persona_core.masks.spec import MaskSpec
from persona_core.store.hashing import content_hash
from persona_core.versions import LEARN_VERSION

OBJECTIVES = ("with-prompt", "prompt-free")
LOSSES = ("kl", "lm")


@dataclass(frozen=True)
class DataConfig:
    """How a persona's training data is made from its description. `hash` keys it."""

    examples: int = 24  # question/answer pairs (at most the instructions available)
    max_new_tokens: int = 48  # answer length, tokens
    builtin: bool = True  # the calibration half of the project's generic questions
    instructions: tuple[str, ...] = ()  # extra instruction files: "URL" or "URL::field" (see catalog.load_texts)
    gen_batch_size: int = 8
    seed: int = 0  # which instructions a cap keeps

    def __post_init__(self):
        object.__setattr__(self, "instructions", tuple(self.instructions))
        for f in ("examples", "max_new_tokens", "gen_batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"DataConfig.{f} must be >= 1, got {getattr(self, f)}")
        if not self.builtin and not self.instructions:
            raise ValueError("DataConfig: no instructions (builtin is off and no instruction files are named)")

    @property
    def hash(self) -> str:
        d = asdict(self)
        d.pop("gen_batch_size")  # batching never changes a greedy answer's text... in exact arithmetic
        return content_hash(LEARN_VERSION, d)


@dataclass(frozen=True)
class LearnConfig:
    """The learner's knobs. `hash` keys a learned mask (with the data, persona and model)."""

    objective: str = "with-prompt"  # with-prompt | prompt-free
    loss: str = "kl"  # kl (to the dense model's answer distributions) | lm (on the dense answers)
    sparsity: float = 0.25  # fraction of MLP channels removed in every layer
    steps: int = 40
    lr: float = 0.03  # Adam, on per-layer standardised scores (chosen on validation: benchmarks/sweep_learn.py)
    batch_size: int = 4  # persona examples per step
    temperature: float = 0.5  # of the straight-through surrogate sigmoid((s - t) / T)
    general_weight: float = 2.0  # weight of the KL on general text (0: off); 2.0: same fidelity, less perplexity
    general_batch: int = 2  # general-text windows per step
    general_windows: int = 32  # WikiText-2 validation windows in the pool
    general_window: int = 128  # tokens per window
    teacher_topk: int = 64  # teacher log-probs kept per token (plus the tail's mass)
    init: str = "wanda"  # training-free channel importance the scores start from (a mask method)
    max_length: int = 384  # tokens per training sequence (prompt cut from the left)
    seed: int = 0
    checkpoint_every: int = 10  # steps between checkpoints (0: none)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"LearnConfig.objective: {self.objective!r} (use {', '.join(OBJECTIVES)})")
        if self.loss not in LOSSES:
            raise ValueError(f"LearnConfig.loss: {self.loss!r} (use {', '.join(LOSSES)})")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"LearnConfig.sparsity must be in [0, 1), got {self.sparsity}")
        for f in ("batch_size", "general_window", "teacher_topk", "max_length"):
            if getattr(self, f) < 1:
                raise ValueError(f"LearnConfig.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("steps", "general_batch", "general_windows", "checkpoint_every"):
            if getattr(self, f) < 0:
                raise ValueError(f"LearnConfig.{f} must be >= 0, got {getattr(self, f)}")
        if self.lr < 0 or self.temperature <= 0 or self.general_weight < 0:
            raise ValueError("LearnConfig: lr and general_weight must be >= 0 and temperature > 0")
        MaskSpec(self.init, self.sparsity, "ffn-channels")  # unknown init method: fail now

    @property
    def hash(self) -> str:
        d = asdict(self)
        d.pop("checkpoint_every")  # where it may stop, not what it computes
        return content_hash(LEARN_VERSION, d)

    @property
    def method(self) -> str:
        """The mask's method name in the store: ``learned-<objective>``."""
        return f"learned-{self.objective}"
