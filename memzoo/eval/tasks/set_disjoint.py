"""Set disjointness: name the one token two lists share.

From "Just read twice: closing the recall gap for recurrent language models" (Arora et al., arXiv
2407.05483; JRT's ``disjoint_sets``).  The two lists are drawn from the two halves of a permuted
vocabulary, so they are disjoint, and then one slot of the longer list is overwritten with a token
of the shorter one, so exactly one token is shared:

    PREFIX a1 .. a_n SEP b1 .. b_m ANSWER      label at ANSWER = the shared token

A causal recurrent model must decide what to keep while reading the first list: a short first list
is cheap to remember, a long one is not (JRT's finding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import IGNORE, TaskData, check_positive, distinct_per_row, to_long

__all__ = ["SetDisjointConfig", "make", "MASK", "PREFIX", "SEP", "ANSWER"]

MASK, PREFIX, SEP, ANSWER = 0, 1, 2, 3
_FIRST = 4


@dataclass(frozen=True)
class SetDisjointConfig:
    vocab_size: int = 2048
    num_examples: int = 1000
    # Length of the first and of the second list.
    first_len: int = 4
    second_len: int = 16

    def __post_init__(self) -> None:
        check_positive(vocab_size=self.vocab_size, num_examples=self.num_examples, first_len=self.first_len,
                       second_len=self.second_len)
        half = (self.vocab_size - _FIRST) // 2
        if max(self.first_len, self.second_len) > half:
            raise ValueError(f"vocab_size={self.vocab_size} gives halves of {half} tokens, too few for lists of "
                             f"{self.first_len} and {self.second_len}")

    @property
    def seq_len(self) -> int:
        return self.first_len + self.second_len + 3


def make(cfg: SetDisjointConfig, seed: int) -> TaskData:
    """Generate ``cfg.num_examples`` list pairs.

    Returns:
        ``TaskData`` with inputs/labels ``[N, first_len + second_len + 3]``, label only at the last
        position; slice ``lists=<first>x<second>``.
    """
    rng = np.random.default_rng(seed)
    N, a, b = cfg.num_examples, cfg.first_len, cfg.second_len
    # Slots of a uniform permutation are a uniform ordered distinct subset: drawing a + b distinct
    # tokens is the same as taking the lists from the two halves of a permuted vocabulary.
    drawn = distinct_per_row(rng, N, a + b, _FIRST, cfg.vocab_size)  # [N, a + b]
    first, second = drawn[:, :a].copy(), drawn[:, a:].copy()
    rows = np.arange(N)
    # A token of the shorter list overwrites a slot of the longer one (the second list on a tie).
    short, long = (first, second) if a <= b else (second, first)
    shared = short[rows, rng.integers(0, short.shape[1], N)]
    long[rows, rng.integers(0, long.shape[1], N)] = shared
    inputs = np.concatenate([np.full((N, 1), PREFIX), first, np.full((N, 1), SEP), second,
                             np.full((N, 1), ANSWER)], axis=1)
    labels = np.full(inputs.shape, IGNORE, dtype=np.int64)
    labels[:, -1] = shared
    return TaskData(to_long(inputs), to_long(labels), {f"lists={a}x{b}": torch.ones(N, dtype=torch.bool)})
