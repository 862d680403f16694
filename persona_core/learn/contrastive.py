"""``learned-contrastive``: one mask per pole of an opposing pair, learned with the weights frozen.

For a pair (A, B) each pole gets its own scores over mask *units* and its own loss
(`persona_core.eval.objective.Objective`): minus the statement-preference margin (mean
log-prob of its own training statements minus the opposite's, in the evaluator's statement
format) plus ``general_weight`` x the KL to the dense model on general-text windows. Each
step keeps the top k units of every segment (a hard 0/1 forward), and the backward pass sees
``sigmoid((score - t) / temperature)`` (`persona_core.learn.gate.straight_through`): the
gradient reaches the scores and nothing else.

Units (the method's ``unit`` parameter):

* ``ffn-channels``: the MLP intermediate channels of every layer (the down projection's input;
  the stored mask also drops the channels' gate/up rows: the same function);
* ``input-channels``: the input columns of every linear layer, one mask per group of layers
  that read the same input (q/k/v, o, gate/up, down), k per group.

Scores start as the standardised log of the training-free scores of ``init`` (a contrastive
method, default ``contrastive-importance``) summed per unit, so with a zero learning rate the mask
is exactly the training-free mask of that method and unit.

**The k path.** One run per pair walks the sparsities of a grid in increasing order: ``warmup``
+ ``steps`` Adam steps at the first, ``steps`` more at each next one, starting from where the
previous point stopped (k shrinks, the scores carry over). After each point the keep-masks are
snapshotted (the checkpoint holds every snapshot) and `persona_core.masks.budget.search_path`
judges it: validation perplexity ratio (the larger of the two poles') and validation separation;
the walk stops at the first point over the budget, and the point with the largest validation
separation within it is the mask. The masks of successive points are **not nested**: a later
point's scores moved, so a unit kept at a larger sparsity may have been dropped at a smaller one
(the snapshots are stored per point, never derived from one another).

Data: the validation statements are those of the budget search (a seeded split of each pole's
calibration statements); the training statements are the remaining calibration statements, and a
training statement equal to any validation or evaluation statement of the pair fails the run
(`LeakError`). General-text windows for the KL come from the budget's validation text, never the
windows the budget's perplexity is measured on.

Determinism: statements and windows of every step are drawn from (seed, step), Adam is plain
arithmetic on one tensor, so a learner resumed from a checkpoint ends bit-identical.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from persona_core.calib.stats import PersonaStats
from persona_core.catalog.personas import Persona
from persona_core.eval.objective import (Objective, StatementBatch, adam_step, check_disjoint, general_examples,
                                         pad_id, training_statements)
from persona_core.eval.validation import text_windows, validation_separation
from persona_core.learn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from persona_core.learn.gate import InputGate, hard_topk, straight_through
from persona_core.masks.budget import Budget, SearchResult, Setting, search_path
from persona_core.masks.budgeted_build import BudgetOutcome, PairSearch, resolve_validation_text
from persona_core.masks.build import channel_module_masks, ffn_channel_scores
from persona_core.masks.inputs import LinearWeights, group_stats
from persona_core.masks.methods import LEARNED_UNITS, METHODS
from persona_core.masks.select import n_pruned
from persona_core.masks.spec import MaskSpec
from persona_core.models.layers import LinearGroup

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "persona-contrastive-learner/v1"
PRECISIONS = ("fp32", "bf16")


# ---------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Segment:
    """One block of units with its own k: a group of linear layers reading one input (its columns)."""

    group: LinearGroup
    offset: int
    width: int

    def k(self, sparsity: float) -> int:
        return self.width - n_pruned(self.width, sparsity)


def segments(lw: LinearWeights, unit: str) -> list[Segment]:
    """The unit's segments in forward order: ``mlp_out`` groups (ffn-channels) or every group."""
    if unit not in LEARNED_UNITS:
        raise ValueError(f"learned mask unit {unit!r} (use {', '.join(LEARNED_UNITS)})")
    out, off = [], 0
    for g in lw.groups:
        if unit == "ffn-channels" and g.name != "mlp_out":
            continue
        if unit == "ffn-channels" and len(g.modules) != 1:
            raise ValueError(f"layer {g.layer}: ffn-channels needs one MLP down projection")
        out.append(Segment(g, off, g.in_features))
        off += g.in_features
    if not out:
        raise ValueError(f"the model has no linear groups for unit {unit!r}")
    return out


def initial_scores(lw: LinearWeights, stats: Sequence, init: str, unit: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [2, N] float64, tiebreak [N]): per segment, the standardised log of `init`'s training-free
    unit scores (both poles). Their top k per segment is `init`'s training-free mask of that unit."""
    method = METHODS[init]
    if method.sides != 2 or method.learned or method.reads:
        raise ValueError(f"learned-contrastive init {init!r}: use a persona/opposite contrastive method that scores "
                         "weights (e.g. contrastive-wanda, contrastive-penalty)")
    segs = segments(lw, unit)
    device = lw.weight(segs[0].group.modules[0]).device  # statistics move to the weights (CPU or GPU)
    raw: list[tuple[torch.Tensor, ...]] = []
    ties: list[torch.Tensor] = []
    if unit == "ffn-channels":  # exactly what the training-free ffn-channels mask ranks
        by_layer = {layer: (scores, tie) for layer, scores, tie in
                    ffn_channel_scores(lw, stats, MaskSpec(init, 0.5, "ffn-channels"), device)}
        for s in segs:
            scores, tie = by_layer[s.group.layer]
            raw.append(tuple(x.cpu() for x in scores))
            ties.append(tie.cpu())
    else:
        params = method.resolve({})
        for s in segs:
            gstats = group_stats(stats, (s.group.layer, s.group.name), device)
            sums = [torch.zeros(s.width, dtype=torch.float64, device=device) for _ in range(2)]
            tie = torch.zeros(s.width, dtype=torch.float64, device=device)
            for name in s.group.modules:
                absw = lw.weight(name).abs()
                for side, sc in enumerate(method.fn(absw, gstats, params)):
                    sums[side] += sc.sum(0, dtype=torch.float64)
                tie += absw.sum(0, dtype=torch.float64)
            raw.append(tuple(x.float().cpu() for x in sums))
            ties.append(tie.float().cpu())
    rows = []
    for side in range(2):
        parts = []
        for scores in raw:
            x = scores[side].double().clamp_min(1e-300).log()
            sd = x.std() if x.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
            parts.append((x - x.mean()) / (sd if sd > 0 else 1.0))
        rows.append(torch.cat(parts))
    return torch.stack(rows), torch.cat([t.float() for t in ties])


class UnitGate(InputGate):
    """An `InputGate` on every layer in the segments' groups: each multiplies its input by its
    segment's slice of `values` ([N])."""

    def __init__(self, model: nn.Module, segs: Sequence[Segment]):
        super().__init__([(model.get_submodule(name), slice(s.offset, s.offset + s.width))
                          for s in segs for name in s.group.modules])


def keep_of(scores: torch.Tensor, tiebreak: torch.Tensor, segs: Sequence[Segment], sparsity: float) -> torch.Tensor:
    """Bool [N]: the top k units of every segment (ties: tiebreak, then lower index)."""
    parts = [hard_topk(scores[s.offset: s.offset + s.width][None], s.k(sparsity),
                       tiebreak[s.offset: s.offset + s.width][None])[0].cpu() for s in segs]
    return torch.cat(parts)


def gate_values(scores: torch.Tensor, tiebreak: torch.Tensor, segs: Sequence[Segment], sparsity: float,
                temperature: float) -> torch.Tensor:
    """[N] hard 0/1 values forward, the straight-through surrogate's gradient backward."""
    parts = [straight_through(scores[s.offset: s.offset + s.width][None], s.k(sparsity),
                              tiebreak[s.offset: s.offset + s.width][None], temperature)[0] for s in segs]
    return torch.cat(parts)


def module_masks(lw: LinearWeights, segs: Sequence[Segment], keep: torch.Tensor, unit: str) -> dict[str, torch.Tensor]:
    """Ordinary module keep-masks (bool, the weights' shapes) of a unit keep-vector."""
    keep = keep.bool().cpu()
    if unit == "ffn-channels":
        channels = {s.group.layer: keep[s.offset: s.offset + s.width] for s in segs}
        return dict(channel_module_masks(lw, channels))
    out = {}
    for s in segs:
        cols = keep[s.offset: s.offset + s.width]
        for name in s.group.modules:
            out[name] = cols.unsqueeze(0).expand(tuple(lw.tensors[name].shape)).contiguous()
    return out


# ---------------------------------------------------------------------------- the learner


@dataclass(frozen=True)
class Knobs:
    """The method's learning parameters (`learned-contrastive`'s registry defaults; see docs/learned-masks.md)."""

    init: str = "contrastive-importance"  # a cheap start: chosen on validation (issue 26, docs/learned-masks.md)
    unit: str = "ffn-channels"
    steps: int = 2  # Adam steps per point of the k path (each point starts where the previous one stopped)
    warmup: int = 8  # extra steps at the first point
    lr: float = 0.05
    batch: int = 8  # statements per pole per step
    general_weight: float = 1.0
    general_batch: int = 2  # general windows per step
    temperature: float = 0.5
    seed: int = 0
    precision: str = "fp32"  # the steps' arithmetic: fp32 (the model's), or a bf16 copy (`learning_model`)

    @classmethod
    def of(cls, params: Mapping) -> "Knobs":
        k = cls(**{f: params[f] for f in cls.__dataclass_fields__ if f in params})
        if k.unit not in LEARNED_UNITS:
            raise ValueError(f"learned-contrastive: unit {k.unit!r} (use {', '.join(LEARNED_UNITS)})")
        for f in ("steps", "warmup", "general_batch"):
            if not isinstance(getattr(k, f), int) or getattr(k, f) < 0:
                raise ValueError(f"learned-contrastive: {f} must be an integer >= 0, got {getattr(k, f)!r}")
        if not isinstance(k.batch, int) or k.batch < 1:
            raise ValueError(f"learned-contrastive: batch must be an integer >= 1, got {k.batch!r}")
        if k.precision not in PRECISIONS:
            raise ValueError(f"learned-contrastive: precision {k.precision!r} (use {', '.join(PRECISIONS)})")
        if k.lr < 0 or k.general_weight < 0 or k.temperature <= 0:
            raise ValueError("learned-contrastive: lr and general_weight must be >= 0, temperature > 0")
        return k


@dataclass
class PathState:
    """A learner's resumable state: scores and Adam's moments of both poles, the step, and the
    snapshots (keep bits, both poles) and figures of every finished point of the path."""

    step: int
    scores: torch.Tensor  # [2, N] float64
    m: torch.Tensor
    v: torch.Tensor
    snapshots: torch.Tensor  # [P, 2, N] uint8 (rows of points not reached: zeros)
    figures: dict[int, dict] = field(default_factory=dict)  # point -> {"ppl": ..., "separation": ...}

    def to_bytes(self, owner: Mapping[str, str]) -> bytes:
        return save_checkpoint({"scores": self.scores, "m": self.m, "v": self.v, "snapshots": self.snapshots},
                               self.step, CHECKPOINT_FORMAT, owner,
                               {"figures": json.dumps({str(k): v for k, v in sorted(self.figures.items())})})

    @classmethod
    def from_bytes(cls, data: bytes, owner: Mapping[str, str], n: int, points: int, max_step: int) -> "PathState":
        tensors, meta, step = load_checkpoint(data, CHECKPOINT_FORMAT, owner, {
            "scores": (2, n), "m": (2, n), "v": (2, n), "snapshots": (points, 2, n)}, max_step)
        try:
            figures = {int(k): dict(v) for k, v in json.loads(meta.get("figures") or "{}").items()}
        except (ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(f"figures unreadable ({err})") from None
        if any(not 0 <= k < points for k in figures):
            raise CheckpointError("figures name points outside the path")
        return cls(step, tensors["scores"].double(), tensors["m"].double(), tensors["v"].double(),
                   tensors["snapshots"].to(torch.uint8), figures)


def learning_model(model: nn.Module, precision: str) -> nn.Module:
    """The model the Adam steps run on: `model` itself, or for ``precision: bf16`` a bf16 copy of it on the
    same device (unless it is bf16 already). A copy, not autocast: autocast recasts every frozen weight
    at every call (Gemma's 168M-parameter tied head several times a step), which ate most of its gain.
    The caller's model, which the path's validation figures and the evaluation read, stays as it is."""
    if precision != "bf16" or next(model.parameters()).dtype == torch.bfloat16:
        return model
    return copy.deepcopy(model).to(torch.bfloat16)


class LearnerNaN(FloatingPointError):
    """The learner's loss or gradient stopped being finite."""


class PairLearner:
    """Both poles' scores along one k path (`points`: sparsities, increasing). See the module docstring.

    `objectives`: (pole A's, pole B's). The model's parameters must be frozen (requires_grad False).
    """

    def __init__(self, model: nn.Module, lw: LinearWeights, objectives: tuple[Objective, Objective],
                 scores: torch.Tensor, tiebreak: torch.Tensor, knobs: Knobs, points: Sequence[float],
                 name: str = "learned-contrastive"):
        self.model, self.lw, self.objectives, self.knobs = learning_model(model, knobs.precision), lw, objectives, knobs
        self.segs = segments(lw, knobs.unit)
        self.points = [float(p) for p in points]
        if not self.points or any(b <= a for a, b in zip(self.points, self.points[1:])):
            raise ValueError(f"k path: sparsities must be non-empty and increasing, got {self.points}")
        self.n = self.segs[-1].offset + self.segs[-1].width
        if tuple(scores.shape) != (2, self.n):
            raise ValueError(f"scores of shape {tuple(scores.shape)}, the unit {knobs.unit} has (2, {self.n})")
        self.tiebreak, self.name = tiebreak.cpu(), name
        z = torch.zeros((2, self.n), dtype=torch.float64)
        self.resume(PathState(0, scores.double().clone(), z, z.clone(),
                              torch.zeros((len(self.points), 2, self.n), dtype=torch.uint8)))
        self.gate = UnitGate(self.model, self.segs)
        self.history: list[dict] = []
        self.seconds = 0.0

    def resume(self, state: PathState) -> None:
        """Carry on from `state` (a checkpoint's, or the start), its tensors on the model's device."""
        device = next(self.model.parameters()).device
        self.state = PathState(state.step, state.scores.to(device), state.m.to(device), state.v.to(device),
                               state.snapshots.clone(), dict(state.figures))

    def end_of(self, point: int) -> int:
        """The step count at which `point` is finished."""
        return self.knobs.warmup + self.knobs.steps * (point + 1)

    @property
    def total_steps(self) -> int:
        return self.end_of(len(self.points) - 1)

    def point_of(self, step: int) -> int:
        """The path point whose sparsity step `step` (0-based) learns at."""
        return next(i for i in range(len(self.points)) if step < self.end_of(i))

    def done(self, point: int) -> bool:
        return self.state.step >= self.end_of(point)

    def snapshotted(self, point: int) -> bool:
        return bool(self.state.snapshots[point].any())

    def step(self) -> dict:
        st, kn = self.state, self.knobs
        sparsity = self.points[self.point_of(st.step)]
        grads, info = [], {"step": st.step + 1, "sparsity": sparsity}
        for side in (0, 1):
            scores = st.scores[side].detach().requires_grad_(True)
            self.gate.values = gate_values(scores, self.tiebreak, self.segs, sparsity, kn.temperature).float()
            loss, figures = self.objectives[side](self.model, st.step, side)
            if not torch.isfinite(loss.detach()):
                raise LearnerNaN(f"{self.name}: the loss of pole {side} is not finite at step {st.step + 1} "
                                 f"({figures}); lower lr (now {kn.lr:g}) or check the model's numerics (dtype)")
            # a point that keeps every unit (or none) has no surrogate: the scores get no gradient there
            (g,) = (torch.autograd.grad(loss, scores) if loss.requires_grad else (torch.zeros_like(scores),))
            if not torch.isfinite(g).all():
                raise LearnerNaN(f"{self.name}: non-finite gradient of pole {side} at step {st.step + 1}; "
                                 f"lower lr (now {kn.lr:g}) or check the model's numerics (dtype)")
            grads.append(g.detach())
            info.update({f"{k}_{side}": v for k, v in figures.items()})
        self.gate.values = None
        adam_step(st.scores, torch.stack(grads).to(st.scores.dtype), st.m, st.v, st.step + 1, kn.lr)
        st.step += 1
        self.history.append(info)
        return info

    def advance(self, point: int, on_checkpoint: Callable[[PathState], None] | None = None) -> None:
        """Learn until `point` is finished (snapshotting every point passed), then checkpoint."""
        for p in self.model.parameters():
            if p.requires_grad:
                raise ValueError(f"{self.name}: the model's parameters must be frozen (requires_grad=False)")
        t0 = time.perf_counter()
        with self.gate:
            self._snapshot_due(point, on_checkpoint, missing_only=True)  # points ending here (0 steps per point)
            while not self.done(point):
                info = self.step()
                if info["step"] % 8 == 0:
                    log.info("%s step %d s=%g loss %.4f/%.4f", self.name, info["step"], info["sparsity"],
                             info.get("loss_0", math.nan), info.get("loss_1", math.nan))
                self._snapshot_due(point, on_checkpoint)
        self.seconds += time.perf_counter() - t0

    def _snapshot_due(self, point: int, on_checkpoint: Callable[[PathState], None] | None,
                      missing_only: bool = False) -> None:
        """Snapshot every point up to `point` that ends at the current step (with ``steps`` 0 several
        points end at one step; each gets its own sparsity's top k), then checkpoint once. `missing_only`:
        only points not snapshotted yet (a resumed learner standing at a finished point rewrites nothing)."""
        due = [i for i in range(point + 1) if self.end_of(i) == self.state.step
               and not (missing_only and self.snapshotted(i))]
        for i in due:
            self.state.snapshots[i] = torch.stack([self.keep(side, self.points[i]) for side in (0, 1)]
                                                  ).to(torch.uint8)
        if due and on_checkpoint is not None:
            on_checkpoint(self.state)

    def keep(self, side: int, sparsity: float) -> torch.Tensor:
        return keep_of(self.state.scores[side], self.tiebreak, self.segs, sparsity)

    def masks_at(self, point: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Both poles' module masks at a finished point (from its snapshot)."""
        if not self.done(point):
            raise ValueError(f"{self.name}: point {point} not learned yet")
        snap = self.state.snapshots[point]
        return (module_masks(self.lw, self.segs, snap[0], self.knobs.unit),
                module_masks(self.lw, self.segs, snap[1], self.knobs.unit))


# ---------------------------------------------------------------------------- one pair, under a budget or not


def kl_windows(tokenizer, source: str, budget: Budget, exclude: Sequence[list[int]], count: int = 16
               ) -> list[list[int]]:
    """General-text windows for the KL term: from the validation text, none of the budget's own windows."""
    taken = {tuple(w) for w in exclude}
    pool = text_windows(tokenizer, source, budget.ppl_window, budget.ppl_windows + 2 * count)
    return [w for w in pool if tuple(w) not in taken][:count]


@dataclass
class PairOutcome:
    """Both poles' masks at the chosen point, as a plain fixed-sparsity spec, and how they were found."""

    spec: MaskSpec
    masks: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
    result: SearchResult | None  # the budget search along the path (None: a fixed sparsity)
    final_ratio: float  # validation perplexity ratio of the chosen masks (the larger pole's)
    seconds: float
    learner: PairLearner
    resumed_from: int
    points: list[float]
    val_text: dict | None = None  # the budget's validation text (`GeneralText.record`): the KL windows' source too

    def metadata(self) -> dict:
        """Mask metadata: ``budget_search`` as every budgeted mask has it (budgeted only) and ``learn``."""
        ln = self.learner
        out: dict = {}
        if self.result is not None:
            out["budget_search"] = BudgetOutcome(self.spec, self.masks, self.result, self.final_ratio,
                                                 self.seconds, self.val_text).metadata()
        out["learn"] = {"knobs": dict(ln.knobs.__dict__), "path": self.points, "steps_run": ln.state.step,
                        "resumed_from": self.resumed_from, "learn_seconds": round(ln.seconds, 2), "units": ln.n,
                        "nested": False, "val_perplexity_ratio": self.final_ratio,
                        "figures": {str(k): v for k, v in sorted(ln.state.figures.items())},
                        "seconds": round(self.seconds, 2)}
        if self.val_text is not None:
            out["learn"]["general_text"] = self.val_text
        return out


def learn_pair(evaluator, weights: LinearWeights, spec: MaskSpec, roles: Sequence[tuple[str, Persona]],
               stats: Sequence[PersonaStats], calib_config=None, *, owner: Mapping[str, str] | None = None,
               read_checkpoint: Callable[[], bytes | None] | None = None,
               write_checkpoint: Callable[[bytes], None] | None = None,
               drop_checkpoint: Callable[[], None] | None = None,
               on_point: Callable[[PathState], None] | None = None) -> PairOutcome:
    """Learn one pair's two masks for `spec` (method ``learned-contrastive``): along the budget's grid
    when the spec has a budget (the point with the largest validation separation within it), else at
    the spec's sparsity. Checkpoint callbacks: bytes in and out of the store (the caller's key);
    `on_point` runs after every point's checkpoint (tests: a simulated kill)."""
    t0 = time.perf_counter()
    method = METHODS[spec.method]
    if not method.learned:
        raise ValueError(f"learn_pair: {spec.method!r} is not a learned method")
    knobs = Knobs.of(spec.resolved_params)
    budget = spec.budget
    search = PairSearch(evaluator, weights, spec, budget or Budget(), roles, stats, calib_config=calib_config)
    a, b = search.pair
    check_disjoint([*search.validation[a.id], *search.validation[b.id]], [*a.evaluation, *b.evaluation],
                   f"learned-contrastive validation statements of {a.id}/{b.id}")
    held = [*search.validation[a.id], *search.validation[b.id], *a.evaluation, *b.evaluation]
    train_a = training_statements(a, search.validation[a.id], held, "learned-contrastive")
    train_b = training_statements(b, search.validation[b.id], held, "learned-contrastive")
    ev = evaluator
    ev.masks.restore()
    pad = pad_id(ev.tokenizer)
    general = []
    if knobs.general_weight > 0 and knobs.general_batch > 0:
        source = resolve_validation_text(search.budget.ppl_text)
        general = general_examples(ev.model, ev.tokenizer, kl_windows(ev.tokenizer, source, search.budget,
                                                                      search.windows))
    sa, sb = StatementBatch.of(ev, train_a), StatementBatch.of(ev, train_b)
    common = dict(general=general, batch=knobs.batch, general_batch=knobs.general_batch,
                  general_weight=knobs.general_weight, seed=knobs.seed, pad=pad)
    objectives = (Objective(sa, sb, **common), Objective(sb, sa, **common))
    lw = weights
    scores, tiebreak = initial_scores(lw, search.fit_stats, knobs.init, knobs.unit)
    points = list(search.budget.grid()) if budget is not None else [float(spec.sparsity)]
    name = f"learned-contrastive {a.id}/{b.id}"
    learner = PairLearner(ev.model, lw, objectives, scores, tiebreak, knobs, points, name)
    owner = dict(owner or {})
    resumed_from = 0
    data = read_checkpoint() if read_checkpoint else None
    if data is not None:
        try:
            state = PathState.from_bytes(data, owner, learner.n, len(points), learner.total_steps)
            learner.resume(state)  # the same learner: its bf16 copy of the model is made once
            resumed_from = state.step
            log.info("%s: resuming from step %d", name, state.step)
        except CheckpointError as err:  # ours: delete it and start over
            log.warning("%s: checkpoint refused (%s); deleting it and learning from step 0", name, err)
            if drop_checkpoint:
                drop_checkpoint()

    def checkpoint(st: PathState) -> None:
        if write_checkpoint is not None:
            write_checkpoint(st.to_bytes(owner))
        if on_point is not None:
            on_point(st)

    index = {p: i for i, p in enumerate(points)}

    def at(setting: Setting) -> tuple[dict, dict]:
        i = index[setting.sparsity]
        if not learner.done(i) or not learner.snapshotted(i):
            learner.advance(i, checkpoint)
        return learner.masks_at(i)

    def ppl(setting: Setting) -> float:
        i = index[setting.sparsity]
        fig = learner.state.figures.setdefault(i, {})
        if "ppl" not in fig:
            fig["ppl"] = search.ratio(at(setting))
            if write_checkpoint is not None:
                write_checkpoint(learner.state.to_bytes(owner))
        return fig["ppl"]

    def separation(setting: Setting) -> float:
        i = index[setting.sparsity]
        fig = learner.state.figures.setdefault(i, {})
        if "separation" not in fig:
            ma, mb = at(setting)
            fig["separation"] = validation_separation(ev, a, b, lambda: ev.masked(ma), lambda: ev.masked(mb),
                                                      n=search.n_val, seed=search.budget.seed)
            if write_checkpoint is not None:
                write_checkpoint(learner.state.to_bytes(owner))
        return fig["separation"]

    result = None
    if budget is not None:
        result = search_path(points, budget.perplexity_ratio, ppl, separation)
        chosen = result.chosen
    else:
        chosen = Setting(points[0])
    masks = at(chosen)
    final = ppl(chosen)
    ev.masks.restore()
    return PairOutcome(spec.with_setting(chosen.sparsity), masks, result, final, time.perf_counter() - t0, learner,
                       resumed_from, points, search.val_text)
