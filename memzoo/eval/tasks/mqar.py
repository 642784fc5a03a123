"""Multi-query associative recall (MQAR), exactly as zoology defines it.

"Zoology: Measuring and Improving Recall in Efficient Language Models" (Arora et al., arXiv
2312.04927), ``zoology/data/multiquery_ar.py``.  An example is ``kv`` key-value pairs followed by
a query region where every key reappears once, at a power-law distributed gap:

    k1 v1 k2 v2 ... kkv vkv | . . k2 . k1 . . . k3 ...      label at each query key = its value

Keys come from ``[1, V/2)``, values from ``[V/2, V)``; 0 is the blank that ``random_non_queries``
replaces with uniform tokens from the whole vocabulary (never scored).  The samples differ from
zoology's bit for bit (it draws row by row from numpy's global state; we draw whole arrays from a
seeded ``Generator``) but the distribution is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import IGNORE, TaskData, check_positive, distinct_per_row, to_long, weighted_distinct_per_row

__all__ = ["MQARConfig", "make"]


@dataclass(frozen=True)
class MQARConfig:
    vocab_size: int = 8192
    num_examples: int = 1000
    input_seq_len: int = 64
    # Query gaps g = 1..space are drawn with p(g) ~ a g^(a-1): a -> 0 puts queries right after the context.
    power_a: float = 0.01
    num_kv_pairs: int = 8
    # Fill the blanks between queries with random tokens (zoology's default; its Fig. 2 used False).
    random_non_queries: bool = True
    # Repeat the context this many times before the queries (JRT's "read twice" variant).
    num_passes: int = 1

    @property
    def context_len(self) -> int:
        """The tokens before the query region: the key-value pairs, ``num_passes`` times."""
        return 2 * self.num_kv_pairs * self.num_passes

    def __post_init__(self) -> None:
        check_positive(vocab_size=self.vocab_size, num_examples=self.num_examples,
                       input_seq_len=self.input_seq_len, num_kv_pairs=self.num_kv_pairs, num_passes=self.num_passes)
        T, kv = self.input_seq_len, self.num_kv_pairs
        if T % 2:
            raise ValueError(f"input_seq_len must be even, got {T}")
        if self.vocab_size <= T:
            raise ValueError(f"vocab_size ({self.vocab_size}) must exceed input_seq_len ({T})")
        if self.context_len + 2 * kv > T:
            raise ValueError(f"input_seq_len={T} is too short for num_kv_pairs={kv} with num_passes="
                             f"{self.num_passes}: need 2*kv*num_passes + 2*kv <= input_seq_len")
        if self.vocab_size // 2 - 1 < kv:
            raise ValueError(f"vocab_size={self.vocab_size} has fewer than num_kv_pairs={kv} keys in [1, V/2)")
        if not self.power_a > 0:
            raise ValueError(f"power_a must be positive, got {self.power_a}")


def make(cfg: MQARConfig, seed: int) -> TaskData:
    """Generate ``cfg.num_examples`` MQAR examples.

    Returns:
        ``TaskData`` with inputs/labels ``[N, input_seq_len]`` and the slice ``num_kv_pairs=<kv>``.
    """
    rng = np.random.default_rng(seed)
    N, T, kv, V = cfg.num_examples, cfg.input_seq_len, cfg.num_kv_pairs, cfg.vocab_size
    keys = distinct_per_row(rng, N, kv, 1, V // 2)  # [N, kv]
    values = distinct_per_row(rng, N, kv, V // 2, V)  # [N, kv]
    context = np.tile(np.stack([keys, values], axis=2).reshape(N, 2 * kv), (1, cfg.num_passes))
    ctx = cfg.context_len

    space = (T - ctx) // 2
    g = np.arange(1, space + 1, dtype=np.float64)
    p = cfg.power_a * g ** (cfg.power_a - 1)
    # The i-th key in context order gets the i-th drawn gap, as in zoology.
    gaps = weighted_distinct_per_row(rng, N, kv, p / p.sum())  # [N, kv], 0-based slot indices
    queries = np.zeros((N, T - ctx + 1), dtype=np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    examples = np.concatenate([context, queries], axis=1)  # [N, T + 1]
    labels = np.full((N, T + 1), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, 2 * gaps + ctx + 1, values, axis=1)

    inputs, labels = examples[:, :-1], labels[:, 1:]
    if cfg.random_non_queries:
        blank = inputs == 0
        inputs[blank] = rng.integers(0, V, size=int(blank.sum()))
    return TaskData(to_long(inputs), to_long(labels), {f"num_kv_pairs={kv}": torch.ones(N, dtype=torch.bool)})
