"""Activation statistics: sufficient statistics that merge by addition.

For the input of every linear group (see `models.linear_groups`), per input
channel j, over the real (unpadded) tokens of a calibration set:

* ``tokens``                      token count
* ``sum``, ``sumsq``, ``sumabs``  sum of x_j, of x_j^2, of |x_j|
* ``samples``                     number of calibration samples (texts)
* ``norm_sum``, ``norm_sumsq``    over samples, the sum and sum of squares of the
                                  channel's L2 norm over that sample's tokens

Every mask method's score derives from these; none needs raw activations again.
Shards of one persona merge by addition (`GroupStats.merge`, `PersonaStats.merge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS = 1e-12  # the floor under a variance or a norm before it divides


@dataclass
class GroupStats:
    """Statistics of one shared linear input (one `LinearGroup`), float64 on any device."""

    tokens: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    sumabs: torch.Tensor
    samples: int
    norm_sum: torch.Tensor
    norm_sumsq: torch.Tensor

    @classmethod
    def zeros(cls, width: int, device: torch.device | str = "cpu") -> "GroupStats":
        z = lambda: torch.zeros(width, dtype=torch.float64, device=device)  # noqa: E731
        return cls(0, z(), z(), z(), 0, z(), z())

    @property
    def width(self) -> int:
        return self.sum.numel()

    def merge(self, other: "GroupStats") -> "GroupStats":
        if other.width != self.width:
            raise ValueError(f"cannot merge statistics of widths {self.width} and {other.width}")
        return GroupStats(
            self.tokens + other.tokens, self.sum + other.sum, self.sumsq + other.sumsq,
            self.sumabs + other.sumabs, self.samples + other.samples,
            self.norm_sum + other.norm_sum, self.norm_sumsq + other.norm_sumsq,
        )

    def to(self, device) -> "GroupStats":
        return GroupStats(self.tokens, self.sum.to(device), self.sumsq.to(device), self.sumabs.to(device),
                          self.samples, self.norm_sum.to(device), self.norm_sumsq.to(device))

    # Derived quantities (all per channel).
    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq / max(self.tokens, 1) - self.mean**2).clamp_min(0)

    @property
    def rms(self) -> torch.Tensor:
        """sqrt(mean x^2): Wanda's ||X_j||_2 normalised by the real token count."""
        return (self.sumsq / max(self.tokens, 1)).sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sumabs / max(self.tokens, 1)

    @property
    def norm_mean(self) -> torch.Tensor:
        """Mean over samples of the per-sample L2 norm."""
        return self.norm_sum / max(self.samples, 1)

    @property
    def norm_var(self) -> torch.Tensor:
        """Variance over samples of the per-sample L2 norm."""
        return (self.norm_sumsq / max(self.samples, 1) - self.norm_mean**2).clamp_min(0)


GroupKey = tuple[int, str]  # (layer index, group name), e.g. (12, "mlp_in")


@dataclass
class PersonaStats:
    """All groups' statistics for one persona (possibly merged from several shards)."""

    model_key: str
    persona_id: str
    persona_hash: str
    groups: dict[GroupKey, GroupStats] = field(default_factory=dict)
    calib_hash: str = ""

    def __getitem__(self, key: GroupKey) -> GroupStats:
        return self.groups[key]

    def merge(self, other: "PersonaStats") -> "PersonaStats":
        if (other.model_key, other.persona_id) != (self.model_key, self.persona_id):
            raise ValueError(f"cannot merge stats of {other.model_key}/{other.persona_id} "
                             f"into {self.model_key}/{self.persona_id}")
        merged = dict(self.groups)
        for k, g in other.groups.items():
            merged[k] = merged[k].merge(g) if k in merged else g
        return PersonaStats(self.model_key, self.persona_id, self.persona_hash, merged, self.calib_hash)

    @property
    def tokens(self) -> int:
        return next(iter(self.groups.values())).tokens if self.groups else 0


@dataclass(frozen=True)
class Shard:
    """Which slice of a persona's calibration texts a part covers: texts [index*size, (index+1)*size)."""

    index: int = 0
    count: int = 1
    size: int | None = None  # None: the whole set in one part

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} outside 0..{self.count - 1}")
