"""`EvalConfig`: everything that decides an evaluation's numbers; its `hash` keys the results.

Speed knobs (`batch_size`, `gen_batch_size`) are left out of the hash: they never change a
number. `dense_hash` is the hash of the config's dense part, what the dense rows depend on.
Condition and metric names are checked against their registries (`persona_core.eval.conditions`,
`persona_core.eval.metrics`) when a config is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from persona_core.calib.general_text import check_general_text, is_dataset_file
from persona_core.eval.conditions import CONDITIONS, DEFAULT_CONDITIONS, DENSE_CONDITIONS
from persona_core.eval.fewshot import SELECTIONS
from persona_core.eval.judge import JudgeSettings
from persona_core.eval.metrics import METRICS
from persona_core.eval.steering import SteerSettings
from persona_core.store.hashing import content_hash
from persona_core.versions import EVALUATE_VERSION


# knobs added after results were stored, at their defaults: left out of `EvalConfig.hash`
LATER_DEFAULTS = {"fewshot_select": "fixed", "fewshot_ks": (0, 1, 2, 4, 8, 16, 32, 64), "steer_refine": 0}


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation's numbers; `.hash` keys its results."""

    conditions: tuple[str, ...] = DEFAULT_CONDITIONS
    metrics: tuple[str, ...] = ("statement-preference", "yes-no-agreement", "perplexity", "roleplay-fidelity")
    batch_size: int = 16  # sequences per forward pass
    gen_batch_size: int = 8  # prompts per generate() call
    max_statements: int = 32  # held-out statements per side (persona, opposite)
    max_questions: int = 8  # generic questions for role-play answers
    max_new_tokens: int = 40  # length of the dense model's in-role answers (and of sample generations)
    samples: int = 2  # generic questions answered per condition by the sample-generations metric
    max_length: int = 512  # tokens per sequence (contexts are cut from the left, keeping a leading <bos>)
    ppl_window: int = 128  # tokens per perplexity window
    ppl_windows: int = 8  # windows per text
    ppl_texts: tuple[str, ...] = ()  # extra text files/datasets (URL or URL::field) for perplexity
    ppl_text: str | None = None  # the reported general text (a general-text spec: a file, wikitext-2-test,
    # builtin:general, a URL, hf:DATASET/CONFIG:SPLIT; see persona_core.calib.general_text); None: builtin:heldout
    seed: int = 0  # which items a max_* cap keeps
    # baselines (dense+fewshot, dense+steer) and what picks their settings
    fewshot_k: int = 8  # calibration statements shown as examples (fewshot_select: fixed)
    fewshot_select: str = "fixed"  # fixed: fewshot_k; validation: k chosen per pair on validation statements
    fewshot_ks: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64)  # candidates of k (plus the most that fit)
    steer_layers: tuple[float, ...] = (0.25, 0.4, 0.55, 0.7)  # fractions of depth (or layer indices >= 1)
    steer_alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    steer_refine: int = 0  # bisections of alpha at the budget's edge, both steering baselines (`SteerSettings.refine`)
    ppl_budget: float = 1.10  # max general-text perplexity ratio of a chosen setting (validation text)
    val_statements: int = 16  # validation statements per pole, carved from the calibration statements
    val_text: str | None = None  # validation general text (a spec, e.g. wikitext-2-valid); None: builtin:general
    val_window: int = 128
    val_windows: int = 8
    judge: JudgeSettings | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditions", tuple(self.conditions))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "ppl_texts", tuple(self.ppl_texts))
        object.__setattr__(self, "steer_layers", tuple(self.steer_layers))
        object.__setattr__(self, "steer_alphas", tuple(self.steer_alphas))
        self.steer_settings  # validates the steering search space
        for name, registry in (("conditions", CONDITIONS), ("metrics", METRICS)):
            names = getattr(self, name)
            if not names:
                raise ValueError(f"EvalConfig.{name}: none given; available: {', '.join(registry)}")
            problems = registry.check(names)
            if problems:
                raise ValueError(f"EvalConfig.{name}: " + "; ".join(problems))
        for name in ("ppl_text", "val_text"):  # a missing text stops the config, not the run
            spec = getattr(self, name)
            if spec is not None and not is_dataset_file(spec):
                check_general_text(spec, f"EvalConfig.{name}")
        if self.fewshot_k < 0:
            raise ValueError(f"EvalConfig.fewshot_k must be >= 0, got {self.fewshot_k}")
        object.__setattr__(self, "fewshot_ks", tuple(self.fewshot_ks))
        if self.fewshot_select not in SELECTIONS:
            raise ValueError(f"EvalConfig.fewshot_select must be one of {', '.join(SELECTIONS)}, "
                             f"got {self.fewshot_select!r}")
        if not self.fewshot_ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                          for k in self.fewshot_ks):
            raise ValueError(f"EvalConfig.fewshot_ks must be integers >= 0, got {list(self.fewshot_ks)}")
        if "judge" in self.metrics and self.judge is None:
            raise ValueError("metric 'judge' needs judge settings (an endpoint URL or a local model)")
        for f in ("batch_size", "gen_batch_size", "max_statements", "max_questions", "max_new_tokens",
                  "max_length", "ppl_window", "ppl_windows", "val_statements", "val_window", "val_windows", "samples"):
            if getattr(self, f) < 1:
                raise ValueError(f"EvalConfig.{f} must be >= 1, got {getattr(self, f)}")

    @property
    def steer_settings(self) -> SteerSettings:
        return SteerSettings(self.steer_layers, self.steer_alphas, self.ppl_budget, refine=self.steer_refine)

    @property
    def hash(self) -> str:
        d = asdict(self)
        for k in ("batch_size", "gen_batch_size"):  # speed knobs never change a number
            d.pop(k)
        for k, default in LATER_DEFAULTS.items():  # knobs added later count only when set: old hashes stay
            if d[k] == default:
                d.pop(k)
        return content_hash(EVALUATE_VERSION, d)

    @property
    def dense_hash(self) -> str:
        """What decides the dense conditions' rows: the config with only its dense conditions (two runs
        that differ only in their masked conditions share the dense rows)."""
        return replace(self, conditions=tuple(c for c in self.conditions if c in DENSE_CONDITIONS) or ("dense",)).hash

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in fields(cls)]
