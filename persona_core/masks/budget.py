"""Capability budgets: the strongest mask whose general-text cost stays within a bound.

A `Budget` (``masks.budget``, e.g. ``{perplexity_ratio: 1.10}``) replaces a fixed sparsity:
for each persona or opposing pair, `search` looks for the mask setting (sparsity, and the
method's strength parameter where it has one, e.g. ``lam`` or ``tau``) with the largest
*validation* separation among the settings whose *validation* perplexity ratio (masked /
dense on general text) is within the budget.

The search is cheap because it exploits monotonicity: along one strength, perplexity grows
with sparsity, so the largest sparsity of a grid within the budget is found by bisection
(ceil(log2(grid size + 1)) perplexity evaluations instead of the whole grid), and
separation is measured only there (it grows with sparsity along a strength too: the largest
feasible sparsity of each strength is that strength's candidate). Among the strengths'
candidates the largest separation wins; ties go to the smaller sparsity, then the earlier
strength.

This module is the search and nothing else: it works on two callables,
``perplexity_ratio(setting) -> float`` and ``separation(setting) -> float``, so it is
tested with rigged functions. `persona_core.masks.budgeted_build` builds the real ones from
`persona_core.eval.validation` (WikiText-2 validation windows, validation statements carved from
the calibration statements: the same door the steering baseline's choice goes through).

An unreachable budget (no setting of the grid within it) is never silently violated: the
result says ``within_budget=False`` with a message, and holds the dense-most setting tried.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

from persona_core.store.hashing import content_hash
from persona_core.versions import BUDGET_VERSION

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Budget:
    """What a budgeted mask asks for: a bound on general-text cost, and how to search under it.

    Every field is part of the mask's key (a different budget or search is a different mask).
    """

    perplexity_ratio: float = 1.10  # masked/dense perplexity on the validation text must stay <= this
    min_sparsity: float = 0.005  # the grid: `steps` sparsities spaced geometrically from min_sparsity ...
    max_sparsity: float = 0.5  # ... to max_sparsity (fine where budgets bind: at a few percent)
    steps: int = 24
    strengths: Mapping[str, Sequence[float]] | None = None  # override the method's strength values
    ppl_text: str = "wikitext-2-valid"  # validation text: wikitext-2-valid, builtin:general or a file (never a test split)
    ppl_windows: int = 8  # perplexity on this many fixed windows (spread over the text) ...
    ppl_window: int = 128  # ... of this many tokens
    val_statements: int = 16  # validation statements per pole, held out of the calibration statements
    seed: int = 0  # which statements the validation split takes

    def __post_init__(self):
        problems = []
        if not (isinstance(self.perplexity_ratio, (int, float)) and self.perplexity_ratio >= 1.0):
            problems.append(f"perplexity_ratio must be a number >= 1 (the dense model is 1.0), "
                            f"got {self.perplexity_ratio!r}")
        if not 0.0 < self.min_sparsity <= self.max_sparsity < 1.0:
            problems.append(f"need 0 < min_sparsity <= max_sparsity < 1, got {self.min_sparsity!r}, "
                            f"{self.max_sparsity!r}")
        for name in ("steps", "ppl_windows", "ppl_window", "val_statements"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        if self.ppl_text.lower().rstrip("/").endswith(("test", "test.txt", "wikitext-2-test")):
            problems.append(f"ppl_text {self.ppl_text!r} looks like a test split: a budget may only "
                            "look at validation text")
        if self.strengths is not None:
            for k, vals in dict(self.strengths).items():
                if not vals or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
                    problems.append(f"strengths.{k} must be a non-empty list of numbers, got {vals!r}")
            object.__setattr__(self, "strengths", {k: tuple(float(v) for v in vals)
                                                   for k, vals in sorted(dict(self.strengths).items())})
        if problems:
            raise ValueError("budget: " + "; ".join(problems))

    @classmethod
    def from_value(cls, value) -> "Budget | None":
        """A budget from config: None, a Budget, a mapping of its fields, or a bare ratio."""
        if value is None or isinstance(value, Budget):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(perplexity_ratio=float(value))
        if isinstance(value, Mapping):
            known = {f for f in cls.__dataclass_fields__}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"budget: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
            return cls(**dict(value))
        raise ValueError(f"budget: expected null, a number or a mapping, got {value!r}")

    def grid(self) -> tuple[float, ...]:
        if self.steps == 1 or self.min_sparsity == self.max_sparsity:
            return (round(self.max_sparsity, 6),)
        ratio = self.max_sparsity / self.min_sparsity
        return tuple(dict.fromkeys(round(self.min_sparsity * ratio ** (i / (self.steps - 1)), 6)
                                   for i in range(self.steps)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["strengths"] = {k: list(v) for k, v in self.strengths.items()} if self.strengths else None
        return d

    @property
    def hash(self) -> str:
        return content_hash(BUDGET_VERSION, self.to_dict())

    @property
    def label(self) -> str:
        """Short, readable key segment, e.g. ``ppl1.1`` (the hash tells other search settings apart)."""
        return f"ppl{self.perplexity_ratio:g}"


@dataclass(frozen=True)
class Setting:
    """One point of the search: a sparsity and the strength parameter's value (None if the method has none)."""

    sparsity: float
    strength: float | None = None


@dataclass
class Point:
    setting: Setting
    perplexity_ratio: float
    separation: float | None = None

    def to_dict(self) -> dict:
        return {"sparsity": self.setting.sparsity, "strength": self.setting.strength,
                "perplexity_ratio": _num(self.perplexity_ratio), "separation": _num(self.separation)}


@dataclass
class SearchResult:
    """The chosen setting, every point tried (in order), and whether the budget was met."""

    budget: float
    strength_name: str | None
    chosen: Setting
    within_budget: bool
    points: list[Point] = field(default_factory=list)
    message: str = ""

    @property
    def chosen_point(self) -> Point | None:
        """The search's figures at the chosen setting (None if it was never tried: a later step-down)."""
        return next((p for p in self.points if p.setting == self.chosen), None)

    def to_dict(self) -> dict:
        cp = self.chosen_point
        return {"budget": {"perplexity_ratio": self.budget}, "strength_name": self.strength_name,
                "chosen": {"sparsity": self.chosen.sparsity, "strength": self.chosen.strength,
                           "perplexity_ratio": _num(cp.perplexity_ratio) if cp else None,
                           "separation": _num(cp.separation) if cp else None},
                "within_budget": self.within_budget, "message": self.message,
                "points": [p.to_dict() for p in self.points]}


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def search(grid: Sequence[float], budget: float, perplexity_ratio: Callable[[Setting], float],
           separation: Callable[[Setting], float] | None = None, strengths: Sequence[float | None] = (None,),
           strength_name: str | None = None, bisect: bool = True) -> SearchResult:
    """The setting with the largest separation among those within `budget` (see the module docstring).

    `grid`: sparsities in increasing order. `strengths`: the strength values to try (``(None,)``
    for a method without one). `separation=None` (a method that is the same for every persona)
    picks the largest feasible sparsity. ``bisect=False`` evaluates the whole grid (the
    reference the tests compare bisection with). A perplexity ratio that is NaN counts as
    over the budget.
    """
    grid = [float(s) for s in grid]
    if not grid or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"grid must be non-empty and strictly increasing, got {grid}")
    if not strengths:
        raise ValueError("strengths must hold at least one value (None for a method without one)")
    points: dict[Setting, Point] = {}

    def ppl(setting: Setting) -> float:
        if setting not in points:
            r = float(_call_ratio(perplexity_ratio, setting, budget))
            points[setting] = Point(setting, r)
            log.debug("budget search: %s -> ppl ratio %.4f", setting, r)
        return points[setting].perplexity_ratio

    def ok(setting: Setting) -> bool:
        r = ppl(setting)
        return not math.isnan(r) and r <= budget

    candidates: list[Setting] = []
    hint = None
    for t in strengths:
        at = [Setting(s, t) for s in grid]
        if bisect:
            best = _largest_feasible(at, ok, hint)
            hint = best if best is not None else hint
        else:
            feasible = [i for i, s in enumerate(at) if ok(s)]
            best = feasible[-1] if feasible else None
        if best is not None:
            candidates.append(at[best])
    if not candidates:
        dense_most = min(points.values(), key=lambda p: (p.setting.sparsity, _nan_last(p.perplexity_ratio)))
        msg = (f"budget perplexity ratio <= {budget:g} is unreachable: the dense-most setting tried "
               f"(sparsity {dense_most.setting.sparsity:g}"
               + (f", {strength_name}={dense_most.setting.strength:g}" if dense_most.setting.strength is not None
                  else "")
               + f") costs x{dense_most.perplexity_ratio:.3f}; keeping that setting, marked over budget")
        log.warning(msg)
        return SearchResult(budget, strength_name, dense_most.setting, False, list(points.values()), msg)
    if separation is None:
        chosen = max(candidates, key=lambda s: s.sparsity)
    else:
        for s in candidates:
            points[s].separation = float(separation(s))
        order = {t: i for i, t in enumerate(strengths)}
        chosen = max(candidates, key=lambda s: (_nan_low(points[s].separation), -s.sparsity, -order[s.strength]))
    return SearchResult(budget, strength_name, chosen, True, list(points.values()))


def _largest_feasible(settings: list[Setting], ok: Callable[[Setting], bool], hint: int | None = None) -> int | None:
    """Index of the last feasible setting, feasibility assumed monotone (True ... True False ... False).

    Plain bisection costs ceil(log2(n + 1)) evaluations (the first setting is always tried when none
    is feasible, the last when all are). With a `hint` (the previous strength's answer: boundaries
    move little between strengths) it first gallops out from the hint, 2 evaluations when the
    boundary did not move; under monotonicity both find the same index.
    """
    lo, hi = -1, len(settings)  # everything <= lo is feasible, everything >= hi is not
    if hint is not None and 0 <= hint < len(settings):
        step = 1
        if ok(settings[hint]):
            lo = hint
            while lo + step < hi and ok(settings[lo + step]):
                lo, step = lo + step, step * 2
            hi = min(hi, lo + step)
        else:
            hi = hint
            while hi - step > lo and not ok(settings[hi - step]):
                hi, step = hi - step, step * 2
            lo = max(lo, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(settings[mid]):
            lo = mid
        else:
            hi = mid
    return lo if lo >= 0 else None


def _call_ratio(fn: Callable, setting: Setting, budget: float) -> float:
    """`fn(setting, limit=budget)` when `fn` takes a limit (it may stop early once over it), else `fn(setting)`."""
    try:
        takes_limit = "limit" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_limit = False
    return fn(setting, limit=budget) if takes_limit else fn(setting)


def _nan_low(x: float | None) -> float:
    return -math.inf if x is None or math.isnan(x) else x


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def search_path(grid: Sequence[float], budget: float, perplexity_ratio: Callable[[Setting], float],
                separation: Callable[[Setting], float]) -> SearchResult:
    """The budget search along a learned k path (`persona_core.learn.contrastive`): the grid's points
    are visited in increasing order (a learner reaches a point only through the ones before it), the
    walk stops at the first point over `budget`, and among the points within it the one with the
    largest separation wins (ties: the smaller sparsity). Every visited point gets both figures, so
    no monotonicity of separation is assumed; perplexity is assumed to grow along the path (the walk
    stops at the first point over). None within: the first point, marked over budget."""
    grid = [float(s) for s in grid]
    if not grid or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"grid must be non-empty and strictly increasing, got {grid}")
    points: list[Point] = []
    for s in grid:
        setting = Setting(s)
        r = float(perplexity_ratio(setting))
        point = Point(setting, r)
        points.append(point)
        if math.isnan(r) or r > budget:
            break
        point.separation = float(separation(setting))
    feasible = [p for p in points if p.separation is not None]
    if not feasible:
        first = points[0]
        msg = (f"budget perplexity ratio <= {budget:g} is unreachable along the learned path: its first point "
               f"(sparsity {first.setting.sparsity:g}) costs x{first.perplexity_ratio:.3f}; keeping it, marked "
               "over budget")
        log.warning(msg)
        return SearchResult(budget, None, first.setting, False, points, msg)
    best = max(feasible, key=lambda p: (_nan_low(p.separation), -p.setting.sparsity))
    return SearchResult(budget, None, best.setting, True, points)
