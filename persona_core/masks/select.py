"""Selection: from scores to a keep-mask with exactly the requested count, deterministically.

`keep_top` keeps exactly k scores per row; ties never decide a mask: equal scores are ordered
by a tiebreak (|W| for weights, the column's |W| sum for channels), then by position (lower
index kept first), so a mask is a pure function of its inputs. `select_unstructured` and
`select_nm` are the two weight granularities built on it (the same sparsity in every output
row, Wanda's group; exactly N zeros in every group of M consecutive inputs).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _kth_smallest(x: torch.Tensor, j: int) -> torch.Tensor:
    """Per row, the j-th smallest value (0-based): numpy's introselect on CPU, kthvalue elsewhere."""
    if x.device.type == "cpu":
        a = x.contiguous().numpy()
        return torch.from_numpy(np.partition(a, j, axis=-1)[..., j].copy())
    return torch.kthvalue(x, j + 1, dim=-1).values


def _count(mask: torch.Tensor) -> torch.Tensor:
    """True values per row (numpy's sum of bools is many times faster than torch's on CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(mask.numpy().sum(-1, dtype=np.int64))
    return mask.sum(-1)


def _at_least(x: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """x >= cut, cut broadcast per row (numpy's comparison is ~3x torch's on CPU)."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy() >= cut.numpy())
    return x >= cut


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x[rows]


def keep_top(score: torch.Tensor, k: int, tiebreak: torch.Tensor) -> torch.Tensor:
    """Keep exactly the `k` largest scores in every row (last dim), deterministically.

    Ties in `score` are ordered by `tiebreak` (larger first), then by index (lower
    first); both must be non-negative. Vectorised: one selection pass over all rows,
    a second only over rows with a tie at the cut, a cumulative count only over rows
    tied in both keys.
    """
    n = score.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n}")
    if k == 0 or k == n:
        return torch.full(score.shape, k == n, dtype=torch.bool, device=score.device)
    flat = score.reshape(-1, n).float()
    cut = _kth_smallest(flat, n - k).unsqueeze(-1)
    if torch.isnan(cut).any():
        raise ValueError("scores contain NaN (check the statistics)")
    keep = _at_least(flat, cut)
    ambiguous = _count(keep) > k  # more than k at or above the cut: a tie there
    if ambiguous.any():
        rows = None if ambiguous.all() else ambiguous.nonzero().squeeze(-1)
        sub, sub_cut = _rows(flat, rows), _rows(cut, rows)
        tb = _rows(tiebreak.reshape(-1, n), rows).float()
        # Above the cut: always kept (+inf); at the cut: ranked by tiebreak; below: never (-1).
        key = torch.where(sub > sub_cut, torch.inf, torch.where(sub == sub_cut, tb, -1.0))
        if rows is None:
            keep = _keep_top_exact(key, k)
        else:
            keep[rows] = _keep_top_exact(key, k)
    return keep.reshape(score.shape)


def _keep_top_exact(key: torch.Tensor, k: int) -> torch.Tensor:
    """Top k per row; remaining ties go to the lowest indices."""
    n = key.shape[-1]
    cut = _kth_smallest(key, n - k).unsqueeze(-1)
    keep = _at_least(key, cut)
    ambiguous = _count(keep) > k
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(-1)
        sub, sub_cut = key[rows], cut[rows]
        above = sub > sub_cut
        at = sub == sub_cut
        need = (k - _count(above)).unsqueeze(-1)
        keep[rows] = above | (at & (at.cumsum(-1) <= need))
    return keep


def n_pruned(n: int, sparsity: float) -> int:
    """How many of `n` a sparsity removes (floor, as Wanda; robust to float noise)."""
    return math.floor(n * sparsity + 1e-9)


def select_unstructured(score: torch.Tensor, absw: torch.Tensor, sparsity: float) -> torch.Tensor:
    n = score.shape[1]
    return keep_top(score, n - n_pruned(n, sparsity), absw)


def select_nm(score: torch.Tensor, absw: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out, width = score.shape
    if width % m:
        raise ValueError(f"N:M {n}:{m} needs the input width ({width}) to be a multiple of {m}")
    keep = keep_top(score.reshape(out, width // m, m), m - n, absw.reshape(out, width // m, m))
    return keep.reshape(out, width)
