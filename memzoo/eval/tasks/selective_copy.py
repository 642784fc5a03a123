"""Selective copying: copy the content tokens scattered in a noise sequence, in order.

From "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao, arXiv
2312.00752, Fig. 2) and MAD's selective copy ("Mechanistic Design and Scaling of Hybrid
Architectures", Poli et al., arXiv 2403.17844).  ``n_copy`` content tokens sit at random positions
among blanks; then ``n_copy`` marker tokens follow and at the i-th marker the model must emit the
i-th content token:

    . c1 . . c2 . . . c3 . . | | |      labels at the markers: c1 c2 c3

A time-invariant layer (S4D, long convolutions) cannot tell content from blanks by position
alone; input-dependent (selective) layers can.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import IGNORE, TaskData, check_positive, distinct_per_row, to_long

__all__ = ["SelectiveCopyConfig", "make", "BLANK", "MARKER"]

BLANK, MARKER = 0, 1
_FIRST = 2


@dataclass(frozen=True)
class SelectiveCopyConfig:
    vocab_size: int = 16
    num_examples: int = 1000
    seq_len: int = 256
    n_copy: int = 16

    def __post_init__(self) -> None:
        check_positive(vocab_size=self.vocab_size, num_examples=self.num_examples, seq_len=self.seq_len,
                       n_copy=self.n_copy)
        if self.vocab_size <= _FIRST:
            raise ValueError(f"vocab_size must be > {_FIRST} (blank and marker are reserved), got {self.vocab_size}")
        if 2 * self.n_copy > self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} must be at least 2 * n_copy={2 * self.n_copy}")


def make(cfg: SelectiveCopyConfig, seed: int) -> TaskData:
    """Generate ``cfg.num_examples`` selective-copy sequences.

    Returns:
        ``TaskData`` with inputs/labels ``[N, seq_len]``; labels at the last ``n_copy`` positions.
    """
    rng = np.random.default_rng(seed)
    N, T, k = cfg.num_examples, cfg.seq_len, cfg.n_copy
    ctx = T - k
    positions = np.sort(distinct_per_row(rng, N, k, 0, ctx), axis=1)  # [N, k]
    content = rng.integers(_FIRST, cfg.vocab_size, (N, k))
    inputs = np.full((N, T), BLANK, dtype=np.int64)
    np.put_along_axis(inputs, positions, content, axis=1)
    inputs[:, ctx:] = MARKER
    labels = np.full((N, T), IGNORE, dtype=np.int64)
    labels[:, ctx:] = content
    return TaskData(to_long(inputs), to_long(labels), {f"n_copy={k}": torch.ones(N, dtype=torch.bool)})
