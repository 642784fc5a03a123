"""What every synthetic task returns, and the helpers the generators share.

A task is a pure function ``make(cfg, seed) -> TaskData``: the same config and seed give the
same tensors on every machine.  Labels follow the zoology convention, *already shifted*:
``labels[n, t]`` is the target of the prediction made at position ``t`` (so it is compared with
``logits[n, t]``), and ``-100`` marks positions that are never scored.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["IGNORE", "TaskData", "check_positive", "distinct_per_row", "to_long", "weighted_distinct_per_row"]

IGNORE = -100


class TaskData(NamedTuple):
    inputs: Tensor  # [N, T] int64 token ids
    labels: Tensor  # [N, T] int64 targets of the prediction at each position; -100 = not scored
    # Name -> bool mask [N] of the examples in that slice (metrics are reported per slice).
    slices: dict[str, Tensor]
    # [N, T, V] bool: every prediction that counts as right, for tasks with more than one right
    # answer (RegBench: any symbol the DFA accepts).  None: only ``labels`` is right.
    accept: Tensor | None = None


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def distinct_per_row(rng: np.random.Generator, n: int, k: int, low: int, high: int) -> np.ndarray:
    """``[n, k]`` integers from ``[low, high)``, distinct within each row, uniformly without replacement.

    Rejection sampling: draw all rows at once and redraw only the rows that repeat a value.  It is
    exact (a uniform k-subset in random order) and far faster than one ``choice`` call per row.
    """
    if high - low < k:
        raise ValueError(f"cannot draw {k} distinct values from [{low}, {high})")
    # When k is a large part of the range, collisions are the rule: permute the range instead.
    if 4 * k > high - low:
        return low + np.argsort(rng.random((n, high - low)), axis=1)[:, :k]
    out = rng.integers(low, high, size=(n, k))
    todo = np.arange(n)
    while todo.size:
        s = np.sort(out[todo], axis=1)
        bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
        todo = todo[bad]
        out[todo] = rng.integers(low, high, size=(todo.size, k))
    return out


def weighted_distinct_per_row(rng: np.random.Generator, n: int, k: int, weights: np.ndarray) -> np.ndarray:
    """``[n, k]`` distinct indices per row drawn without replacement with probability proportional to ``weights``.

    Gumbel top-k: the k largest ``log w + Gumbel`` keys are distributed exactly like k sequential
    draws without replacement (what ``np.random.choice(replace=False, p=w)`` does), in draw order.
    """
    if k > weights.size:
        raise ValueError(f"cannot draw {k} distinct slots from {weights.size}")
    keys = np.log(weights)[None, :] + rng.gumbel(size=(n, weights.size))
    return np.argsort(-keys, axis=1)[:, :k]


def to_long(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
