"""Sequential digits: name the digit in an 8x8 image read one pixel at a time.

A small stand-in, bundled with scikit-learn, for the sequential image classification of the S4 line of work
(sequential MNIST / sCIFAR; the S4D initialisation ablation, arXiv 2206.11893, is on sCIFAR).  Each of the 1797
images of ``sklearn.datasets.load_digits`` becomes 64 pixel tokens (intensity 0..16, row by row, or in one fixed
random order with ``permuted``), then a query token, where the model must predict the class token:

    p_0 p_1 ... p_63 ?        label at ``?``: the class token of the digit

The split is fixed (a permutation with seed 0: 1400 train / 397 test images, as the S4D tests use); the generator's
seed only orders the images and picks a subset when ``num_examples`` is smaller than the split.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .base import IGNORE, TaskData, check_positive, to_long

__all__ = ["SeqDigitsConfig", "make", "QUERY", "CLASS_0", "VOCAB_SIZE", "SPLIT_SIZES"]

LEVELS = 17  # pixel intensities 0..16 are tokens 0..16
QUERY = LEVELS
CLASS_0 = QUERY + 1  # class c is token CLASS_0 + c
VOCAB_SIZE = CLASS_0 + 10
N_TRAIN = 1400
SPLIT_SIZES = {"train": N_TRAIN, "test": 1797 - N_TRAIN}


@dataclass(frozen=True)
class SeqDigitsConfig:
    split: str = "train"
    # None: the whole split (set to its size); fewer: a subset chosen by the seed.
    num_examples: int | None = None
    # Read the pixels in one fixed random order (the "permuted" variant of sequential MNIST).
    permuted: bool = False
    # Fixed by the layout (17 pixel levels, the query, 10 classes); a field so that DataSpec can read it.
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.split not in SPLIT_SIZES:
            raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {self.split!r}")
        if self.num_examples is None:
            object.__setattr__(self, "num_examples", SPLIT_SIZES[self.split])
        else:
            check_positive(num_examples=self.num_examples)
            if self.num_examples > SPLIT_SIZES[self.split]:
                raise ValueError(f"num_examples={self.num_examples} exceeds the {self.split} split's "
                                 f"{SPLIT_SIZES[self.split]} images")
        if self.vocab_size != VOCAB_SIZE:
            raise ValueError(f"vocab_size is fixed at {VOCAB_SIZE} (17 pixel levels, the query, 10 classes), "
                             f"got {self.vocab_size}")

    @property
    def seq_len(self) -> int:
        return 65


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the seq_digits task reads scikit-learn's bundled digits: pip install scikit-learn") from e
    d = load_digits()
    return d.data.astype(np.int64), d.target.astype(np.int64)


def make(cfg: SeqDigitsConfig, seed: int) -> TaskData:
    """The split's images as ``[N, 65]`` token rows, labelled at the last (query) position only."""
    pixels, target = _digits()
    order = np.random.default_rng(0).permutation(len(target))
    rows = order[:N_TRAIN] if cfg.split == "train" else order[N_TRAIN:]
    rng = np.random.default_rng(seed)
    rows = rng.permutation(rows)[: cfg.num_examples]
    x = pixels[rows]
    if cfg.permuted:
        x = x[:, np.random.default_rng(1).permutation(64)]
    n = len(rows)
    inputs = np.concatenate([x, np.full((n, 1), QUERY, dtype=np.int64)], axis=1)
    labels = np.full_like(inputs, IGNORE)
    labels[:, -1] = CLASS_0 + target[rows]
    slices = {f"class={c}": torch.from_numpy(target[rows] == c) for c in range(10)}
    return TaskData(to_long(inputs), to_long(labels), slices)
